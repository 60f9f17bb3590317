"""``fedsa``: FedSA-LoRA (ICLR'25). A learns general knowledge and is federated; B learns the
user and never leaves the device. A brand-new user has B = 0, i.e. the base model."""

from __future__ import annotations

from common.personalization.base import Strategy, is_lora_a, is_lora_b


class FedSA(Strategy):
    """A shared, B personal; both trained locally."""

    def __init__(self) -> None:
        super().__init__(
            name="fedsa",
            cold_start="the base model (global A with B = 0) until the device trains its B",
        )

    def is_shared(self, name: str) -> bool:  # noqa: D102
        return is_lora_a(name)

    def is_trainable(self, name: str) -> bool:  # noqa: D102
        return is_lora_a(name) or is_lora_b(name)
