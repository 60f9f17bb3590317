"""Answering through llama.cpp: a GGUF base with LoRA adapters applied at run time.

Decoding one token on a CPU reads every weight once, so it is bound by memory bandwidth: the
embedded SmolLM2 is 270 MB a step in bf16 but ~93 MB as its shipped Q4_1 GGUF, which llama.cpp
multiplies in place (``llama-cpp-python``'s C API, through ctypes; none of its Python layer).

:class:`LlamaEngine` holds one model and one context and samples like
:func:`common.generation.sample`, on token ids (the caller's tokenizer renders and decodes, so
prompts, stop strings and streaming are the same as on the torch path):

* the ``n`` candidates of a prompt are ``n`` sequences decoded **in one batch** per step, over
  the prompt's KV cells computed once and shared (``kv_unified``): one pass over the weights per
  step, as the torch path's batch;
* the prompt's cells stay in sequence 0 for the next request: a conversation's system prompt
  and earlier turns are not computed again (a change of adapters clears them);
* sampling is transformers' — temperature, top-k (the model's ``generation_config``, 50 by
  default), top-p, no end of turn before ``min_new_tokens`` — in NumPy from llama.cpp's
  logits, seeded; each candidate ends at its own end of turn or stop string.

Adapters are llama.cpp LoRA adapters written by :mod:`common.gguf_lora`; :meth:`add_adapter`
loads one (checked against this base), :meth:`use` selects it for the next answers.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.generation import Generated, TextStream, finished
from common.gguf_lora import BaseFacts, GGUFError, base_facts, check_adapter

log = logging.getLogger(__name__)

BATCH = 128  # tokens per llama_decode call while reading a prompt (its logits buffer: 25 MB)


class LlamaUnavailable(RuntimeError):
    """llama.cpp cannot answer here: the library, the model or a context would not load."""


def load_library() -> Any:
    """The ``llama_cpp`` module, its backend initialized and its log quiet (warnings only).

    Raises:
        LlamaUnavailable: ``llama-cpp-python`` or its native library is missing.
    """
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError) as err:  # the package, or its shared library
        raise LlamaUnavailable(f"llama-cpp-python is not usable here: {err}") from err
    if not getattr(load_library, "_done", False):
        # llama-cpp-python prints llama.cpp's log to stderr at its logger's level: errors only
        # (what fails here is raised with its reason).
        logger = logging.getLogger("llama-cpp-python")
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.ERROR)
        llama_cpp.llama_backend_init()
        load_library._done = True  # type: ignore[attr-defined]
    return llama_cpp


@dataclass(frozen=True)
class Sampling:
    """How candidates are drawn (transformers' order: temperature, top-k, top-p)."""

    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95


def candidates(
    logits: np.ndarray, s: Sampling, banned: Sequence[int] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """The tokens transformers could sample from ``logits`` and their probabilities: scaled
    by the temperature, the ``top_k`` largest, then the smallest set whose mass reaches
    ``top_p`` (at least one); ``banned`` tokens never."""
    x = logits.astype(np.float64) / s.temperature
    if len(banned):
        x[list(banned)] = -np.inf
    k = s.top_k if 0 < s.top_k < x.size else x.size
    top = np.argpartition(-x, k - 1)[:k] if k < x.size else np.arange(x.size)
    top = top[np.argsort(-x[top], kind="stable")]
    p = np.exp(x[top] - x[top[0]])
    p /= p.sum()
    # transformers drops a token when the mass of those above it already reaches top_p
    keep = max(1, int(np.sum(np.cumsum(p) - p < s.top_p)))
    return top[:keep], p[:keep] / p[:keep].sum()


def pick(
    logits: np.ndarray, rng: np.random.Generator, s: Sampling, banned: Sequence[int] = ()
) -> int:
    """One token sampled from ``logits`` as transformers samples it (:func:`candidates`)."""
    ids, p = candidates(logits, s, banned)
    return int(ids[rng.choice(len(ids), p=p)])


class LlamaEngine:
    """One llama.cpp model and context, answering ``n`` candidates per prompt in one batch.

    Args:
        path: The base GGUF.
        n_ctx: Context size (prompt + answer), shared by the candidates.
        n_seq: The most candidates per prompt.
        threads: CPU threads (default: the cores this process may use).

    Raises:
        LlamaUnavailable: The library is missing or the model or context do not load.
        GGUFError: ``path`` is not a Llama GGUF.
    """

    def __init__(self, path: Path, *, n_ctx: int, n_seq: int = 8, threads: int | None = None):
        self.lib = lib = load_library()
        self.facts: BaseFacts = base_facts(path)
        self.threads = threads or len(os.sched_getaffinity(0))
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise LlamaUnavailable(f"llama.cpp could not load the model {path}")
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        cparams = lib.llama_context_default_params()
        self.n_ctx = min(n_ctx, self.facts.n_ctx_train)
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = self.n_ctx, BATCH, BATCH
        cparams.n_seq_max, cparams.kv_unified, cparams.no_perf = n_seq, True, True
        cparams.n_threads = cparams.n_threads_batch = self.threads
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise LlamaUnavailable(f"llama.cpp could not make a context of {self.n_ctx} tokens")
        self.n_seq = n_seq
        self.mem = lib.llama_get_memory(self.ctx)
        self.batch = lib.llama_batch_init(BATCH, 0, n_seq)
        self.weight_bytes = int(lib.llama_model_size(self.model))
        self.lock = threading.Lock()  # one decode at a time on the context
        self._adapters: dict[str, Any] = {}  # id -> llama_adapter_lora
        self.active: str | None = None
        self._cached: list[int] = []  # tokens whose cells sit in sequence 0, under ``active``

    # ---- adapters -------------------------------------------------------------------------

    def add_adapter(self, key: str, path: Path) -> None:
        """Load the adapter file at ``path`` as ``key`` (this base's, :func:`check_adapter`).

        Raises:
            GGUFError: Not an adapter for this base, or llama.cpp refuses it (its shapes).
        """
        check_adapter(path, self.facts)
        with self.lock:
            if key in self._adapters:
                return
            handle = self.lib.llama_adapter_lora_init(self.model, str(path).encode())
            if not handle:
                raise GGUFError(
                    f"llama.cpp could not load the adapter {path} for {self.facts.path.name}"
                )
            self._adapters[key] = handle

    def has(self, key: str) -> bool:
        """Whether the adapter ``key`` is loaded."""
        return key in self._adapters

    def drop_adapters(self, keep: set[str]) -> None:
        """Free the adapters not in ``keep`` (and not active)."""
        with self.lock:
            for key in [k for k in self._adapters if k not in keep and k != self.active]:
                self.lib.llama_adapter_lora_free(self._adapters.pop(key))

    def forget(self) -> None:
        """Drop every computed cell: the next prompt is computed from nothing."""
        with self.lock:
            self.lib.llama_memory_clear(self.mem, False)
            self._cached = []

    def use(self, key: str | None) -> None:
        """Answer with the adapter ``key`` (``None``: the bare base) from the next decode on."""
        with self.lock:
            self._use(key)

    def _use(self, key: str | None) -> None:
        if key == self.active:
            return
        if key is not None and key not in self._adapters:
            raise LlamaUnavailable(f"the adapter {key} is no longer loaded")
        arr = (self.lib.llama_adapter_lora_p_ctypes * 1)(self._adapters[key]) if key else None
        scales = (ctypes.c_float * 1)(1.0) if key else None
        self.lib.llama_set_adapters_lora(self.ctx, arr, 1 if key else 0, scales)
        self.lib.llama_memory_clear(self.mem, False)  # cells computed under other weights
        self._cached = []
        self.active = key

    def fits(self, prompt: int, n: int, max_new_tokens: int) -> bool:
        """Whether ``n`` candidates of ``max_new_tokens`` after a ``prompt``-token prompt fit
        the context's cells (the candidates share the prompt's)."""
        return 1 <= n <= self.n_seq and prompt + n * max_new_tokens <= self.n_ctx

    # ---- decoding -------------------------------------------------------------------------

    def _decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of ``(token, position, sequence, logits?)`` entries."""
        b = self.batch
        for i, (tok, pos, seq, out) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
            b.seq_id[i][0], b.logits[i] = seq, out
        b.n_tokens = len(entries)
        rc = self.lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise LlamaUnavailable(f"llama_decode failed ({rc}): the context may be full")

    def _row(self, i: int) -> np.ndarray:
        ptr = self.lib.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def _prompt(self, ids: Sequence[int], *, all_logits: bool = False) -> list[np.ndarray]:
        """Put ``ids`` in sequence 0 (reusing the cells of a shared prefix; the other
        sequences cleared); return the last position's logits (or every position's)."""
        if not ids:
            raise ValueError("an empty prompt")
        if len(ids) >= self.n_ctx:
            raise ValueError(f"the prompt has {len(ids)} tokens; the context holds {self.n_ctx}")
        same = 0 if all_logits else common_prefix(self._cached, ids, limit=len(ids) - 1)
        self.lib.llama_memory_seq_rm(self.mem, 0, same, -1)
        for s in range(1, self.n_seq):
            self.lib.llama_memory_seq_rm(self.mem, s, -1, -1)
        self._cached = list(ids[:same])
        rows: list[np.ndarray] = []
        for start in range(same, len(ids), BATCH):
            chunk = ids[start : start + BATCH]
            last = start + len(chunk) == len(ids)
            self._decode(
                [
                    (t, start + j, 0, all_logits or (last and j == len(chunk) - 1))
                    for j, t in enumerate(chunk)
                ]
            )
            if all_logits:
                rows += [self._row(j) for j in range(len(chunk))]
            self._cached += list(chunk)
        return rows if all_logits else [self._row(self.batch.n_tokens - 1)]

    def logits(self, ids: Sequence[int], *, adapter: str | None) -> np.ndarray:
        """Next-token logits at every position of ``ids`` under ``adapter`` (parity checks)."""
        with self.lock:
            self._use(adapter)
            return np.stack(self._prompt(ids, all_logits=True))

    def warm(self, ids: Sequence[int], *, adapter: str | None) -> None:
        """Compute ``ids``' cells under ``adapter`` ahead of a prompt that begins with them
        (the user's system prompt, while the device is idle)."""
        with self.lock:
            if not self.closed and (adapter is None or adapter in self._adapters):
                self._use(adapter)
                self._prompt(ids)

    def sample(
        self,
        prompt: Sequence[int],
        *,
        adapter: str | None,
        tokenizer: Any,
        eos: set[int],
        n: int = 1,
        max_new_tokens: int,
        min_new_tokens: int = 0,
        sampling: Sampling = Sampling(),
        seed: int | None = None,
        stop: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> list[Generated]:
        """``n`` sampled completions of ``prompt`` under ``adapter`` (as
        :func:`common.generation.sample` for one prompt; ``on_text`` streams when ``n == 1``).

        Raises:
            ValueError: ``n`` above the engine's sequences, or a prompt that leaves no room.
        """
        if not 1 <= n <= self.n_seq:
            raise ValueError(f"n must be 1..{self.n_seq}")
        if not self.fits(len(prompt), n, max_new_tokens):
            raise ValueError(
                f"{len(prompt)} + {n} × {max_new_tokens} tokens exceed the context ({self.n_ctx})"
            )
        rng = np.random.default_rng(seed)
        streams = [
            TextStream(tokenizer, stop=stop, on_text=on_text if n == 1 else None) for _ in range(n)
        ]
        with self.lock:
            self._use(adapter)
            first = self._prompt(prompt)[0]
            for s in range(1, n):
                self.lib.llama_memory_seq_cp(self.mem, 0, s, 0, len(prompt))
            rows: list[list[int]] = [[] for _ in range(n)]
            logits = dict.fromkeys(range(n), first)
            live = list(range(n))
            while live:
                banned = sorted(eos) if len(rows[live[0]]) < min_new_tokens else []
                for r in live:
                    tok = pick(logits[r], rng, sampling, banned)
                    rows[r].append(tok)
                    streams[r].add([tok])
                live = [
                    r
                    for r in live
                    if rows[r][-1] not in eos
                    and not streams[r].stopped
                    and len(rows[r]) < max_new_tokens
                ]
                if cancel is not None and cancel.is_set():
                    live = []
                if live:
                    pos = len(prompt) + len(rows[live[0]]) - 1
                    self._decode([(rows[r][-1], pos, r, True) for r in live])
                    logits = {r: self._row(j) for j, r in enumerate(live)}
        for st in streams:
            st.end()
        return [finished(row, streams[i], eos) for i, row in enumerate(rows)]

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` freed the engine."""
        return self.ctx is None

    def close(self) -> None:
        """Free the context, the adapters and the model."""
        with self.lock:
            if self.ctx:
                self.lib.llama_batch_free(self.batch)
                self.lib.llama_free(self.ctx)
                for handle in self._adapters.values():
                    self.lib.llama_adapter_lora_free(handle)
                self.lib.llama_model_free(self.model)
                self.ctx = self.model = None
                self._adapters.clear()


def common_prefix(a: Sequence[int], b: Sequence[int], *, limit: int | None = None) -> int:
    """How many leading tokens ``a`` and ``b`` share (at most ``limit``)."""
    n = 0
    for x, y in zip(a, b[:limit], strict=False):
        if x != y:
            break
        n += 1
    return n
