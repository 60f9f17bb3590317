"""What a device measures on its held-out examples: the losses it reports each round, the
global adapter's weight it serves (``blend``) and its local-only baseline.

:class:`DeviceEvaluation` is mixed into :class:`client.federation.device.Device`, which
provides the runtime (``rt``), the run config, the store, its state and ledger, the encoded
examples (``test_set``: the test half of the held-out slice, reported; ``select_set``: the
other half, on which ``blend`` picks its weight) and the models it composes (``served``,
``global_model``). Nothing here changes the model a device trains; :meth:`evaluate` keeps
what it measured (the global tensors, the losses, the weight) in the store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from client.federation import baseline
from client.store import LocalStore
from client.store.state import DeviceState, as_stored
from common.config import RunConfig
from common.data import Encoded
from common.lora import load_lora_tensors
from common.personalization.base import layer_of
from common.train import HeldOutLosses

if TYPE_CHECKING:
    from client.federation.ledger import PrivacyLedger
    from client.federation.runtime import Runtime

# Held-out examples per forward pass: evaluation keeps no activations for a backward pass, and
# on a CPU fewer, larger batches cut the per-layer overhead of many small ones.
EVAL_BATCH_SIZE = 16


class DeviceEvaluation:
    """The held-out side of a :class:`~client.federation.device.Device` (module docstring)."""

    cfg: RunConfig
    rt: Runtime
    store: LocalStore
    state: DeviceState
    ledger: PrivacyLedger
    local_baseline: bool
    partition_id: int | None
    train_examples: list
    select_set: tuple[Encoded, ...]
    test_set: tuple[Encoded, ...]

    def _held_out(self, examples: tuple[Encoded, ...]) -> HeldOutLosses:
        """An evaluator of several model versions on ``examples`` (layers below the LoRA
        adapters computed once)."""
        layers = self.cfg.model.layer_range()
        return HeldOutLosses(
            self.rt.model,
            examples,
            batch_size=max(self.cfg.train.batch_size, EVAL_BATCH_SIZE),
            first_lora_layer=layers[0] if layers else 0,
        )

    def _mixed(
        self,
        held_out: HeldOutLosses,
        global_shared: dict[str, torch.Tensor],
        personal: dict[str, torch.Tensor] | None,
    ) -> HeldOutLosses:
        """``blend``: an evaluator of personal + w·global for every w on ``held_out``'s
        examples. The versions differ only in the layers the global adapter federates, so the
        layers below them run once (under the personal adapter) for all of them."""
        layers = [layer_of(n) for n in self.rt.shared_names]
        if not layers or None in layers:
            return held_out
        load_lora_tensors(self.rt.model, self.served(global_shared, personal, mix_weight=0.0))
        return held_out.above(min(i for i in layers if i is not None))

    def _loss(self, tensors: dict[str, torch.Tensor], on: HeldOutLosses | None = None) -> float:
        """Mean held-out loss of ``tensors`` (on the test half unless ``on`` says otherwise)."""
        load_lora_tensors(self.rt.model, tensors)
        return (on or self._held_out(self.test_set)).mean()

    @torch.no_grad()
    def evaluate(
        self, global_shared: dict[str, torch.Tensor], *, server_round: int
    ) -> dict[str, float | int]:
        """Held-out losses of the base, the global (cold-start) and the served model — and of
        the local-only baseline when asked (``eval.local-only``).

        Losses are measured on the test half of the held-out slice. ``blend`` first picks the
        global adapter's weight on the other half (its decision never sees the test half). The
        global tensors, the losses and the weight are kept in the store: the assistant
        composes its model from them and answers with the personal model only once it beats
        the global one here. The global tensors are first rounded as the store keeps them
        (:func:`client.store.state.as_stored`): the losses are those of the model served, and
        a replay of the stored tensors measures the same.
        """
        global_shared = as_stored(global_shared)
        report = self.held_out_report(global_shared)
        if self.state.meta.base_loss is None:
            self.state.meta.base_loss = report["base_loss"]
        global_loss, personal_loss = report["global_loss"], report["personal_loss"]
        extra = {k: report[k] for k in ("mix_weight", "local_only_loss") if k in report}
        if "mix_weight" in extra:
            self.state.meta.mix_weight = extra["mix_weight"]
        self.state.save_global(global_shared)
        self.state.meta.global_loss = global_loss
        self.state.meta.personal_loss = personal_loss
        self.state.meta.history.append(
            {
                "round": server_round,
                "global_loss": global_loss,
                "personal_loss": personal_loss,
                **extra,
            }
        )
        self.state.save_meta()
        # A simulated device also says whether it ever trained: the summary counts users who
        # never did apart (their local-only model is the base model, nothing to beat).
        trained = (
            {} if self.partition_id is None else {"rounds_trained": self.state.meta.rounds_trained}
        )
        return {
            **self._label(),
            **trained,
            "n_train": len(self.train_examples),
            "n_test": len(self.test_set),
            "base_loss": float(self.state.meta.base_loss),
            "global_loss": global_loss,
            "personal_loss": personal_loss,
            **extra,
            "win": int(personal_loss < global_loss),
            "num-examples": len(self.test_set),
            "declined_rounds": len(self.ledger.declined),
            **self._privacy_metrics(),
        }

    @torch.no_grad()
    def held_out_report(
        self, global_shared: dict[str, torch.Tensor], *, mix_prior: float | None = None
    ) -> dict[str, float]:
        """The losses :meth:`evaluate` reports for these global tensors, changing nothing:
        ``base_loss``, ``global_loss``, ``personal_loss`` (the served model; for ``blend``
        with the weight it would pick, ``mix_weight``) and, when asked, ``local_only_loss``.
        ``benchmarks/server_step.py`` asks it of other global tensors than the run's,
        and of other prior weights (``mix_prior``; default: ``personalization.mix-prior``)."""
        test = self._held_out(self.test_set)
        base_loss = self.state.meta.base_loss
        if base_loss is None:
            with self.rt.model.disable_adapter():
                base_loss = test.mean()
        global_loss = self._loss(self.global_model(global_shared), test)
        personal = self.state.load_personal()
        weight = self._pick_mix_weight(global_shared, personal, mix_prior)
        # blend: its versions differ only in the federated layers (those below run once).
        on = test if weight is None else self._mixed(test, global_shared, personal)
        personal_loss = (
            global_loss
            if personal is None and weight is None
            else self._loss(self.served(global_shared, personal, mix_weight=weight), on)
        )
        report = {
            "base_loss": float(base_loss),
            "global_loss": global_loss,
            "personal_loss": personal_loss,
        }
        if weight is not None:
            report["mix_weight"] = weight
        if self.local_baseline:
            report["local_only_loss"] = self._local_only_loss(
                global_shared,
                personal,
                weight=weight,
                served_loss=personal_loss,
                base_loss=float(base_loss),
                on=on,
            )
        return report

    def _local_only_loss(
        self,
        global_shared: dict[str, torch.Tensor],
        personal: dict[str, torch.Tensor] | None,
        *,
        weight: float | None,
        served_loss: float,
        base_loss: float,
        on: HeldOutLosses,
    ) -> float:
        """Held-out loss of what the user would have training alone with the same compute:
        the personal adapter itself where the strategy's is local-only (``blend`` at weight
        0), else the baseline LoRA trained beside the rounds (the base model before any)."""
        if self.rt.strategy.local_only_personal:
            if not weight:
                return served_loss
            return self._loss(self.served(global_shared, personal, mix_weight=0.0), on)
        trained = baseline.load(self.store)
        if trained is None:
            return base_loss
        return self._loss({**self.rt.init, **trained}, on)

    @torch.no_grad()
    def newcomer_losses(self, global_shared: dict[str, torch.Tensor]) -> dict[str, float]:
        """What this device's user would get before training anything: the base model's and
        the federation's cold-start model's loss on the test half of the held-out slice."""
        test = self._held_out(self.test_set)
        with self.rt.model.disable_adapter():
            base = test.mean()
        return {
            "base_loss": base,
            "global_loss": self._loss(self.global_model(global_shared), test),
        }

    def _pick_mix_weight(
        self,
        global_shared: dict[str, torch.Tensor],
        personal: dict[str, torch.Tensor] | None,
        prior: float | None = None,
    ) -> float | None:
        """The global adapter's weight (``None`` for a strategy without one), chosen on the
        selection half of the held-out slice, which the reported losses never use.

        The prior weight (``prior``; default: the federation's ``personalization.mix-prior``),
        if the global adapter alone beats the base model there, stands unless the per-example
        losses say otherwise (:func:`pick_mix_weight`). A device with fewer than two selection
        examples serves its local-only model (weight 0).
        """
        if not self.rt.strategy.mix_weights:
            return None
        if len(self.select_set) < 2:
            return 0.0
        select = self._held_out(self.select_set)
        with self.rt.model.disable_adapter():
            base = select.per_example()
        load_lora_tensors(self.rt.model, self.global_model(global_shared))
        global_alone = select.per_example()
        mixed = self._mixed(select, global_shared, personal)

        def losses(weight: float) -> list[float]:
            load_lora_tensors(
                self.rt.model, self.served(global_shared, personal, mix_weight=weight)
            )
            return mixed.per_example()

        return self.rt.strategy.pick_weight(
            losses,
            prior=self.cfg.personalization.mix_prior if prior is None else prior,
            base=base,
            global_alone=global_alone,
        )

    def _label(self) -> dict[str, int]:
        """The partition id a simulated device reports (a real device reports none)."""
        return {} if self.partition_id is None else {"partition_id": self.partition_id}

    def global_model(self, global_shared: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What a brand-new user gets: the federation's shared tensors and nothing personal."""
        return self.rt.strategy.newcomer(self.rt.init, global_shared)

    def served(
        self,
        global_shared: dict[str, torch.Tensor],
        personal: dict[str, torch.Tensor] | None,
        *,
        mix_weight: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """The model this device answers with (the strategy's :meth:`served`): global shared +
        personal tensors; for ``blend`` personal + w·global, w the weight last picked (0, the
        local-only model, before any)."""
        w = self.state.meta.mix_weight if mix_weight is None else mix_weight
        return self.rt.strategy.served(self.rt.init, global_shared, personal, weight=w)

    def _privacy_metrics(self) -> dict[str, float]:
        s = self.ledger.summary()
        return {"record_epsilon": s["record_epsilon"], "user_epsilon": s["user_epsilon"]}
