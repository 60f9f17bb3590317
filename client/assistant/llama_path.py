"""The device answers through llama.cpp, with whatever adapters its torch model holds now.

The peft model stays what trains, evaluates and takes part in the federation; llama.cpp only
answers. :class:`LlamaPath` keeps them in step:

* **Base**: the embedded SmolLM2's shipped Q4_1 GGUF (the very weights the torch model is
  dequantized from); another Llama (the tests' tiny one, a local directory) is written once as
  a GGUF into the fedpersona cache (:func:`base_gguf`).
* **Adapters**: before each answer, the model's current LoRA tensors are read
  (:func:`common.gguf_lora.snapshot`, a few ms) and hashed. If llama.cpp holds that adapter it
  answers; if not — a federated round, a feedback step, a mix weight or an expert mix changed
  them — the adapter is converted and loaded **off the request path**, on one worker thread,
  and until it is ready the torch model answers and the log says so. An adapter holds the
  user's personal tensors, so it never touches the disk: it is written into an anonymous
  in-memory file (``memfd``) that llama.cpp reads by its ``/proc`` path.
* **Parity**: at start, on fixed texts, the next-token distributions of llama.cpp and of the
  torch fp32 model with the same adapters must agree — mean KL below :data:`PARITY_KL` — or
  the device answers through torch and logs why (as for a GGUF or adapter that does not load,
  an adapter made for another base, or a missing native library).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from common.generation import Generated, eos_ids
from common.gguf_lora import GGUFError, Snapshot, snapshot, snapshot_id, write_adapter, write_base
from common.llama_serving import LlamaEngine, LlamaUnavailable, Sampling
from common.model import cache_dir, gguf_path, model_dir
from common.serving import PARITY_TEXT, mean_kl, reference_logprobs

log = logging.getLogger(__name__)

ENGINES = ("auto", "llama.cpp", "torch")
# llama.cpp answers only if the mean KL(torch fp32 ‖ llama.cpp) of next-token distributions
# over the parity texts is below this (nats per token). What remains on the embedded SmolLM2 is
# llama.cpp's own arithmetic — it rounds activations to 8 bits for the 4-bit matrix products:
# measured 0.0039 without adapters and 0.0030–0.0036 with random ones. The bound catches a wrong
# base, tokenizer or broken adapter; it is too coarse for a subtle conversion error on a 4-bit
# base (a q_proj without llama.cpp's row permutation: 0.005–0.010 there), which the tests rule
# out on an F32 base instead (1e-7 converted right, 1e-2 without the permutation).
PARITY_KL = 0.01
PARITY_CHAT = [
    {"role": "system", "content": "You are a helpful personal assistant. Be concise."},
    {"role": "user", "content": "What should I cook tonight with mushrooms and rice?"},
]
KEEP_ADAPTERS = 4  # adapters held at once (the A/B test alternates two)


class ParityError(RuntimeError):
    """llama.cpp's answers differ from the torch model's beyond :data:`PARITY_KL`."""


def base_gguf(name: str) -> Path:
    """The GGUF llama.cpp answers with for ``model.name``: the shipped one for ``smollm2``,
    else the model written once into the fedpersona cache (F32 for ``tiny``, F16 otherwise).

    Raises:
        GGUFError: A model that is not a Llama.
    """
    if name == "smollm2":
        return gguf_path()
    source = model_dir(name)
    digest = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{'tiny' if name == 'tiny' else 'local'}-{digest}.gguf"
    if target.is_file():
        return target
    from transformers import AutoModelForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(source), dtype=torch.float32, local_files_only=True
    )
    log.info("writing %s as a GGUF for llama.cpp (once): %s", name, target)
    return write_base(model, target, gguf_path(), f16=name != "tiny")


@contextlib.contextmanager
def _memory_file(name: str) -> Iterator[Path]:
    """A path to an anonymous in-memory file (Linux ``memfd``), or where there is none a file
    in a private temporary folder, removed on exit."""
    if hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir():
        fd = os.memfd_create(name)
        try:
            yield Path(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
    else:
        with tempfile.TemporaryDirectory(prefix="fedpersona-") as tmp:
            yield Path(tmp) / name


class LlamaPath:
    """llama.cpp answering with the peft ``model``'s current adapters (see the module doc).

    Args:
        model, tokenizer: The device's torch model (the source of adapters) and tokenizer.
        engine: The llama.cpp engine over the matching base GGUF.
    """

    def __init__(self, model: Any, tokenizer: Any, engine: LlamaEngine) -> None:
        self.model, self.tokenizer, self.engine = model, tokenizer, engine
        self.eos = eos_ids(model, tokenizer)
        top_k = getattr(model.generation_config, "top_k", None)
        self.top_k = 50 if top_k is None else int(top_k)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-adapters")
        self._pending: dict[str, Future[None]] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()
        self._guard = threading.Lock()
        self.kl: float | None = None
        self.latest: str | None = None  # the adapter of the model's tensors when last seen
        self.failed: str | None = None  # why a conversion failed: the torch model answers
        self._refused: set[str] = set()  # adapters llama.cpp could not take

    @classmethod
    def open(cls, model: Any, tokenizer: Any, name: str, *, n_ctx: int) -> LlamaPath:
        """The llama.cpp path for ``model`` (``model.name`` ``name``), parity-checked.

        Raises:
            LlamaUnavailable, GGUFError, ParityError: llama.cpp cannot answer for this model.
        """
        if next(model.parameters()).device.type != "cpu":
            raise LlamaUnavailable("the model is on a GPU: transformers answers there")
        path = cls(model, tokenizer, LlamaEngine(base_gguf(name), n_ctx=n_ctx))
        try:
            path.kl = path.parity()
        except Exception:
            path.close()
            raise
        return path

    # ---- adapters -------------------------------------------------------------------------

    def _load(self, key: str, snap: Snapshot) -> None:
        with _memory_file(f"fedpersona-adapter-{key}") as file:
            write_adapter(file, snap, self.engine.facts)
            self.engine.add_adapter(key, file)

    def _convert(self, key: str, snap: Snapshot) -> None:
        try:
            self._load(key, snap)
            self._remember(key)
            log.info("llama.cpp: adapter %s ready", key[:12])
        except (GGUFError, OSError) as err:
            self.failed = str(err)
            with self._guard:
                self._refused.add(key)  # not tried again for the same tensors
            log.warning("llama.cpp cannot take this adapter (%s); torch answers", err)
        finally:
            with self._guard:
                self._pending.pop(key, None)

    def _remember(self, key: str) -> None:
        """``key`` was just used or loaded: keep it, free the least recently used beyond
        :data:`KEEP_ADAPTERS`."""
        with self._guard:
            self._lru[key] = None
            self._lru.move_to_end(key)
            while len(self._lru) > KEEP_ADAPTERS:
                self._lru.popitem(last=False)
            keep = set(self._lru)
        self.engine.drop_adapters(keep)

    def ready(self) -> str | None:
        """The loaded adapter for the model's tensors now, or ``None`` while it is converted
        (started here, off the request path, if it was not already)."""
        if self.engine.closed:
            return None  # its runtime was replaced (another model in this process): torch answers
        snap = snapshot(self.model)
        key = self.latest = snapshot_id(snap)
        if self.engine.has(key):
            self._remember(key)
            return key
        with self._guard:
            if key in self._refused:
                return None
            if key not in self._pending:
                self._pending[key] = self._worker.submit(self._convert, key, snap)
        log.info(
            "llama.cpp: the adapters changed; converting %s off the request path, torch answers "
            "until it is ready",
            key[:12],
        )
        return None

    def warm(self, ids: list[int]) -> None:
        """Compute ``ids`` — how the next prompt begins: the user's system prompt — under the
        adapter :meth:`ready` saw last, on the worker thread (after the conversion it may
        wait for): the next request computes only what follows."""
        key = self.latest
        if key is None or self.engine.closed or not ids:
            return
        with self._guard:
            self._pending[f"warm-{key}"] = self._worker.submit(self._warm, key, ids)

    def _warm(self, key: str, ids: list[int]) -> None:
        try:
            self.engine.warm(ids, adapter=key)
        except (LlamaUnavailable, ValueError) as err:  # a failed warm-up costs only time
            log.warning("llama.cpp: warming the system prompt failed (%s)", err)
        finally:
            with self._guard:
                self._pending.pop(f"warm-{key}", None)

    def wait(self, timeout: float = 60.0) -> None:
        """Block until the conversions started so far are done (tests, benchmarks, start-up)."""
        with self._guard:
            pending = list(self._pending.values())
        for fut in pending:
            fut.result(timeout=timeout)

    # ---- answering ------------------------------------------------------------------------

    def parity(self) -> float:
        """Mean KL(torch fp32 ‖ llama.cpp) over the parity texts with the current adapters.

        Raises:
            ParityError: At or above :data:`PARITY_KL`.
        """
        snap = snapshot(self.model)
        key = snapshot_id(snap)
        self._load(key, snap)
        self._remember(key)
        texts = [
            self.tokenizer(PARITY_TEXT)["input_ids"],
            self.tokenizer.apply_chat_template(PARITY_CHAT, tokenize=True, return_dict=True)[
                "input_ids"
            ],
        ]
        kls = []
        for ids in texts:
            ref = reference_logprobs(self.model, torch.tensor([ids]))[0]
            got = torch.from_numpy(self.engine.logits(ids, adapter=key)).float().log_softmax(-1)
            kls.append(mean_kl(ref, got))
        kl = sum(kls) / len(kls)
        if not kl < PARITY_KL:
            raise ParityError(
                f"llama.cpp's next-token distributions differ from torch's "
                f"(KL {kl:.4f} ≥ {PARITY_KL})"
            )
        return kl

    def generate(
        self, key: str, prompt_ids: list[int], *, temperature: float, **options: Any
    ) -> list[Generated]:
        """Sample with the adapter ``key`` (:meth:`ready`'s); options as
        :meth:`common.llama_serving.LlamaEngine.sample`'s."""
        sampling = Sampling(
            temperature=temperature, top_k=self.top_k, top_p=options.pop("top_p", 0.95)
        )
        return self.engine.sample(
            prompt_ids,
            adapter=key,
            tokenizer=self.tokenizer,
            eos=self.eos,
            sampling=sampling,
            **options,
        )

    def answer(
        self, prompt_ids: list[int], *, n: int, max_new_tokens: int, on_text: Any = None, **kw: Any
    ) -> list[Generated] | None:
        """The answer through llama.cpp with the model's adapters now, or ``None`` where torch
        must answer (the log says why): the adapters are still converting, the candidates do
        not fit the context's cells, or llama.cpp failed before anything was streamed."""
        key = self.ready()
        if key is None:
            return None
        if not self.engine.fits(len(prompt_ids), n, max_new_tokens):
            log.info(
                "llama.cpp: %d prompt tokens and %d × %d new ones exceed its %d cells; "
                "torch answers",
                len(prompt_ids), n, max_new_tokens, self.engine.n_ctx,
            )  # fmt: skip
            return None
        streamed: list[str] = []

        def tee(piece: str) -> None:
            streamed.append(piece)
            on_text(piece)

        try:
            return self.generate(
                key, prompt_ids, n=n, max_new_tokens=max_new_tokens,
                on_text=None if on_text is None else tee, **kw,
            )  # fmt: skip
        except LlamaUnavailable as err:
            if streamed:  # the user already has part of this answer: no second one
                raise
            log.warning("llama.cpp failed (%s); torch answers", err)
            return None

    def close(self) -> None:
        """Stop the conversion worker and free llama.cpp's memory."""
        self._worker.shutdown(wait=True)
        self.engine.close()


def open_runtime(cfg: Any, *, engine: str, precision: str) -> tuple[Any, LlamaPath | None]:
    """The assistant's runtime and, where llama.cpp answers, its :class:`LlamaPath`.

    ``engine``: ``auto`` — llama.cpp on a CPU whenever it loads and passes parity, else the
    torch path at ``precision`` (the bf16 copy or fp32), the reason logged; ``llama.cpp`` —
    the same, but a failure is raised; ``torch`` — never llama.cpp.

    Raises:
        ValueError: An unknown ``engine``.
        LlamaUnavailable, GGUFError, ParityError: ``engine="llama.cpp"`` and it cannot answer.
    """
    from client.federation.runtime import get_runtime
    from common.model import select_device

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine != "torch" and select_device()[0].type == "cpu":
        # The torch model stays fp32: it is parity's reference and answers while adapters convert.
        rt = get_runtime(cfg, serving="float32")
        llama = rt.llama
        if llama is None:
            try:
                llama = LlamaPath.open(
                    rt.model,
                    rt.tokenizer,
                    cfg.model.name,
                    n_ctx=int(rt.model.config.max_position_embeddings),
                )
            except (LlamaUnavailable, GGUFError, ParityError, OSError) as err:
                if engine == "llama.cpp":
                    raise
                log.warning("llama.cpp cannot answer on this device (%s); torch answers", err)
            else:
                log.info("answering through llama.cpp (KL to torch fp32 %.5f nats/token)", llama.kl)
                rt.llama = llama
        if llama is not None:
            return rt, llama
    return get_runtime(cfg, serving=precision), None
