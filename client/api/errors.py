"""The device API's errors, in OpenAI's error object shape.

Every refused or failed ``/v1`` request answers ``{"error": {"message", "type", "param",
"code"}}`` with its status: 400 a bad request, 401 no or a wrong token, 404 an unknown
interaction or model, 410 after ``forget``, 500 a failure of the device.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from client.assistant.conversation import ContextTooLong, UnknownModel


class ErrorBody(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """What every failed ``/v1`` request returns."""

    error: ErrorBody


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 409, 410)
}


class ApiError(Exception):
    """A request the API refuses, in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status,
            message,
            type,
            code,
            param,
        )

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        """The JSON response."""
        return JSONResponse(status_code=self.status, content=self.body(), headers=headers)


def as_api_error(err: Exception) -> ApiError:
    """The API error for an exception from the assistant."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, ContextTooLong):
        return ApiError(400, str(err), code="context_length_exceeded", param="messages")
    if isinstance(err, UnknownModel):
        return ApiError(404, str(err).strip("'\""), code="model_not_found", param="model")
    if isinstance(err, ValueError):
        return ApiError(400, str(err))
    raise err  # not a refusal: the caller's failure handler answers 500


def known(err: Exception) -> bool:
    """Whether ``err`` is a refusal the API names (else it is a failure: a 500)."""
    return isinstance(err, (ApiError, ValueError, UnknownModel))
