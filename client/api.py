"""The device's local HTTP API (FastAPI): OpenAI-compatible chat, feedback, profile, budget.

Served by ``fedpersona device serve`` with uvicorn on 127.0.0.1 only. Every ``/v1`` route
needs ``Authorization: Bearer <token>``; the token lives inside the encrypted store
(``fedpersona device init`` prints it, ``device token`` shows it again). ``/health`` and
``/ready`` are open (liveness/readiness probes); ``/metrics`` (Prometheus text format) needs the
token too.

``POST /v1/chat/completions`` accepts the OpenAI request shape, so existing chat UIs and SDKs
work: system messages are added to the personalized system prompt, the last user message is
the request. Bad requests get a 4xx with a message; nothing in the store changes on a
rejected request.
"""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field

from client.assistant import Assistant

LOOPBACK = ("127.0.0.1", "::1", "localhost")
MAX_CONTENT = 8_000
# Sampling divides the logits by the temperature: far below this they overflow to inf and the
# sampler fails (temperature=1e-100 was a 500). 0.01 is already as good as greedy.
MIN_TEMPERATURE = 0.01
# Ids are SQLite INTEGERs: a larger one made the store raise OverflowError (a 500).
MAX_ID = 2**63 - 1
# Module level: route signatures are resolved from module globals (postponed annotations).
BEARER = HTTPBearer(auto_error=False)


class ChatMessage(BaseModel):
    """One OpenAI chat message (text content only)."""

    role: Literal["system", "user", "assistant", "developer"]
    content: str = Field(max_length=MAX_CONTENT)


class ChatRequest(BaseModel):
    """The OpenAI ``/v1/chat/completions`` request fields fedpersona honours."""

    model_config = ConfigDict(extra="allow")

    model: str = "fedpersona"
    messages: list[ChatMessage] = Field(min_length=1, max_length=64)
    temperature: float = Field(default=0.8, ge=MIN_TEMPERATURE, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1, le=1024)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1024)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    seed: int | None = None
    candidates: int = Field(default=3, ge=1, le=8, description="samples to rerank")
    task: str | None = Field(default=None, max_length=200, description="current task/app")


class FeedbackRequest(BaseModel):
    """Feedback on an earlier answer."""

    model_config = ConfigDict(extra="forbid")

    interaction_id: int = Field(ge=1, le=MAX_ID)
    rating: float | None = Field(default=None, ge=1, le=5)
    preferred: str | None = Field(default=None, min_length=1, max_length=MAX_CONTENT)
    edit: str | None = Field(default=None, min_length=1, max_length=MAX_CONTENT)
    reject: bool = False


class Metrics:
    """Prometheus metrics of one app instance (own registry: several apps per process work)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fedpersona_requests", "HTTP requests", ["route", "status"], registry=self.registry
        )
        self.chat_seconds = Histogram(
            "fedpersona_chat_seconds", "Chat completion latency", registry=self.registry
        )
        self.adapt_seconds = Histogram(
            "fedpersona_feedback_adaptation_seconds",
            "Real-time adaptation time per feedback",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
            registry=self.registry,
        )
        self.feedback = Counter(
            "fedpersona_feedback", "Feedback received", ["kind"], registry=self.registry
        )
        self.interactions = Gauge(
            "fedpersona_interactions", "Interactions in the store", registry=self.registry
        )
        self.user_epsilon = Gauge(
            "fedpersona_user_epsilon", "User-level ε spent (device ledger)", registry=self.registry
        )


def create_app(assistant: Assistant, *, token: str) -> FastAPI:
    """The FastAPI app over ``assistant``, guarded by bearer ``token``."""
    if len(token) < 16:
        raise ValueError("API token too short")
    app = FastAPI(
        title="fedpersona device API",
        version="1",
        description="Local, private assistant API of one fedpersona device.",
    )
    metrics = Metrics()

    def auth(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        # The middleware already refused bad tokens; this declares the scheme in OpenAPI and
        # guards any route the middleware's path rule might miss.
        if creds is None or not authorized(f"Bearer {creds.credentials}"):
            raise HTTPException(
                status_code=401,
                detail="missing or wrong bearer token (see `fedpersona device token`)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def authorized(header: str | None) -> bool:
        scheme, _, value = (header or "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(
            value.strip().encode(), token.encode()
        )

    @app.middleware("http")
    async def count(request: Request, call_next):  # type: ignore[no-untyped-def]
        # Auth before anything else (body validation included): an unauthenticated caller
        # learns nothing but 401.
        path = request.url.path
        if (path.startswith("/v1/") or path == "/metrics") and not authorized(
            request.headers.get("authorization")
        ):
            response = JSONResponse(
                status_code=401,
                content={"detail": "missing or wrong bearer token (see `fedpersona device token`)"},
                headers={"WWW-Authenticate": "Bearer"},
            )
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        metrics.requests.labels(
            getattr(route, "path", "unmatched"), str(response.status_code)
        ).inc()
        return response

    @app.exception_handler(ValueError)
    async def value_error(_: Request, err: ValueError) -> JSONResponse:
        # The shape every route declares for 422 (FastAPI's HTTPValidationError), so clients
        # parse the assistant's refusals like the framework's own.
        return JSONResponse(
            status_code=422,
            content={"detail": [{"loc": ["body"], "msg": str(err), "type": "value_error"}]},
        )

    @app.get("/health")
    def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> dict[str, Any]:
        """Readiness: the model is loaded and the store is open."""
        return {"status": "ready", "model": assistant.cfg.model.name, "active": assistant.variant}

    @app.get("/metrics", dependencies=[Depends(auth)], response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        """Prometheus text exposition."""
        metrics.interactions.set(assistant.store.count_interactions())
        metrics.user_epsilon.set(assistant.budget()["user_epsilon"])
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    def chat(body: ChatRequest) -> dict[str, Any]:
        """OpenAI-compatible chat completion, personalized on the device."""
        if body.stream:
            raise HTTPException(status_code=400, detail="stream=true is not supported")
        users = [m.content for m in body.messages if m.role == "user"]
        if not users or not users[-1].strip():
            raise HTTPException(status_code=400, detail="messages need a non-empty user message")
        system = "\n".join(m.content for m in body.messages if m.role in ("system", "developer"))
        start = time.perf_counter()
        answer = assistant.ask(
            users[-1],
            n=body.candidates,
            max_new_tokens=body.max_completion_tokens or body.max_tokens or 64,
            temperature=body.temperature,
            task=body.task,
            seed=body.seed,
            system=system or None,
        )
        metrics.chat_seconds.observe(time.perf_counter() - start)
        tok = assistant.rt.tokenizer
        prompt_tokens = len(tok(users[-1])["input_ids"])
        completion_tokens = len(tok(answer.text)["input_ids"])
        return {
            "id": f"chatcmpl-{answer.interaction_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": f"fedpersona-{assistant.cfg.model.name}-{answer.variant}",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer.text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "fedpersona": {
                "interaction_id": answer.interaction_id,
                "variant": answer.variant,
                "retrieved": answer.retrieved,
                "context": answer.context,
            },
        }

    @app.post("/v1/feedback", dependencies=[Depends(auth)])
    def feedback(body: FeedbackRequest) -> dict[str, Any]:
        """Rate, prefer, edit or reject an answer; adapts the personal model right away."""
        result = assistant.feedback(
            body.interaction_id,
            rating=body.rating,
            preferred=body.preferred,
            edit=body.edit,
            reject=body.reject,
        )
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

    @app.get("/v1/profile", dependencies=[Depends(auth)])
    def get_profile() -> dict[str, Any]:
        """The user's profile (explicit and learned preferences, centroids omitted)."""
        return _public_profile(assistant)

    @app.put("/v1/profile", dependencies=[Depends(auth)])
    def put_profile(changes: dict[str, Any]) -> dict[str, Any]:
        """Change explicit preferences; unknown keys or values get a 422 naming the key."""
        assistant.set_profile(changes)
        return _public_profile(assistant)

    @app.get("/v1/budget", dependencies=[Depends(auth)])
    def budget() -> dict[str, Any]:
        """The device's privacy ledger."""
        return assistant.budget()

    return app


def _public_profile(assistant: Assistant) -> dict[str, Any]:
    data = assistant.profile.to_dict()
    implicit = data["implicit"]
    implicit["liked"] = implicit["liked"] is not None
    implicit["disliked"] = implicit["disliked"] is not None
    data["description"] = assistant.profile.describe()
    return data


def check_loopback(host: str) -> None:
    """Refuse to bind anywhere but the loopback interface.

    Raises:
        ValueError: For any other host.
    """
    if host not in LOOPBACK:
        raise ValueError(f"the device API serves only this machine; bind 127.0.0.1, not {host!r}")
