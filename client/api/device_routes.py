"""fedpersona's own routes of the local API: ``/v1/feedback``, ``/v1/profile``, ``/v1/budget``,
``/v1/privacy``, ``/v1/status``, ``/v1/export`` and ``/v1/forget`` (the OpenAI-compatible ones
are in :mod:`client.api.chat`). Nothing in the store changes on a rejected request."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from client.api.chat import MAX_CONTENT
from client.api.errors import ERRORS, ApiError
from client.api.guard import Guard
from client.api.metrics import Metrics
from client.assistant.assistant import Assistant
from client.assistant.model_thread import MODEL_THREAD
from client.assistant.profile import CHOICES
from client.store import LocalStore
from client.store import status as device_status
from client.store.chats import CHATS_BLOB, check_chats
from client.store.chats import EMPTY as EMPTY_CHATS
from client.store.state import set_paused

# Ids are SQLite INTEGERs: a larger one made the store raise OverflowError (a 500).
MAX_ID = 2**63 - 1


class FeedbackRequest(BaseModel):
    """Feedback on an earlier answer."""

    model_config = ConfigDict(extra="forbid")

    interaction_id: int = Field(ge=1, le=MAX_ID)
    rating: float | None = Field(default=None, ge=1, le=5)
    preferred: str | None = Field(default=None, min_length=1, max_length=MAX_CONTENT)
    edit: str | None = Field(default=None, min_length=1, max_length=MAX_CONTENT)
    reject: bool = False


class FederationSwitch(BaseModel):
    """The owner's pause switch."""

    model_config = ConfigDict(extra="forbid")

    paused: bool


class ForgetRequest(BaseModel):
    """Erase the device store; ``confirm`` must be the word ``forget``."""

    model_config = ConfigDict(extra="forbid")

    confirm: Literal["forget"]


def device_router(assistant: Assistant, metrics: Metrics, guard: Guard) -> APIRouter:
    """The extension routes over ``assistant``, each behind ``guard``'s bearer token."""
    router = APIRouter()
    _learning_routes(router, assistant, metrics, guard)
    _data_routes(router, assistant, guard)
    return router


def _learning_routes(
    router: APIRouter, assistant: Assistant, metrics: Metrics, guard: Guard
) -> None:
    """What the user teaches the assistant: feedback on answers, the profile."""

    @router.post("/v1/feedback", dependencies=[Depends(guard.auth)], responses=ERRORS)
    async def feedback(body: FeedbackRequest) -> dict[str, Any]:
        """Rate, prefer, edit or reject an answer; adapts the personal model right away."""
        try:
            result = await MODEL_THREAD.run(
                assistant.feedback,
                body.interaction_id,
                rating=body.rating,
                preferred=body.preferred,
                edit=body.edit,
                reject=body.reject,
            )
        except ValueError as err:
            status = 404 if str(err).startswith("no interaction") else 400
            param = "interaction_id" if status == 404 else None
            raise ApiError(status, str(err), param=param) from None
        kind = (
            "preferred"
            if body.preferred
            else "edit"
            if body.edit
            else "reject"
            if (body.reject)
            else "rating"
        )
        metrics.feedback.labels(kind).inc()
        if result.adapt_ms is not None:
            metrics.adapt_seconds.observe(result.adapt_ms / 1000)
        return {
            "feedback_id": result.feedback_id,
            "adapted": result.adapted,
            "adapt_ms": result.adapt_ms,
            "drift": result.drift,
            "active_model": result.variant,
        }

    @router.get("/v1/profile", dependencies=[Depends(guard.auth)], responses=ERRORS)
    def get_profile() -> dict[str, Any]:
        """The user's profile (explicit and learned preferences, centroids omitted) and the
        values each explicit field takes."""
        return _public_profile(assistant)

    @router.put("/v1/profile", dependencies=[Depends(guard.auth)], responses=ERRORS)
    def put_profile(changes: dict[str, Any]) -> dict[str, Any]:
        """Change explicit preferences; unknown keys or values get a 400 naming the key."""
        changes.pop("options", None)  # what GET returned may be sent back as it was
        changes.pop("description", None)
        assistant.set_profile(changes)
        return _public_profile(assistant)


def _data_routes(router: APIRouter, assistant: Assistant, guard: Guard) -> None:
    """What the device holds and spends: the ledger, rounds, status, export and forget."""

    @router.get("/v1/chats", dependencies=[Depends(guard.auth)], responses=ERRORS)
    def get_chats() -> dict[str, Any]:
        """The web app's conversations, from the encrypted store (``client/store/chats.py``)."""
        with assistant.lock:
            saved = assistant.store.get_json(CHATS_BLOB)
        return saved if isinstance(saved, dict) else dict(EMPTY_CHATS)

    @router.put("/v1/chats", dependencies=[Depends(guard.auth)], responses=ERRORS)
    def put_chats(chats: dict[str, Any]) -> dict[str, Any]:
        """Keep the web app's conversations in the encrypted store (the whole list)."""
        try:
            check_chats(chats)
        except ValueError as err:
            raise ApiError(400, str(err), param="chats") from None
        with assistant.lock:
            assistant.store.put_json(CHATS_BLOB, chats)
        return {"saved": len(chats["chats"])}

    @router.get("/v1/budget", dependencies=[Depends(guard.auth)], responses=ERRORS)
    def budget() -> dict[str, Any]:
        """The device's privacy ledger."""
        return assistant.budget()

    @router.get("/v1/privacy", dependencies=[Depends(guard.auth)], responses=ERRORS)
    def privacy() -> dict[str, Any]:
        """ε spent and caps, every round joined or declined and what was sent, retention."""
        shared = sum(_numel(assistant.rt.shapes[n]) for n in assistant.rt.shared_names)
        with assistant.lock:
            return device_status.privacy(assistant.store, shared_numbers=shared)

    @router.put("/v1/federation", dependencies=[Depends(guard.auth)], responses=ERRORS)
    def federation(body: FederationSwitch) -> dict[str, Any]:
        """Pause (decline every round, charging nothing) or resume taking part; returns the
        device's federation facts (``device status``'s)."""
        with assistant.lock:
            set_paused(assistant.store, body.paused)
            return device_status.federation(assistant.store)

    @router.get("/v1/status", dependencies=[Depends(guard.auth)], responses=ERRORS)
    def device_state() -> dict[str, Any]:
        """Which model answers and why, the adapter, history counts, retention."""
        with assistant.lock:
            state = assistant.status()
        return {**state, "active_model": assistant.variant, "why": assistant.why()}

    @router.get("/v1/export", dependencies=[Depends(guard.auth)], responses=ERRORS)
    def export() -> JSONResponse:
        """Everything the device holds about its user, as readable JSON."""
        with assistant.lock:
            data = assistant.store.export()
        return JSONResponse(
            data,
            headers={"Content-Disposition": 'attachment; filename="fedpersona-export.json"'},
        )

    @router.post("/v1/forget", dependencies=[Depends(guard.auth)], responses=ERRORS)
    def forget(body: ForgetRequest) -> dict[str, Any]:
        """Erase the store for good (crypto-erase, then delete); the API answers 410 after."""
        with assistant.lock:
            root = assistant.store.root
            assistant.store.close()
            guard.forgotten.set()
            assistant.embedder.clear_cache()  # recent texts' vectors, held in memory
            erased = LocalStore.forget(root)
        return {"erased": erased}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _public_profile(assistant: Assistant) -> dict[str, Any]:
    data = assistant.profile.to_dict()
    implicit = data["implicit"]
    implicit["liked"] = implicit["liked"] is not None
    implicit["disliked"] = implicit["disliked"] is not None
    data["description"] = assistant.profile.describe()
    data["options"] = {k: list(v) for k, v in CHOICES.items()}
    return data
