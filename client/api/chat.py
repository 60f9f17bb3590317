"""The OpenAI-compatible half of the device API: ``GET /v1/models`` and
``POST /v1/chat/completions`` (streamed as server-sent events or not); see :mod:`client.api.app`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter
from fastapi.params import Depends
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from client.api.errors import ERRORS, ApiError, as_api_error, known
from client.api.metrics import Metrics
from client.assistant.assistant import Assistant
from client.assistant.conversation import Answer, UnknownModel, split_conversation
from client.assistant.model_thread import MODEL_THREAD

logger = logging.getLogger(__name__)
MAX_CONTENT = 8_000
# Sampling divides the logits by the temperature: far below this they overflow to inf and the
# sampler fails (temperature=1e-100 was a 500). 0.01 is already as good as greedy.
MIN_TEMPERATURE = 0.01
MODEL_PREFIX = "fedpersona"


class TextPart(BaseModel):
    """One part of a message's content list (text only)."""

    type: Literal["text"]
    text: str = Field(max_length=MAX_CONTENT)


class ChatMessage(BaseModel):
    """One OpenAI chat message: text content, as a string or a list of text parts."""

    role: Literal["system", "user", "assistant", "developer"]
    content: (
        Annotated[str, Field(max_length=MAX_CONTENT)]
        | Annotated[list[TextPart], Field(max_length=64)]
    )

    def text(self) -> str:
        """The content as one string."""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``."""

    include_usage: bool = False


class ChatRequest(BaseModel):
    """The OpenAI ``/v1/chat/completions`` request fields fedpersona honours."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(default=MODEL_PREFIX, max_length=200)
    messages: list[ChatMessage] = Field(min_length=1, max_length=64)
    temperature: float = Field(default=0.8, ge=MIN_TEMPERATURE, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1, le=1024)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1024)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        default=None, max_length=4
    )
    seed: int | None = None
    candidates: int | None = Field(
        default=None, ge=1, le=8, description="samples to rerank (default 3; 1 when streaming)"
    )
    task: str | None = Field(default=None, max_length=200, description="current task/app")


def model_id(variant: str | None) -> str:
    """The model id of ``variant`` (``None``: the device decides)."""
    return MODEL_PREFIX if variant is None else f"{MODEL_PREFIX}-{variant}"


def variant_of(model: str) -> str | None:
    """The variant a requested model id names (``None``: the device decides)."""
    if model.startswith(MODEL_PREFIX + "-"):
        variant = model[len(MODEL_PREFIX) + 1 :]
        if variant in ("personal", "global", "experts"):
            return variant
    return None


def chat_router(assistant: Assistant, metrics: Metrics, auth: Depends) -> APIRouter:
    """``/v1/models`` and ``/v1/chat/completions`` over ``assistant``, guarded by ``auth``."""
    routes = ChatRoutes(assistant, metrics)
    router = APIRouter()
    router.get("/v1/models", dependencies=[auth], responses=ERRORS)(routes.models)
    router.post("/v1/chat/completions", dependencies=[auth], responses=ERRORS)(routes.chat)
    return router


class ChatRoutes:
    """The OpenAI-compatible routes of one device's assistant."""

    def __init__(self, assistant: Assistant, metrics: Metrics) -> None:
        self.assistant, self.metrics = assistant, metrics

    def models(self) -> dict[str, Any]:
        """The models this device answers with (OpenAI's list shape)."""
        assistant = self.assistant
        created = int(assistant.state.meta.last_round or 0)
        about = {
            None: "the device decides: " + assistant.why(),
            "personal": "your personal model (the federation's adapter plus yours)",
            "global": "the federation's model, without your personal adapter",
            "experts": "expert adapters mixed for you by the router",
        }
        return {
            "object": "list",
            "data": [
                {
                    "id": model_id(v),
                    "object": "model",
                    "created": created,
                    "owned_by": MODEL_PREFIX,
                    "fedpersona": {"variant": v or "auto", "description": about[v]},
                }
                for v in (None, *assistant.variants())
            ],
        }

    async def chat(self, body: ChatRequest) -> Any:
        """OpenAI-compatible chat completion, personalized on the device."""
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        kwargs = self._ask_kwargs(body, messages)
        completion_id = f"chatcmpl-{secrets.token_hex(12)}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await self._stream(messages, kwargs, completion_id, include_usage)
        start = time.perf_counter()
        try:
            answer = await MODEL_THREAD.run(self.assistant.ask, messages, **kwargs)
        except (ValueError, UnknownModel) as err:
            raise as_api_error(err) from None
        self.metrics.chat_seconds.observe(time.perf_counter() - start)
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_id(answer.variant),
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer.text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": answer.finish_reason,
                }
            ],
            "usage": _usage(answer),
            "fedpersona": _extension(answer),
        }

    def _ask_kwargs(self, body: ChatRequest, messages: list[dict[str, str]]) -> dict[str, Any]:
        """``Assistant.ask``'s options for ``body``; a conversation it cannot answer (a bad
        turn order, experts that are not installed) is a 400 / 404 before any work."""
        try:
            split_conversation(messages)
        except ValueError as err:
            raise ApiError(400, str(err), param="messages") from None
        variant = variant_of(body.model)
        if variant == "experts" and self.assistant.router is None:
            raise ApiError(
                404,
                f"model {body.model!r}: no expert adapters are installed on this device",
                code="model_not_found",
                param="model",
            )
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return {
            "n": body.candidates or (1 if body.stream else 3),
            "max_new_tokens": body.max_completion_tokens or body.max_tokens or 64,
            "temperature": body.temperature,
            "task": body.task,
            "seed": body.seed,
            "model": variant,
            "stop": stop,
        }

    async def _stream(
        self, messages: list[dict[str, str]], kwargs: dict[str, Any], cid: str, include_usage: bool
    ) -> Any:
        """Run the answer on the model thread; stream its pieces as OpenAI chunks.

        The first event is awaited before the response starts, so a request that fails before
        its first token (too long for the context, unknown model) still gets an HTTP error.
        """
        assistant = self.assistant
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()
        start = time.perf_counter()

        def put(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        def work() -> None:
            try:
                put("done", assistant.ask(messages, on_text=lambda t: put("text", t), **kwargs))
            except Exception as err:  # handed to the stream; nothing may die silently
                put("error", err)

        kwargs["cancel"] = cancel
        # Chunks name the model that answers: the one asked for, else the device's choice
        # (the A/B coin is thrown inside ``ask``: the final chunk names it).
        shown = kwargs["model"] or (None if assistant.ab_test else assistant.variant)
        MODEL_THREAD.submit(work)
        try:
            first = await events.get()
        except asyncio.CancelledError:  # the client left before the first token
            cancel.set()
            raise
        if first[0] == "error":
            raise as_api_error(first[1]) if known(first[1]) else first[1]
        self.metrics.first_token_seconds.observe(time.perf_counter() - start)
        sse = _Chunks(cid, shown, include_usage)
        return StreamingResponse(
            sse.events(first, events, cancel, lambda: self._answered(start)),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def _answered(self, start: float) -> None:
        self.metrics.chat_seconds.observe(time.perf_counter() - start)


class _Chunks:
    """One streamed answer as OpenAI ``chat.completion.chunk`` server-sent events."""

    def __init__(self, cid: str, shown: str | None, include_usage: bool) -> None:
        self.base = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time())}
        self.shown, self.include_usage = shown, include_usage

    def chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        data = {
            **self.base,
            "model": model_id(self.shown),
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            **({"usage": None} if self.include_usage else {}),
            **extra,
        }
        return f"data: {json.dumps(data)}\n\n"

    def usage(self, answer: Answer) -> str:
        """The usage chunk ``stream_options.include_usage`` asks for (no choices)."""
        data = {
            **self.base,
            "model": model_id(answer.variant),
            "system_fingerprint": None,
            "choices": [],
            "usage": _usage(answer),
        }
        return f"data: {json.dumps(data)}\n\n"

    async def events(
        self,
        first: tuple[str, Any],
        queue: asyncio.Queue[tuple[str, Any]],
        cancel: threading.Event,
        answered: Callable[[], None],
    ) -> AsyncIterator[str]:
        """The role chunk, each text piece, then the final chunk (and usage) or an error
        event, then ``[DONE]``; generation stops when the client goes away."""
        event = first
        try:
            yield self.chunk({"role": "assistant", "content": ""})
            while True:
                kind, value = event
                if kind == "text":
                    yield self.chunk({"content": value})
                elif kind == "error":
                    yield f"data: {json.dumps(_error_event(value))}\n\n"
                    break
                else:
                    answer: Answer = value
                    answered()
                    self.shown = answer.variant
                    yield self.chunk({}, answer.finish_reason, fedpersona=_extension(answer))
                    if self.include_usage:
                        yield self.usage(answer)
                    break
                event = await queue.get()
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()  # the client went away: stop generating


def _usage(answer: Answer) -> dict[str, int]:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }


def _extension(answer: Answer) -> dict[str, Any]:
    return {
        "interaction_id": answer.interaction_id,
        "variant": answer.variant,
        "why": answer.why,
        "retrieved": answer.retrieved,
        "turns_used": answer.turns_used,
        "context": answer.context,
    }


def _error_event(err: Exception) -> dict[str, Any]:
    if known(err):
        return as_api_error(err).body()
    logger.error("generation failed mid-stream", exc_info=err)
    return ApiError(500, f"generation failed: {err}", type="server_error").body()
