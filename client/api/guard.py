"""What every request to the local API passes first: the loopback ``Host`` (DNS rebinding), the
declared body size, the bearer token (the store's current one), the erased-store answer (410),
the security headers, the request metrics — and the OpenAI error shape for whatever fails
after (:mod:`client.api.errors`)."""

from __future__ import annotations

import logging
import secrets
import threading
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from client.api.errors import ApiError, as_api_error
from client.api.metrics import Metrics
from client.store import API_TOKEN, LocalStore, StoreError

logger = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "::1", "localhost")
# The largest request body read (64 messages of up to 8,000 characters fit): larger ones are
# refused from their Content-Length, before they are read.
MAX_BODY = 2 * 2**20
TOKEN_HINT = "missing or wrong bearer token (see `fedpersona device token`)"
# The web app is same-origin static files: no inline script or style, nothing from elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
# Module level: route signatures are resolved from module globals (postponed annotations).
BEARER = HTTPBearer(auto_error=False)


class Guard:
    """The API's door: ``install`` puts it in front of every route of an app; ``auth`` is the
    bearer dependency the ``/v1`` routes declare (the middleware has checked it already; this
    declares the scheme in OpenAPI and guards any route its path rule might miss).

    Args:
        store: The device's store, whose current token (``fedpersona device token --rotate``
            replaces it) every request is checked against.
        token: The token the API started with (what is checked once the store is closed).
        metrics: Where each answered request is counted.
    """

    def __init__(self, store: LocalStore, token: str, metrics: Metrics) -> None:
        if len(token) < 16:
            raise ValueError("API token too short")
        self.store, self.token, self.metrics = store, token, metrics
        # Set by ``/v1/forget``: every protected route answers 410 from then on.
        self.forgotten = threading.Event()

    def install(self, app: FastAPI) -> None:
        """The middleware and the error handlers, on ``app``."""
        app.middleware("http")(self._guard)
        app.exception_handler(ApiError)(api_error)
        app.exception_handler(RequestValidationError)(invalid)
        app.exception_handler(StarletteHTTPException)(http_error)
        app.exception_handler(ValueError)(value_error)

    def current_token(self) -> str:
        if self.forgotten.is_set():
            return self.token
        try:
            return self.store.get_meta(API_TOKEN) or self.token
        except StoreError:  # closed: the 410 answers
            return self.token

    def authorized(self, header: str | None) -> bool:
        scheme, _, value = (header or "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(
            value.strip().encode(), self.current_token().encode()
        )

    def auth(self, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        if creds is None or not self.authorized(f"Bearer {creds.credentials}"):
            raise ApiError(401, TOKEN_HINT, code="invalid_api_key")

    async def _guard(self, request: Request, call_next):  # type: ignore[no-untyped-def]
        # The Host first (a web page whose name resolves to 127.0.0.1 — DNS rebinding — sends
        # its own name), then the declared body size (refused before a byte of it is read),
        # then auth before anything else (body validation included): an unauthenticated caller
        # learns nothing but 401.
        path = request.url.path
        protected = path.startswith("/v1/") or path == "/metrics"
        declared = request.headers.get("content-length", "")
        if not loopback_host(request.headers.get("host", "")):
            response = ApiError(
                421,
                "this API answers only requests addressed to 127.0.0.1 or localhost",
                code="misdirected_request",
            ).response()
        elif (declared.isdigit() and int(declared) > MAX_BODY) or (
            not declared and "transfer-encoding" in request.headers
        ):
            response = ApiError(
                413 if declared.isdigit() else 411,
                f"request bodies are at most {MAX_BODY:,} bytes, with a Content-Length",
                code="request_too_large" if declared.isdigit() else "length_required",
            ).response({"Connection": "close"})
        elif protected and not self.authorized(request.headers.get("authorization")):
            response = ApiError(401, TOKEN_HINT, code="invalid_api_key").response(
                {"WWW-Authenticate": "Bearer"}
            )
        elif protected and self.forgotten.is_set():
            response = ApiError(
                410,
                "this device's store was erased (`forget`); run `fedpersona device init`",
                code="store_forgotten",
            ).response()
        else:
            try:
                response = await call_next(request)
            except Exception as err:  # a bug, not a refusal: logged, answered in the same shape
                logger.exception("%s %s failed", request.method, path)
                response = ApiError(
                    500, f"the device failed: {err}", type="server_error"
                ).response()
        response.headers.update(SECURITY_HEADERS)
        if protected:
            response.headers["Cache-Control"] = "no-store"
        route = request.scope.get("route")
        self.metrics.requests.labels(
            getattr(route, "path", "unmatched"), str(response.status_code)
        ).inc()
        return response


async def api_error(_: Request, err: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return err.response(headers)


async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0] if err.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    message = "; ".join(
        f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e['msg']}"
        for e in err.errors()[:5]
    )
    return ApiError(400, message or "invalid request", param=".".join(loc) or None).response()


async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    kind = "invalid_request_error" if err.status_code < 500 else "server_error"
    return ApiError(err.status_code, str(err.detail), type=kind).response()


async def value_error(_: Request, err: ValueError) -> JSONResponse:
    return as_api_error(err).response()


def loopback_host(header: str) -> bool:
    """Whether an HTTP ``Host`` header names this machine's loopback (port optional)."""
    name = header.strip().lower()
    if name.startswith("["):  # [::1]:8765
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    return name in LOOPBACK


def check_loopback(host: str) -> None:
    """Refuse to bind anywhere but the loopback interface.

    Raises:
        ValueError: For any other host.
    """
    if host not in LOOPBACK:
        raise ValueError(f"the device API serves only this machine; bind 127.0.0.1, not {host!r}")
