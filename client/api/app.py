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

The app is assembled here from its parts: the guard every request passes
(:mod:`client.api.guard`), the probes and the web app (below), the OpenAI routes
(:mod:`client.api.chat`) and the extensions (:mod:`client.api.device_routes`); the error shape is
:mod:`client.api.errors`, the metrics :mod:`client.api.metrics`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import FileResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from client.api.chat import chat_router
from client.api.device_routes import device_router
from client.api.guard import MAX_BODY, Guard, check_loopback, loopback_host
from client.api.metrics import Metrics
from client.assistant.assistant import Assistant

__all__ = ["MAX_BODY", "check_loopback", "create_app", "loopback_host", "serve_in_background"]

WEB = Path(__file__).with_name("web")


def create_app(assistant: Assistant, *, token: str, docs: bool = False) -> FastAPI:
    """The FastAPI app over ``assistant``, guarded by bearer ``token`` (the store's current
    token, read on every request, once ``fedpersona device token --rotate`` replaces it).

    ``docs`` serves ``/docs``, ``/redoc`` and ``/openapi.json`` (development only: they are
    open without a token and describe every route).
    """
    metrics = Metrics()
    guard = Guard(assistant.store, token, metrics)
    app = FastAPI(
        title="fedpersona device API",
        version="2",
        description="Local, private assistant API of one fedpersona device.",
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    guard.install(app)
    app.include_router(probes_router(assistant, metrics, guard))
    if WEB.is_dir():
        app.mount("/app", StaticFiles(directory=WEB), name="web")
    app.include_router(chat_router(assistant, metrics, Depends(guard.auth)))
    app.include_router(device_router(assistant, metrics, guard))
    return app


def probes_router(assistant: Assistant, metrics: Metrics, guard: Guard) -> APIRouter:
    """``/health`` and ``/ready`` (open; they name nothing), ``/metrics`` (token) and ``/``,
    the web app."""
    router = APIRouter()

    @router.get("/health")
    def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @router.get("/ready")
    def ready() -> dict[str, Any]:
        """Readiness: the model is loaded and the store is open (which model and adapter
        answer is for token holders: ``/v1/status``)."""
        return {"status": "ready"}

    @router.get("/metrics", dependencies=[Depends(guard.auth)], response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        """Prometheus text exposition."""
        metrics.interactions.set(assistant.store.count_interactions())
        metrics.user_epsilon.set(assistant.budget()["user_epsilon"])
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if WEB.is_dir():

        @router.get("/", include_in_schema=False)
        def index() -> FileResponse:
            """The web app."""
            return FileResponse(WEB / "index.html", headers={"Cache-Control": "no-cache"})

    return router


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
