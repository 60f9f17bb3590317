"""``fedavg-ft``: FedAvg over the whole LoRA adapter; the personal model is the device's
locally fine-tuned copy (the FedAvg + fine-tuning baseline)."""

from __future__ import annotations

from common.personalization.base import Strategy, is_lora_a, is_lora_b


class FedAvgFT(Strategy):
    """All LoRA tensors are shared; the personal model is the local fine-tune."""

    def __init__(self) -> None:
        super().__init__(
            name="fedavg-ft",
            local_copy=True,
            cold_start="the federation's averaged adapter (A and B)",
        )

    def is_shared(self, name: str) -> bool:  # noqa: D102
        return is_lora_a(name) or is_lora_b(name)

    def is_trainable(self, name: str) -> bool:  # noqa: D102
        return is_lora_a(name) or is_lora_b(name)
