"""``ffa``: FFA-LoRA (ICLR'24). A is frozen at its shared-seed initialisation on every party;
only B is trained and federated. The personal model is the local fine-tune of B."""

from __future__ import annotations

from common.personalization.base import Strategy, is_lora_b


class FFA(Strategy):
    """B shared and trained, A frozen from ``model.init-seed``."""

    def __init__(self) -> None:
        super().__init__(
            name="ffa",
            local_copy=True,
            cold_start="the federation's averaged B over the seed-frozen A",
        )

    def is_shared(self, name: str) -> bool:  # noqa: D102
        return is_lora_b(name)

    def is_trainable(self, name: str) -> bool:  # noqa: D102
        return is_lora_b(name)
