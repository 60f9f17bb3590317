"""What the assistant learns from its user's reactions, right away: a rating, a preferred
answer, an edit or a rejection is stored (scrubbed, by the store), updates the implicit
profile, and — when it endorses an answer — trains the personal tensors a few steps towards
it (prequentially scored first, for the cold-start gate and drift detection; replaying the
recent endorsed answers when the user's taste drifted; one CUDA-graph step on a GPU).

:class:`FeedbackLearning` is the part of :class:`~client.assistant.assistant.Assistant` that does it
(a mixin over the assistant's model state, store, profile, gate and drift detector).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from client.assistant.adapt import GraphedAdapter, adapt_on_feedback, example_loss, hot_swap
from client.assistant.engine import build_messages
from client.store import Interaction
from client.store.examples import endorsed_reply
from client.store.state import DRIFT_BLOB, GATE_BLOB
from common.data import Encoded, encode_messages
from common.lora import load_lora_tensors
from common.pii import naturalize, scrub

logger = logging.getLogger(__name__)


@dataclass
class FeedbackResult:
    """What :meth:`Assistant.feedback` did."""

    feedback_id: int
    adapted: bool
    adapt_ms: float | None
    drift: bool
    variant: str


class FeedbackLearning:
    """Feedback on the assistant's answers, and the adaptation it triggers (see the module
    docstring); mixed into :class:`~client.assistant.assistant.Assistant`, which provides the model
    state (``rt``, ``state``, ``personal_tensors``, ``global_tensors``, ``activate``), the
    ``store``, ``profile``, ``embedder``, ``gate``, ``drift`` and the ``lock``."""

    def _encode(self, prompt: str, context: dict, reply: str) -> Encoded:
        # Stored text is scrubbed; the model learns from plain words, never from "[NAME]".
        messages = build_messages(self.profile, naturalize(prompt), context=context or None)
        return encode_messages(
            messages, naturalize(scrub(reply)), self.rt.tokenizer, self.cfg.data.max_seq_len
        )

    def _endorsed(self, inter: Interaction) -> str | None:
        """The answer the user endorsed for ``inter``
        (:func:`client.store.examples.endorsed_reply`)."""
        return endorsed_reply(inter, self.store.feedback(interaction_id=inter.id))

    def _positive_examples(self, limit: int) -> list[Encoded]:
        """The answers the user endorsed (see :meth:`_endorsed`) for the ``limit`` most
        recently rated interactions, oldest first, for replay."""
        out: list[Encoded] = []
        seen: set[int] = set()
        for fb in reversed(self.store.feedback()):
            if len(out) >= limit:
                break
            if fb.interaction_id is None or fb.interaction_id in seen:
                continue
            seen.add(fb.interaction_id)
            inter = self.store.get_interaction(fb.interaction_id)
            target = None if inter is None else self._endorsed(inter)
            if inter is not None and target is not None:
                out.append(self._encode(inter.prompt, inter.context, target))
        return list(reversed(out))

    def feedback(
        self,
        interaction_id: int,
        *,
        rating: float | None = None,
        preferred: str | None = None,
        edit: str | None = None,
        reject: bool = False,
    ) -> FeedbackResult:
        """Learn from the user's reaction to an answer, right away.

        A rating of 4–5, a preferred answer or an edit trains the personal parameters for a
        few steps towards that answer (prequentially scored first, for the cold-start gate
        and drift detection); every signal updates the implicit profile the reranker uses.

        Raises:
            ValueError: Unknown interaction, no signal, or a rating outside 1–5.
        """
        if rating is None and preferred is None and edit is None and not reject:
            raise ValueError("give a rating, a preferred answer, an edit or reject")
        if rating is not None and not 1 <= rating <= 5:
            raise ValueError(f"rating must be in 1..5, got {rating}")
        with self.lock:
            inter = self.store.get_interaction(interaction_id)
            if inter is None:
                raise ValueError(f"no interaction {interaction_id} (purged or never stored)")
            if preferred is not None:
                kind, value, text = "preferred", rating, preferred
            elif edit is not None:
                kind, value, text = "edit", rating, edit
                self.store.update_response(interaction_id, edit)
            elif reject:
                kind, value, text = "reject", rating, None
            else:
                kind, value, text = "rating", rating, None
            feedback_id = self.store.add_feedback(interaction_id, kind, value=value, text=text)
            text = None if text is None else scrub(text)

            # Implicit profile: what was kept and what was turned down.
            if text is not None:
                # One embedding call for both texts (the answer's vector is usually cached
                # from its reranking).
                turned_down = [inter.response] if kind == "preferred" else []
                vectors = self.embedder.encode([text, *turned_down])
                self.profile.observe(response=text, embedding=vectors[0], chosen=True)
                if turned_down:
                    self.profile.observe(
                        response=inter.response, embedding=vectors[1], chosen=False
                    )
            else:
                self.profile.observe(
                    response=inter.response,
                    embedding=self.embedder.encode_one(inter.response),
                    rating=rating,
                    chosen=False if reject else None,
                )
            self.store.put_profile(self.profile.to_dict())

            target = (
                text
                if text is not None
                else (inter.response if rating is not None and rating >= 4 and not reject else None)
            )
            adapted, ms, drift = False, None, False
            if target:
                adapted, ms, drift = True, *self._adapt(inter.prompt, inter.context, target)
            return FeedbackResult(feedback_id, adapted, ms, drift, self.variant)

    def _adapt(self, prompt: str, context: dict, target: str) -> tuple[float, bool]:
        example = self._encode(prompt, context, target)
        graphed = self._graphed_adapter()  # built once on a GPU, before the tensors below
        personal = self.personal_tensors()
        trained = self.personal_tensors(mix_weight=0.0)
        before = {n: trained[n] for n in self.rt.personal_names}  # what the steps start from
        # Prequential: both models score the example before it is trained on.
        load_lora_tensors(self.rt.model, self.global_tensors())
        global_loss = example_loss(self.rt.model, example, pad_id=self.pad_id)
        hot_swap(self.rt.model, personal)
        try:
            if graphed is None and self._trains_what_answers():
                # The first step's loss *is* the personal model's prequential score (same
                # tensors, same precision): one pass saved; on drift the step is undone below.
                personal_loss, ms = self._steps([example], None, self.feedback_steps)
                drift = self._record(personal_loss, global_loss)
                if drift:
                    hot_swap(self.rt.model, personal)
                    ms += self._replay()
            else:
                personal_loss = example_loss(self.rt.model, example, pad_id=self.pad_id)
                drift = self._record(personal_loss, global_loss)
                hot_swap(self.rt.model, trained)  # blend's personal adapter learns alone
                if drift:
                    ms = self._replay()
                elif graphed is not None:
                    _, ms = graphed.run(example, steps=self.feedback_steps)
                else:
                    _, ms = self._steps([example], None, self.feedback_steps)
        except ValueError:
            self.activate()  # back to the stored tensors; nothing was saved
            raise
        params = dict(self.rt.model.named_parameters())
        # Merged with a federated round that landed meanwhile (the worker, another process).
        self.state.update_personal(
            before,
            {n: params[n].detach().to("cpu", torch.float32) for n in self.rt.personal_names},
        )
        self.store.put_json(GATE_BLOB, self.gate.state_dict())
        self.store.put_json(DRIFT_BLOB, self.drift.state_dict())
        self.activate()
        return ms, drift

    def _trains_what_answers(self) -> bool:
        """Whether the tensors feedback trains are those that answer, scored in the same
        precision (no ``blend`` mix weight, no dropout, no autocast: a bf16 serving base)."""
        return (
            self.served is not None
            and self.rt.strategy.serves_trained(self.state.meta.mix_weight)
            and self.cfg.model.lora_dropout == 0
        )

    def _record(self, personal_loss: float, global_loss: float) -> bool:
        """Record the prequential scores with the gate; return whether the taste drifted."""
        self.gate.record(personal_loss=personal_loss, global_loss=global_loss)
        return self.drift.update(personal_loss)

    def _steps(
        self, examples: list[Encoded], weights: list[float] | None, steps: int
    ) -> tuple[float, float]:
        """Feedback steps on the personal tensors (top layers): ``(first loss, ms)``."""
        return adapt_on_feedback(
            self.rt.model,
            self.rt.personal_names,
            examples,
            steps=steps,
            learning_rate=self.feedback_lr,
            pad_id=self.pad_id,
            weights=weights,
            precision=self.cfg.train.precision,
            top_layers=self.feedback_layers,
        )

    def _replay(self) -> float:
        """Drift: re-adapt on the recent endorsed examples, recent ones weighted up; ms."""
        examples = self._positive_examples(2 * self.drift.window)
        weights = self.drift.replay_weights(len(examples))
        logger.info("drift detected: re-adapting on %d recent examples", len(examples))
        return self._steps(examples, weights, 2 * self.feedback_steps)[1]

    def _graphed_adapter(self) -> GraphedAdapter | None:
        """The CUDA-graph feedback step on a GPU (built once); ``None`` on CPU."""
        if self._graphed is None:
            self._graphed = False
            if next(self.rt.model.parameters()).is_cuda:
                try:
                    self._graphed = GraphedAdapter(
                        self.rt.model,
                        self.rt.personal_names,
                        seq_len=self.cfg.data.max_seq_len,
                        learning_rate=self.feedback_lr,
                        pad_id=self.pad_id,
                    )
                except RuntimeError as err:  # capture unsupported here: eager steps instead
                    logger.warning("CUDA graph capture failed (%s); using eager steps", err)
                self.activate()
        return self._graphed or None
