"""Personalization strategies and the registry that maps config names to them."""

from __future__ import annotations

from common.config import RunConfig
from common.personalization.base import GLOBAL_ADAPTER, PERSONAL_ADAPTER, Strategy
from common.personalization.blend import Blend
from common.personalization.dual import Dual
from common.personalization.fedavg_ft import FedAvgFT
from common.personalization.fedsa import FedSA
from common.personalization.ffa import FFA

_REGISTRY: dict[str, type[Strategy]] = {
    "fedavg-ft": FedAvgFT,
    "ffa": FFA,
    "fedsa": FedSA,
    "dual": Dual,
    "blend": Blend,
}


def get_strategy(name: str, **options: object) -> Strategy:
    """Return the strategy registered under ``name`` (``options``: its settings, ``blend``).

    Raises:
        ValueError: For an unknown name.
    """
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown personalization.strategy {name!r}; choose one of {', '.join(_REGISTRY)}"
        ) from None
    return cls(**options)  # type: ignore[call-arg]


def strategy_for(cfg: RunConfig) -> Strategy:
    """The strategy a run config selects, with its settings."""
    if cfg.strategy == "blend":
        p = cfg.personalization
        return get_strategy(
            "blend",
            global_layers=p.global_layer_range(),
            global_targets=p.global_target_names(),
            global_part=p.global_part,
        )
    return get_strategy(cfg.strategy)


__all__ = ["GLOBAL_ADAPTER", "PERSONAL_ADAPTER", "Strategy", "get_strategy", "strategy_for"]
