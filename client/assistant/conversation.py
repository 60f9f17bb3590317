"""A conversation as the assistant takes it: the chat messages of a request, the answer it
gets, and fitting the prompt into the model's context.

The device API (:mod:`client.api.chat`) and the CLI's ``device chat`` pass the whole
conversation; :func:`split_conversation` separates the caller's system text, the earlier
turns and the live request, and :func:`fit_messages` drops the oldest exchanges (then the
retrieved history) until the rendered prompt leaves room for the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.generation import render

CHAT_ROLES = ("system", "developer", "user", "assistant")


class ContextTooLong(ValueError):
    """The request does not fit the model's context, even with earlier turns dropped."""


class UnknownModel(LookupError):
    """A model variant this device does not have."""


@dataclass
class Answer:
    """What :meth:`Assistant.ask` returns.

    ``text`` is the answer as the user sees it (not scrubbed: it is their own device);
    ``finish_reason`` is ``stop`` (end of turn or a stop string) or ``length``;
    ``prompt_tokens`` counts the rendered prompt the model saw and ``completion_tokens``
    every token it generated (all candidates); ``turns_used`` the earlier conversation turns
    that fit the context.
    """

    interaction_id: int
    text: str
    variant: str
    candidates: list[dict[str, Any]]
    retrieved: list[int]
    context: dict[str, str]
    why: str = ""
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    turns_used: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)


def split_conversation(
    request: str | Sequence[Mapping[str, str]],
) -> tuple[list[dict[str, str]], str, str]:
    """``(earlier user/assistant turns, the last user request, the system text)``.

    Raises:
        ValueError: No messages, an unknown role, or a last message that is not a non-empty
            user message.
    """
    if isinstance(request, str):
        request = [{"role": "user", "content": request}]
    turns: list[dict[str, str]] = []
    system: list[str] = []
    for m in request:
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES or not isinstance(content, str):
            raise ValueError(f"a message needs a role in {CHAT_ROLES} and text content")
        if role in ("system", "developer"):
            system.append(content)
        else:
            turns.append({"role": role, "content": content})
    if not turns or turns[-1]["role"] != "user" or not turns[-1]["content"].strip():
        raise ValueError("the conversation must end with a non-empty user message")
    return turns[:-1], turns[-1]["content"], "\n".join(s for s in system if s.strip())


def fit_messages(
    tokenizer: Any,
    build: Callable[[Sequence[Any], Sequence[dict[str, str]]], list[dict[str, str]]],
    history: Sequence[Any],
    turns: Sequence[dict[str, str]],
    *,
    context_tokens: int,
    max_new_tokens: int,
) -> tuple[list[dict[str, str]], list[int]]:
    """The messages ``build(history, turns)`` gives and their prompt ids, fitted into
    ``context_tokens`` with ``max_new_tokens`` to spare: the oldest exchanges are dropped
    first (a user turn with the answers after it), then the retrieved history.

    Raises:
        ContextTooLong: The system prompt and the last request alone do not fit.
    """
    room = context_tokens - max_new_tokens
    size = 0
    for hist in (history, ()):
        kept = list(turns)
        while True:
            messages = build(hist, kept)
            ids = render(tokenizer, messages)
            size = len(ids)
            if size <= room:
                return messages, ids
            if not kept:
                break
            kept = kept[1:]
            while kept and kept[0]["role"] != "user":
                kept = kept[1:]
    raise ContextTooLong(
        f"the request needs {size} prompt tokens; with max_tokens={max_new_tokens} the "
        f"model's context of {context_tokens} tokens holds {room}"
    )
