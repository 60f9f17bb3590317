"""The device's local HTTP API and web app: OpenAI-compatible chat, feedback, profile, privacy.

Served by ``fedpersona device serve`` with uvicorn on 127.0.0.1 only. Every ``/v1`` route
needs ``Authorization: Bearer <token>``; the token lives inside the encrypted store
(``fedpersona device init`` prints it, ``device token`` shows it again). ``/health`` and
``/ready`` are open (liveness/readiness probes; they name nothing); ``/metrics`` (Prometheus text
format) needs the token too. Every request must be addressed to the loopback (``Host``:
127.0.0.1, localhost, [::1]; else 421 — DNS rebinding), and a body declared over ``MAX_BODY``
is refused (413) before it is read. No schema or docs routes unless asked (``docs``). ``/``
serves the web app (``client/api/web/``: static HTML/JS/CSS, no build step, nothing fetched from
elsewhere); it asks for the token once and sends it in the header, never in a URL
or a cookie, so no other site can make the browser act with it.

OpenAI compatibility (what real clients rely on):

* ``POST /v1/chat/completions``: the whole ``messages`` list is the conversation, rendered with
  the model's chat template after the personalized system prompt (the caller's system
  messages follow it); the oldest turns are dropped to fit the context. ``stream=true`` sends
  server-sent events in OpenAI's chunk format ending with ``data: [DONE]``
  (``stream_options.include_usage`` adds the usage chunk). ``finish_reason`` is ``stop`` (end
  of turn or a ``stop`` string) or ``length``; ``usage`` counts the prompt the model saw and
  every token it generated. fedpersona's own fields: ``candidates`` (samples to rerank),
  ``task``, and a ``fedpersona`` object in the answer (interaction id, model, why).
* ``GET /v1/models``: ``fedpersona`` (the device decides), ``fedpersona-personal``,
  ``fedpersona-global`` and, with expert adapters installed, ``fedpersona-experts``. Any other
  model name is answered as ``fedpersona`` (clients often hard-code one).
* Errors: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.

fedpersona extensions: ``/v1/feedback``, ``/v1/profile``, ``/v1/budget``, ``/v1/privacy``,
``/v1/status``, ``/v1/export`` and ``/v1/forget``. Nothing in the store changes on a rejected
request.

(One file on purpose, over the usual length: every route here shares the app's auth middleware,
security headers and error handling; the OpenAI routes are in client/api/chat.py, the error shapes
in client/api/errors.py.)
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from client.api.chat import MAX_CONTENT, add_chat_routes
from client.api.errors import ERRORS, ApiError, as_api_error
from client.assistant.assistant import Assistant
from client.assistant.model_thread import MODEL_THREAD
from client.assistant.profile import CHOICES
from client.store import API_TOKEN, LocalStore, StoreError
from client.store import status as device_status

logger = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "::1", "localhost")
# The largest request body read (64 messages of up to 8,000 characters fit): larger ones are
# refused from their Content-Length, before they are read.
MAX_BODY = 2 * 2**20
# Ids are SQLite INTEGERs: a larger one made the store raise OverflowError (a 500).
MAX_ID = 2**63 - 1
WEB = Path(__file__).with_name("web")
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


class FeedbackRequest(BaseModel):
    """Feedback on an earlier answer."""

    model_config = ConfigDict(extra="forbid")

    interaction_id: int = Field(ge=1, le=MAX_ID)
    rating: float | None = Field(default=None, ge=1, le=5)
    preferred: str | None = Field(default=None, min_length=1, max_length=MAX_CONTENT)
    edit: str | None = Field(default=None, min_length=1, max_length=MAX_CONTENT)
    reject: bool = False


class ForgetRequest(BaseModel):
    """Erase the device store; ``confirm`` must be the word ``forget``."""

    model_config = ConfigDict(extra="forbid")

    confirm: Literal["forget"]


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
        self.first_token_seconds = Histogram(
            "fedpersona_first_token_seconds",
            "Time to the first streamed piece of an answer",
            buckets=(0.1, 0.25, 0.5, 1, 1.5, 2, 5, 10),
            registry=self.registry,
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


def create_app(assistant: Assistant, *, token: str, docs: bool = False) -> FastAPI:
    """The FastAPI app over ``assistant``, guarded by bearer ``token`` (the store's current
    token, read on every request, once ``fedpersona device token --rotate`` replaces it).

    ``docs`` serves ``/docs``, ``/redoc`` and ``/openapi.json`` (development only: they are
    open without a token and describe every route).
    """
    if len(token) < 16:
        raise ValueError("API token too short")
    app = FastAPI(
        title="fedpersona device API",
        version="2",
        description="Local, private assistant API of one fedpersona device.",
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    metrics = Metrics()
    forgotten = threading.Event()

    def current_token() -> str:
        if forgotten.is_set():
            return token
        try:
            return assistant.store.get_meta(API_TOKEN) or token
        except StoreError:  # closed: the 410 below answers
            return token

    def auth(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        # The middleware already refused bad tokens; this declares the scheme in OpenAPI and
        # guards any route the middleware's path rule might miss.
        if creds is None or not authorized(f"Bearer {creds.credentials}"):
            raise ApiError(401, TOKEN_HINT, code="invalid_api_key")

    def authorized(header: str | None) -> bool:
        scheme, _, value = (header or "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(
            value.strip().encode(), current_token().encode()
        )

    @app.middleware("http")
    async def guard(request: Request, call_next):  # type: ignore[no-untyped-def]
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
        elif protected and not authorized(request.headers.get("authorization")):
            response = ApiError(401, TOKEN_HINT, code="invalid_api_key").response(
                {"WWW-Authenticate": "Bearer"}
            )
        elif protected and forgotten.is_set():
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
        metrics.requests.labels(
            getattr(route, "path", "unmatched"), str(response.status_code)
        ).inc()
        return response

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return err.response(headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        message = "; ".join(
            f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e['msg']}"
            for e in err.errors()[:5]
        )
        return ApiError(400, message or "invalid request", param=".".join(loc) or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        return ApiError(err.status_code, str(err.detail), type=kind).response()

    @app.exception_handler(ValueError)
    async def value_error(_: Request, err: ValueError) -> JSONResponse:
        return as_api_error(err).response()

    # ---- probes, metrics, the web app ----------------------------------------------------

    @app.get("/health")
    def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> dict[str, Any]:
        """Readiness: the model is loaded and the store is open (which model and adapter
        answer is for token holders: ``/v1/status``)."""
        return {"status": "ready"}

    @app.get("/metrics", dependencies=[Depends(auth)], response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        """Prometheus text exposition."""
        metrics.interactions.set(assistant.store.count_interactions())
        metrics.user_epsilon.set(assistant.budget()["user_epsilon"])
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if WEB.is_dir():
        app.mount("/app", StaticFiles(directory=WEB), name="web")

        @app.get("/", include_in_schema=False)
        def index() -> FileResponse:
            """The web app."""
            return FileResponse(WEB / "index.html", headers={"Cache-Control": "no-cache"})

    # ---- OpenAI-compatible chat -----------------------------------------------------------

    add_chat_routes(app, assistant, metrics, Depends(auth))

    @app.post("/v1/feedback", dependencies=[Depends(auth)], responses=ERRORS)
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

    @app.get("/v1/profile", dependencies=[Depends(auth)], responses=ERRORS)
    def get_profile() -> dict[str, Any]:
        """The user's profile (explicit and learned preferences, centroids omitted) and the
        values each explicit field takes."""
        return _public_profile(assistant)

    @app.put("/v1/profile", dependencies=[Depends(auth)], responses=ERRORS)
    def put_profile(changes: dict[str, Any]) -> dict[str, Any]:
        """Change explicit preferences; unknown keys or values get a 400 naming the key."""
        changes.pop("options", None)  # what GET returned may be sent back as it was
        changes.pop("description", None)
        assistant.set_profile(changes)
        return _public_profile(assistant)

    @app.get("/v1/budget", dependencies=[Depends(auth)], responses=ERRORS)
    def budget() -> dict[str, Any]:
        """The device's privacy ledger."""
        return assistant.budget()

    @app.get("/v1/privacy", dependencies=[Depends(auth)], responses=ERRORS)
    def privacy() -> dict[str, Any]:
        """ε spent and caps, every round joined or declined and what was sent, retention."""
        shared = sum(_numel(assistant.rt.shapes[n]) for n in assistant.rt.shared_names)
        with assistant.lock:
            return device_status.privacy(assistant.store, shared_numbers=shared)

    @app.get("/v1/status", dependencies=[Depends(auth)], responses=ERRORS)
    def device_state() -> dict[str, Any]:
        """Which model answers and why, the adapter, history counts, retention."""
        with assistant.lock:
            state = assistant.status()
        return {**state, "active_model": assistant.variant, "why": assistant.why()}

    @app.get("/v1/export", dependencies=[Depends(auth)], responses=ERRORS)
    def export() -> JSONResponse:
        """Everything the device holds about its user, as readable JSON."""
        with assistant.lock:
            data = assistant.store.export()
        return JSONResponse(
            data,
            headers={"Content-Disposition": 'attachment; filename="fedpersona-export.json"'},
        )

    @app.post("/v1/forget", dependencies=[Depends(auth)], responses=ERRORS)
    def forget(body: ForgetRequest) -> dict[str, Any]:
        """Erase the store for good (crypto-erase, then delete); the API answers 410 after."""
        with assistant.lock:
            root = assistant.store.root
            assistant.store.close()
            forgotten.set()
            assistant.embedder.clear_cache()  # recent texts' vectors, held in memory
            erased = LocalStore.forget(root)
        return {"erased": erased}

    return app


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


@contextmanager
def serve_in_background(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free 127.0.0.1 port in a thread; yield its base URL.

    For tests and benchmarks: the server is stopped and its thread joined on exit.

    Raises:
        RuntimeError: If uvicorn does not start within 30 s or does not stop.
    """
    import uvicorn

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, name="fedpersona-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the API server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        if thread.is_alive():
            raise RuntimeError("the API server did not stop")
