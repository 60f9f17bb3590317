"""What a personalization strategy decides: which LoRA tensors travel and which stay home.

Parameter names are peft's, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``. A strategy only
classifies names; models, training and transport are strategy-agnostic.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

GLOBAL_ADAPTER = "default"
PERSONAL_ADAPTER = "personal"


def is_lora_a(name: str) -> bool:
    """True for a LoRA down-projection (A) tensor."""
    return ".lora_A." in name


def is_lora_b(name: str) -> bool:
    """True for a LoRA up-projection (B) tensor."""
    return ".lora_B." in name


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The decoder layer a parameter belongs to (``...layers.<i>...``), if any."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def adapter_of(name: str) -> str:
    """The peft adapter a LoRA parameter belongs to (``...lora_A.<adapter>.weight``)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in ("lora_A", "lora_B") and i + 1 < len(parts):
            return parts[i + 1]
    raise ValueError(f"{name!r} is not a LoRA parameter name")


@dataclass(frozen=True)
class Strategy:
    """A personalization strategy (see the strategy table in docs/personalization.md).

    Attributes:
        name: Config name (``personalization.strategy``).
        adapters: peft adapters the model carries (``dual`` has a second, personal one).
        local_copy: The personal model is the device's locally trained copy of the shared
            tensors (``fedavg-ft``, ``ffa``), rather than global shared + personal tensors.
        cold_start: What a brand-new user gets from the federation, in words
            (:meth:`newcomer` gives the tensors).
        mix_weights: The weights of the global adapter a device may serve, picked on its own
            held-out evidence (:meth:`pick_weight`; ``blend``); empty: none to pick.
        local_only_personal: The personal adapter is exactly what the user would train alone
            (``blend``: the global adapter is off while it trains), so it is its own
            local-only baseline.
    """

    name: str
    adapters: tuple[str, ...] = (GLOBAL_ADAPTER,)
    local_copy: bool = False
    cold_start: str = ""
    mix_weights: tuple[float, ...] = ()
    # How a device picks among ``mix_weights`` (:meth:`pick_weight`; ``blend``'s
    # :func:`common.personalization.blend.pick_mix_weight`).
    weight_rule: Callable[..., float] | None = None
    local_only_personal: bool = False
    # ``blend``: which part of the global adapter the federation trains (see there).
    global_layers: tuple[int, int] | None = None
    global_targets: tuple[str, ...] | None = None
    global_part: str = "AB"

    def update_source(self, name: str) -> str:
        """The trained tensor whose change this round is sent as shared tensor ``name``'s
        update (itself, except where a strategy federates another adapter's progress)."""
        return name

    def init_name(self, name: str) -> str:
        """The parameter whose seeded initialisation ``name`` takes (its own by default)."""
        return name

    def is_shared(self, name: str) -> bool:
        """True if the tensor is federated (sent to and averaged by the server)."""
        raise NotImplementedError

    def is_trainable(self, name: str) -> bool:
        """True if local training updates the tensor."""
        raise NotImplementedError

    def is_personal(self, name: str) -> bool:
        """True if the tensor is kept in the device's own state between rounds."""
        return self.is_trainable(name) and (self.local_copy or not self.is_shared(name))

    def split(self, names: list[str]) -> tuple[list[str], list[str], list[str]]:
        """Partition LoRA names into (shared, personal, frozen) lists, each in input order."""
        shared = [n for n in names if self.is_shared(n)]
        personal = [n for n in names if self.is_personal(n)]
        frozen = [n for n in names if not self.is_trainable(n)]
        return shared, personal, frozen

    # -- what a device serves, what a newcomer gets, where a round starts -----------------
    # Every caller composes a model through these: nothing outside this package asks which
    # strategy it holds.

    def served(
        self,
        init: Mapping[str, Any],
        shared: Mapping[str, Any] | None,
        personal: Mapping[str, Any] | None,
        *,
        weight: float | None = None,
    ) -> dict[str, Any]:
        """The model a device answers with: the federation's shared tensors overlaid by the
        device's personal ones (``weight``: the global adapter's, where the strategy has one;
        ignored otherwise)."""
        return self._weighted(compose(init, shared, personal), weight or 0.0)

    def newcomer(self, init: Mapping[str, Any], shared: Mapping[str, Any] | None) -> dict[str, Any]:
        """What a brand-new user gets from the federation (:attr:`cold_start`, in words): for
        ``blend`` the global adapter alone (weight 1)."""
        return self._weighted(compose(init, shared), 1.0)

    def round_start(
        self,
        init: Mapping[str, Any],
        shared: Mapping[str, Any] | None,
        personal: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        """Where a device's round of training starts: the shared tensors as received, its
        personal ones filling the names the federation does not carry (``blend``: the global
        adapter off, weight 0, so its personal adapter trains alone)."""
        return self._weighted(compose(init, shared, personal, personal_overrides_shared=False), 0.0)

    def _weighted(self, tensors: dict[str, Any], weight: float) -> dict[str, Any]:
        """``tensors`` with the global adapter at ``weight``, for a strategy that weights it
        (:attr:`mix_weights`); as they are otherwise."""
        return tensors

    def serves_trained(self, weight: float | None) -> bool:
        """Whether the model served at ``weight`` is the one local training changes (so a
        training step's loss is the served model's)."""
        return True

    def pick_weight(
        self,
        losses: Callable[[float], list[float]],
        *,
        prior: float,
        base: list[float] | None = None,
        global_alone: list[float] | None = None,
    ) -> float:
        """The weight among :attr:`mix_weights` a device serves, from the per-example held-out
        losses ``losses(w)`` (only strategies with :attr:`mix_weights` have one).

        Raises:
            TypeError: For a strategy without a weight to pick.
        """
        if self.weight_rule is None:
            raise TypeError(f"{self.name} serves no weighted global adapter")
        return self.weight_rule(losses, prior=prior, base=base, global_alone=global_alone)


def compose(
    init: Mapping[str, Any],
    shared: Mapping[str, Any] | None = None,
    personal: Mapping[str, Any] | None = None,
    *,
    shared_names: Iterable[str] = (),
    mix: float | None = None,
    personal_overrides_shared: bool = True,
) -> dict[str, Any]:
    """The one way LoRA tensors are put together into a model: the initial tensors, overlaid
    by the federation's shared ones, then by a device's personal ones; with ``mix`` (``blend``)
    the shared adapter's B tensors scaled by it (0 switches the global adapter off).

    Args:
        init: Every LoRA tensor at its initial value.
        shared: The federation's shared tensors (``None``: the initial ones).
        personal: The device's own tensors.
        shared_names: The strategy's shared tensor names (what ``mix`` scales).
        mix: ``blend``'s weight of the global adapter; ``None`` for the other strategies.
        personal_overrides_shared: Whether a personal tensor replaces a shared one of the same
            name (what a device serves) or only fills names the shared ones lack (where a
            round starts from).
    """
    tensors = dict(init)
    tensors.update(shared or {})
    for name, value in (personal or {}).items():
        if personal_overrides_shared or shared is None or name not in shared:
            tensors[name] = value
    if mix is not None:
        for name in shared_names:
            if is_lora_b(name):
                tensors[name] = tensors[name] * mix
    return tensors
