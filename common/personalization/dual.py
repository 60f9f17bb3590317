"""``dual``: FedDPA-style (NeurIPS'24) dual adapters. A global LoRA is federated; a second,
personal LoRA stays on the device; inference sums both (exported as one rank-2r adapter)."""

from __future__ import annotations

from common.personalization.base import GLOBAL_ADAPTER, PERSONAL_ADAPTER, Strategy, adapter_of


class Dual(Strategy):
    """Global adapter shared, personal adapter local; both trained jointly on device."""

    def __init__(self) -> None:
        super().__init__(
            name="dual",
            adapters=(GLOBAL_ADAPTER, PERSONAL_ADAPTER),
            cold_start="the federation's global adapter alone",
        )

    def is_shared(self, name: str) -> bool:  # noqa: D102
        return adapter_of(name) == GLOBAL_ADAPTER

    def is_trainable(self, name: str) -> bool:  # noqa: D102
        return adapter_of(name) in (GLOBAL_ADAPTER, PERSONAL_ADAPTER)
