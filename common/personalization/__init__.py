"""Personalization strategies and the registry that maps config names to them."""

from __future__ import annotations

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


def get_strategy(name: str) -> Strategy:
    """Return the strategy registered under ``name``.

    Raises:
        ValueError: For an unknown name.
    """
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ValueError(
            f"unknown personalization.strategy {name!r}; choose one of {', '.join(_REGISTRY)}"
        ) from None


__all__ = ["GLOBAL_ADAPTER", "PERSONAL_ADAPTER", "Strategy", "get_strategy"]
