"""The user's personal assistant on the device: ask, feedback, profile, status, budget.

:class:`Assistant` ties the pieces together over one open :class:`~client.store.LocalStore`:
the profile (:mod:`client.assistant.profile`), the personalization engine
(:mod:`client.assistant.engine`), the adaptation machinery (:mod:`client.assistant.adapt`) and the
base model + LoRA runtime shared with the Flower ClientApp
(:func:`client.federation.runtime.get_runtime`). The CLI (:mod:`client.cli`) and the local HTTP API
(:mod:`client.api.app`) are thin layers over it.

The device's model settings (base model, LoRA, strategy, privacy caps) live in the store's
``settings`` blob: written by ``device init`` and refreshed by the ClientApp whenever the
device takes part in a federation, so the assistant always composes the same adapters the
federation trained.

(One file on purpose, over the usual length: asking is one path — retrieval, prompt, the answering
model's choice, generation, reranking, storing — over the model state it swaps. Feedback is in
client/assistant/feedback.py, experts in client/assistant/experts.py, the conversation in
client/assistant/conversation.py.)
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.assistant.adapt import GraphedAdapter, hot_swap
from client.assistant.conversation import (
    Answer,
    UnknownModel,
    fit_messages,
    split_conversation,
)
from client.assistant.engine import Retrieved, build_messages, rerank, retrieve
from client.assistant.evidence import choose_variant
from client.assistant.experts import ExpertRouter, install, load_router
from client.assistant.feedback import FeedbackLearning
from client.assistant.llama_path import LlamaPath, open_runtime
from client.assistant.profile import Profile, extract_context
from client.federation.runtime import Runtime
from client.store import LocalStore
from client.store import status as device_status
from common import ab
from common.embedding import Embedder, get_embedder, user_embedding
from common.generation import Generated, render, sample
from common.llama_serving import common_prefix
from common.lora import export_adapter
from common.pii import scrub

logger = logging.getLogger(__name__)
# The parts of an answer's time (Answer.timings_ms), in order.
STEPS = ("prepare", "generate", "rerank_store")


@dataclass
class _Prepared:
    """One request, ready to answer (:meth:`Assistant._prepare`)."""

    clean: str  # the request PII-scrubbed: what is stored and embedded
    context: dict[str, Any]
    query: np.ndarray  # its embedding
    history: list[Retrieved]  # the past interactions it recalls
    messages: list[dict[str, str]]  # what the model sees
    prompt_ids: list[int]


class Assistant(FeedbackLearning):
    """A personalized assistant over one device store.

    Args:
        store: The open device store (set up by :func:`client.store.state.init_device` or by a
            federation).
        embedder: Sentence embedder (default: the process-wide all-MiniLM-L6-v2).
        feedback_steps: Gradient steps per feedback.
        feedback_lr: SGD learning rate of feedback adaptation.
        feedback_layers: Feedback trains the personal tensors of this many top decoder
            layers (the layers below run once per feedback; ``None``: all layers).
        ab_test: Take part in the federated A/B test: each answer comes from the personal or
            the global model by a coin flip, and its rating is reported as a secure sum.
        precision: ``auto``, ``float32`` or ``bfloat16``: whether torch answers from a bf16
            copy of the model (:func:`common.serving.serving_model`; on a CPU only); default:
            the device's ``train.precision``.
        engine: ``auto``, ``llama.cpp`` or ``torch``: what answers on a CPU
            (:func:`client.assistant.llama_path.open_runtime`); default: ``$FEDPERSONA_ENGINE``,
            else ``auto`` (llama.cpp where it loads and agrees with torch).
    """

    def __init__(
        self,
        store: LocalStore,
        *,
        embedder: Embedder | None = None,
        feedback_steps: int = 3,
        feedback_lr: float = 0.05,
        feedback_layers: int | None = 4,
        ab_test: bool = False,
        precision: str | None = None,
        engine: str | None = None,
    ) -> None:
        self.store = store
        self.ab_test = ab_test
        self.lock = threading.RLock()  # one generation / adaptation at a time
        self.cfg = device_status.load_settings(store)
        # Answers come from llama.cpp on a CPU; else from a bf16 copy where the CPU has native
        # bf16 (client.federation.runtime), else from the model itself.
        self.engine = engine or os.environ.get("FEDPERSONA_ENGINE") or "auto"
        self.rt: Runtime
        self.llama: LlamaPath | None
        self.rt, self.llama = open_runtime(
            self.cfg, engine=self.engine, precision=precision or self.cfg.train.precision
        )
        self.served = self.rt.served
        self.state = device_status.open_state(store, self.cfg)
        self.embedder = embedder or get_embedder()
        self.profile = Profile.from_dict(store.get_profile() or {})
        self.feedback_steps = feedback_steps
        self.feedback_lr = feedback_lr
        self.feedback_layers = feedback_layers
        self.gate, self.drift = device_status.load_evidence(store, self.state)
        self.router = self._load_router()
        self._graphed: GraphedAdapter | bool | None = None
        self.variant = ""
        # Prompt + answer must fit the model's positions; tests shrink it to see turns dropped.
        self.context_tokens = int(self.rt.model.config.max_position_embeddings)
        self.activate()
        if self.llama is not None:  # start-up: the first answer already comes from llama.cpp
            self.llama.wait()

    # ---- model state --------------------------------------------------------------------

    @property
    def pad_id(self) -> int:
        """Padding token id."""
        return int(self.rt.tokenizer.pad_token_id)

    def global_tensors(self) -> dict[str, torch.Tensor]:
        """What a newcomer gets from the federation's last global shared tensors (the
        strategy's :meth:`~common.personalization.base.Strategy.newcomer`)."""
        return self.rt.strategy.newcomer(self.rt.init, self.state.load_global())

    def personal_tensors(self, *, mix_weight: float | None = None) -> dict[str, torch.Tensor]:
        """The global tensors overlaid by this device's personal ones; for ``blend``, the
        global adapter weighted by ``mix_weight`` (default: the weight the device picked on its
        held-out data, 0 before any)."""
        w = self.state.meta.mix_weight if mix_weight is None else mix_weight
        return self.rt.strategy.served(
            self.rt.init, self.state.load_global(), self.state.load_personal(), weight=w
        )

    def activate(self) -> str:
        """Hot-swap in the model the gate chooses; return its name.

        ``personal`` once evidence favours it; else ``experts`` (the router's mix over the
        global model) when expert adapters are installed; else ``global`` (cold start).
        """
        variant = choose_variant(self.gate, has_experts=self.router is not None)
        if variant == "personal":
            tensors = self.personal_tensors()
        elif variant == "experts":
            assert self.router is not None
            tensors = {**self.global_tensors(), **self.router.mix(self.user_vector())}
        else:
            tensors = self.global_tensors()
        if self.llama is not None:  # the other model a request may name, converted now too
            other = "global" if variant == "personal" else "personal"
            hot_swap(self.rt.model, self._tensors_for(other))
            self.llama.ready()
        self.swap_ms = hot_swap(self.rt.model, tensors)
        self.variant = variant
        if self.llama is not None:
            self.llama.ready()  # converts the new adapters now, before the next answer needs them
            self._warm_llama()
        return variant

    def _warm_llama(self) -> None:
        """Have llama.cpp compute the user's system prompt while idle (the next request
        computes only its own part: a first token in milliseconds, not a whole prefill)."""
        if self.llama is not None:
            context = extract_context(task=None)
            a, b = (
                render(self.rt.tokenizer, build_messages(self.profile, q, context=context))
                for q in ("a", "b")
            )
            self.llama.warm(a[: common_prefix(a, b)])  # the system prompt, a turn's opening

    def _catch_up(self) -> None:
        """Before a request: what retention expired is purged, and a round the device's
        worker committed meanwhile answers (:meth:`follow_rounds`)."""
        self.store.maybe_purge()
        self.follow_rounds()

    def follow_rounds(self) -> bool:
        """Take up what a federated round in the device's worker (another process, the same
        store) wrote since this assistant looked: the global and personal tensors, the mixing
        weight and the federation's held-out losses. Returns whether a round arrived (then the
        new model answers from this request on; llama.cpp once its adapter is converted)."""
        fresh = device_status.open_state(self.store, self.cfg)
        old, new = self.state.meta, fresh.meta
        if (new.last_round, new.mix_weight) == (old.last_round, old.mix_weight):
            return False
        self.state = fresh
        if new.personal_loss is not None and new.global_loss is not None:
            self.gate.federated = (new.personal_loss, new.global_loss)
        logger.info(
            "round %d arrived from the device's worker: its adapters answer now", new.last_round
        )
        self.activate()
        return True

    # ---- embeddings ---------------------------------------------------------------------

    def user_vector(self) -> np.ndarray:
        """The user's 384-d embedding (recency-weighted history + profile), on the device."""
        history = [
            (i.embedding, i.ts)
            for i in self.store.interactions(limit=500)
            if i.embedding is not None
        ]
        profile = self.embedder.encode_one(self.profile.describe())
        return user_embedding(history, profile=profile, now=time.time())

    # ---- asking -------------------------------------------------------------------------

    def why(self, variant: str | None = None) -> str:
        """Why ``variant`` (default: the active one) answers when the device decides."""
        variant = variant or self.variant
        evidence = self.gate.reason()
        if variant == "personal":
            return f"personal model: the evidence favours it ({evidence})"
        if variant == "experts":
            names = ", ".join(e.name for e in self.router.experts) if self.router else ""
            return (
                f"expert adapters ({names}) mixed for you until the personal model shows it "
                f"is better ({evidence})"
            )
        return f"global model: the personal model has not shown it is better yet ({evidence})"

    def variants(self) -> list[str]:
        """The models this device can answer with."""
        return ["personal", "global", *(["experts"] if self.router is not None else [])]

    def _tensors_for(self, variant: str) -> dict[str, torch.Tensor]:
        if variant == "personal":
            return self.personal_tensors()
        if variant == "experts":
            if self.router is None:
                raise UnknownModel("no expert adapters are installed on this device")
            return {**self.global_tensors(), **self.router.mix(self.user_vector())}
        if variant == "global":
            return self.global_tensors()
        raise UnknownModel(f"unknown model variant {variant!r}; this device has {self.variants()}")

    def fit_prompt(
        self,
        build: Callable[[Sequence[Retrieved], Sequence[dict[str, str]]], list[dict[str, str]]],
        history: Sequence[Retrieved],
        turns: Sequence[dict[str, str]],
        max_new_tokens: int,
    ) -> tuple[list[dict[str, str]], list[int]]:
        """The messages and prompt ids that fit the model's context with ``max_new_tokens``
        to spare: the oldest turns are dropped first, then the retrieved history.

        Raises:
            ContextTooLong: The system prompt and the last request alone do not fit.
        """
        return fit_messages(
            self.rt.tokenizer,
            build,
            history,
            turns,
            context_tokens=self.context_tokens,
            max_new_tokens=max_new_tokens,
        )

    def generate(
        self,
        prompt_ids: list[int],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float,
        seed: int | None,
        stop: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> list[Generated]:
        """``n`` sampled completions of ``prompt_ids`` under the loaded adapter
        (:func:`common.generation.sample`; ``on_text`` streams when ``n == 1``): through
        llama.cpp where it holds these adapters, else through torch."""
        options: dict[str, Any] = {
            "n": n,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "seed": seed,
            "stop": stop,
            "on_text": on_text,
            "cancel": cancel,
        }
        if self.llama is not None and (answer := self.llama.answer(prompt_ids, **options)):
            return answer
        model = self.rt.model if self.served is None else self.served.refresh()
        return sample(model, self.rt.tokenizer, [prompt_ids], **options)[0]

    def ask(
        self,
        request: str | Sequence[Mapping[str, str]],
        *,
        n: int = 3,
        max_new_tokens: int = 64,
        temperature: float = 0.8,
        task: str | None = None,
        seed: int | None = None,
        system: str | None = None,
        model: str | None = None,
        stop: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Answer:
        """Answer the user's request in their preferred way and remember the exchange.

        The conversation reaches the local model as the user wrote it (rendered with the
        model's chat template after the personalized system prompt); the store keeps the last
        request and the answer PII-scrubbed.

        Args:
            request: The user's request, or the whole conversation as chat messages
                (``system``/``developer``/``user``/``assistant``; the last one from the user).
            n, max_new_tokens, temperature: Candidates to sample and rerank, the length limit
                of each, the sampling temperature.
            task, seed: The user's current task/app (context); a seed for reproducible answers.
            system: The caller's own system instructions, after the personalized prompt.
            model: ``personal``, ``global`` or ``experts`` to choose the model; ``None``: the
                device decides (the cold-start gate, or the A/B coin when the test is on).
            stop: Strings that end the answer (not included).
            on_text: Called with each new piece of the answer as it is generated (``n == 1``)
                or once with the chosen answer (``n > 1``, after reranking).
            cancel: Set it to end generation early (e.g. the client went away).

        Raises:
            ValueError: An empty request or bad sampling arguments.
            ContextTooLong: The request does not fit the model's context.
            UnknownModel: A ``model`` this device does not have.
        """
        turns, last, extra = split_conversation(request)
        system = "\n".join(s for s in (extra, system) if s) or None
        sampling = self._sampling(n, max_new_tokens, temperature, model)
        with self.lock:
            marks = [time.perf_counter()]
            self._catch_up()
            ready = self._prepare(last, turns, task=task, system=system, room=max_new_tokens)
            marks.append(time.perf_counter())
            variant, why, stored_variant = self._choose_model(model)
            generated = self._generate_with(
                variant,
                ready.prompt_ids,
                sampling,
                seed=seed,
                stop=stop,
                on_text=on_text,
                cancel=cancel,
            )
            marks.append(time.perf_counter())
            ranked = self._rerank(generated, ready, system)
            if on_text is not None and n > 1:
                on_text(ranked[0].text)
            interaction_id = self._remember(ready, ranked[0].text, stored_variant)
            marks.append(time.perf_counter())
        return Answer(
            interaction_id=interaction_id,
            text=ranked[0].text,
            variant=variant,
            candidates=[{"text": s.text, "score": s.score, "parts": s.parts} for s in ranked],
            retrieved=[r.interaction.id for r in ready.history],
            context=ready.context,
            why=why,
            finish_reason=generated[ranked[0].index].finish_reason,
            prompt_tokens=len(ready.prompt_ids),
            completion_tokens=sum(g.tokens for g in generated),
            turns_used=len(ready.messages) - 2,
            timings_ms={
                step: (b - a) * 1000 for step, (a, b) in zip(STEPS, pairwise(marks), strict=True)
            },
        )

    def _sampling(
        self, n: int, max_new_tokens: int, temperature: float, model: str | None
    ) -> dict[str, Any]:
        """The sampling arguments of :meth:`ask`, checked (and its ``model``).

        Raises:
            ValueError: Bad sampling arguments.
            UnknownModel: A ``model`` this device does not have.
        """
        if not 1 <= n <= 8 or not 1 <= max_new_tokens <= 1024 or temperature <= 0:
            raise ValueError("need 1 <= n <= 8, 1 <= max_new_tokens <= 1024, temperature > 0")
        if model is not None and model not in ("personal", "global", "experts"):
            raise UnknownModel(f"unknown model {model!r}; this device has {self.variants()}")
        return {"n": n, "max_new_tokens": max_new_tokens, "temperature": temperature}

    def _remember(self, ready: _Prepared, answer: str, variant: str | None) -> int:
        """Keep the exchange (the request scrubbed, its embedding, the answer and the A/B
        variant that gave it); return the interaction's id."""
        return self.store.add_interaction(
            ready.clean, answer, context=ready.context, embedding=ready.query, variant=variant
        )

    def _prepare(
        self,
        last: str,
        turns: list[dict[str, str]],
        *,
        task: str | None,
        system: str | None,
        room: int,
    ) -> _Prepared:
        """The request scrubbed and embedded, the interactions it recalls (with what the user
        endorsed) and the prompt that fits the context with ``room`` tokens to answer."""
        clean = scrub(last)  # what may be stored or embedded; the model sees ``last``
        context = extract_context(task=task)
        query = self.embedder.encode_one(clean)
        history = retrieve(query, self.store.interactions(limit=500))
        for r in history:
            r.endorsed = self._endorsed(r.interaction)
        messages, prompt_ids = self.fit_prompt(
            lambda hist, kept: build_messages(
                self.profile, last, context=context, history=hist, turns=kept, system=system
            ),
            history,
            turns,
            room,
        )
        return _Prepared(clean, context, query, history, messages, prompt_ids)

    def _rerank(
        self, generated: list[Generated], ready: _Prepared, system: str | None
    ) -> list[Any]:
        """The candidates ranked for this user (their profile, the request, and not echoing
        what the conversation already said)."""
        texts = [g.text for g in generated]
        known = "\n".join(
            [m["content"] for m in ready.messages[1:] if m["role"] == "user"] + [system or ""]
        )
        return rerank(
            texts, self.embedder.encode(texts), query=ready.query, profile=self.profile, known=known
        )

    def _choose_model(self, model: str | None) -> tuple[str, str, str | None]:
        """``(variant, why, variant kept with the interaction)`` for one answer: the model
        asked for; else, with the federated A/B test on, a coin's pick (the user's rating of
        it is counted, as a secure sum, in the next round); else the gate's choice."""
        if model is not None:
            return model, f"you asked for the {model} model", None
        if self.ab_test:
            variant = secrets.choice(ab.ARMS)
            return variant, f"A/B test: a coin chose the {variant} model for this answer", variant
        return self.variant, self.why(), self.variant

    def _generate_with(
        self,
        variant: str,
        prompt_ids: list[int],
        sampling: dict[str, Any],
        **options: Any,
    ) -> list[Any]:
        """Generate under ``variant``'s tensors, hot-swapped in for this answer only (the
        active model is back in place afterwards, whatever happens)."""
        swapped = variant != self.variant or self.ab_test
        if swapped:
            hot_swap(self.rt.model, self._tensors_for(variant))
        try:
            return self.generate(prompt_ids, **sampling, **options)
        finally:
            if swapped:
                self.activate()

    # ---- profile, experts, status -------------------------------------------------------

    def set_profile(self, changes: dict[str, Any]) -> Profile:
        """Change explicit preferences (validated; ``implicit`` cannot be set). The expert mix
        follows the profile (it is in the user's embedding), so it is mixed again."""
        with self.lock:
            self.profile = self.profile.updated(changes)
            self.store.put_profile(self.profile.to_dict())
            if self.router is not None:
                self.activate()  # warms the new system prompt too
            else:
                self._warm_llama()
            return self.profile

    def _load_router(self) -> ExpertRouter | None:
        return load_router(self.store)

    def add_expert(self, name: str, adapter_dir: Path, *, about: str) -> dict[str, float]:
        """Install a peft adapter's LoRA B tensors as an expert described by ``about``
        (:func:`client.assistant.experts.install`).

        Returns:
            The router's gates for this user after the change.

        Raises:
            ValueError: Shapes or names that do not fit this device's model.
        """
        with self.lock:
            install(self.store, self.rt.shapes, self.embedder, name, adapter_dir, about=about)
            self.router = self._load_router()
            self.activate()
            assert self.router is not None
            gates = self.router.gates(self.user_vector())
            return {e.name: float(g) for e, g in zip(self.router.experts, gates, strict=True)}

    def export_adapter(self, out_dir: Path, *, force: bool = False) -> Path:
        """Write the personal model (global + personal tensors) as a peft adapter.

        Raises:
            FileExistsError: ``out_dir`` holds files other than an earlier fedpersona adapter
                and ``force`` is false.
        """
        adapters = self.rt.strategy.adapters
        return export_adapter(
            self.personal_tensors(),
            self.cfg.model,
            out_dir,
            force=force,
            base_model=self.rt.base_ref,
            adapters=adapters,
            note={
                "kind": "personal",
                "user": self.state.meta.user,
                "strategy": self.cfg.strategy,
                "round": self.state.meta.last_round,
                "combination": "sum of adapters "
                + " + ".join(adapters)
                + (" as one rank-2r adapter" if len(adapters) > 1 else ""),
            },
        )

    def budget(self) -> dict[str, Any]:
        """The device's privacy ledger (:func:`client.store.status.budget`)."""
        return device_status.budget(self.store)

    def status(self) -> dict[str, Any]:
        """Profile, history, adapter, answering model, privacy, retention
        (:func:`client.store.status.status`)."""
        return device_status.status(self.store)
