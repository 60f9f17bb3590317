"""Sampling text from a causal LM: the one generation function of the project.

The device's assistant (:mod:`client.assistant.assistant`) and the run evaluation
(:mod:`simulations.evaluate`) both generate through :func:`sample`: rendered prompts (token
ids, left-padded into one batch), ``n`` samples each, ending at the end of the turn, a stop
string, the token limit or a cancel signal; each completion's text, why it ended and how many
tokens it took. With one prompt and one sample the text can stream (:class:`TextStream`):
the pieces add up to exactly the returned text.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList


def render(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The prompt ids of chat ``messages`` in the model's chat template, ready to answer."""
    return list(
        tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )


@dataclass
class Generated:
    """One sampled completion: its text, why it ended, and the tokens produced."""

    text: str
    finish_reason: str
    tokens: int


class TextStream:
    """Generated token ids -> the text the user sees, in pieces (transformers' streamer
    protocol: ``put``/``end``).

    The text is the decoded completion without special tokens, stripped, and cut before the
    first ``stop`` string (:meth:`text_of`). A piece is handed to ``on_text`` only once it
    cannot change: no half-decoded character, no text that could still begin a stop string,
    no trailing whitespace. So the pieces add up to exactly the final text.
    """

    def __init__(
        self, tokenizer: Any, *, stop: Sequence[str] = (), on_text: Callable[[str], None] | None
    ) -> None:
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.on_text = on_text
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False
        self._prompt = True

    def text_of(self, ids: Sequence[int], *, final: bool) -> tuple[str, bool]:
        """``(text, whether a stop string ended it)`` for completion ``ids``."""
        text = self.tok.decode(ids, skip_special_tokens=True).lstrip()
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            return text[: min(cuts)].rstrip(), True
        if not final:  # what may still change: a stop string's start, a half character
            text = text[: len(text) - self.hold].rstrip("\ufffd")
        return text.rstrip(), False

    def put(self, value: torch.Tensor) -> None:
        """A step's new token(s); the first call is the prompt."""
        if self._prompt:
            self._prompt = False
            return
        self.add(value.reshape(-1).tolist())

    def add(self, ids: Sequence[int]) -> None:
        """New completion token ids (no prompt call first)."""
        self.ids.extend(int(i) for i in ids)
        self._emit(final=False)

    def end(self) -> None:
        """Generation ended: hand out what was held back."""
        self._emit(final=True)

    def _emit(self, *, final: bool) -> None:
        text, hit = self.text_of(self.ids, final=final)
        self.stopped = self.stopped or hit
        if self.on_text is not None and len(text) > len(self.sent) and text.startswith(self.sent):
            piece, self.sent = text[len(self.sent) :], text
            self.on_text(piece)


class _Halt(StoppingCriteria):
    """Ends generation at a stop string or when the caller cancels."""

    def __init__(self, stream: TextStream, cancel: threading.Event | None) -> None:
        self.stream = stream
        self.cancel = cancel

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: Any) -> torch.Tensor:
        done = self.stream.stopped or (self.cancel is not None and self.cancel.is_set())
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The token ids that end a turn."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos) if isinstance(eos, list) else {int(eos)}


@torch.no_grad()
def sample(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    n: int = 1,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int | None = None,
    stop: Sequence[str] = (),
    on_text: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
) -> list[list[Generated]]:
    """``n`` sampled completions of each prompt (token ids), generated as one batch (one
    prompt's ``n`` samples share its KV cache, computed once).

    Args:
        model: The causal LM (with whatever adapter is loaded).
        tokenizer: Its tokenizer (pad and end-of-turn tokens).
        prompts: Rendered prompts (:func:`render`), left-padded together.
        n: Samples per prompt.
        max_new_tokens: Length limit per completion.
        min_new_tokens: No end of turn before this many tokens (benchmarks: a fixed length).
        temperature: Sampling temperature.
        top_p: Nucleus sampling mass.
        seed: Seeds torch's generator first (reproducible samples).
        stop: Strings that end a completion (not included).
        on_text: With one prompt and ``n == 1``: called with each new piece of the text.
        cancel: Set it to end generation early.

    Returns:
        Per prompt, its ``n`` completions.
    """
    pad = int(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    streaming = on_text is not None and len(prompts) == 1 and n == 1
    stream = TextStream(tokenizer, stop=stop, on_text=on_text if streaming else None)
    if seed is not None:
        torch.manual_seed(seed)
    model.eval()
    extra: dict[str, Any] = {"num_return_sequences": n}
    if len(prompts) == 1 and n > 1 and width > 1:
        # n samples of one prompt: its KV cache computed once (all but the last token, which
        # generate feeds), then repeated for the n rows — not n prefills of the same tokens.
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], cache=cache)
        cache.batch_repeat_interleave(n)
        ids, mask = ids.repeat(n, 1), mask.repeat(n, 1)
        extra = {"cache": cache, "use_cache": True}
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        pad_token_id=pad,
        streamer=stream if streaming else None,
        stopping_criteria=StoppingCriteriaList([_Halt(stream, cancel)]),
        **extra,
    )
    ends = eos_ids(model, tokenizer)
    results = [finished(row, stream, ends) for row in out[:, width:].tolist()]
    return [results[i * n : (i + 1) * n] for i in range(len(prompts))]


def finished(row: Sequence[int], stream: TextStream, eos: set[int]) -> Generated:
    """A completion's generated ids ``row`` as the user gets it: up to and with its first
    end of turn, its text (``stream``'s, cut at a stop string) and why it ended."""
    end = next((i for i, t in enumerate(row) if t in eos), None)
    produced = list(row) if end is None else list(row[: end + 1])
    text, hit = stream.text_of(produced, final=True)
    return Generated(text, "stop" if end is not None or hit else "length", len(produced))
