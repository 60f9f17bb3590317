"""What a personalization strategy decides: which LoRA tensors travel and which stay home.

Parameter names are peft's, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``. A strategy only
classifies names; models, training and transport are strategy-agnostic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
    """A personalization strategy (see the README's strategy table).

    Attributes:
        name: Config name (``personalization.strategy``).
        adapters: peft adapters the model carries (``dual`` has a second, personal one).
        local_copy: The personal model is the device's locally trained copy of the shared
            tensors (``fedavg-ft``, ``ffa``), rather than global shared + personal tensors.
        cold_start: What a brand-new user gets from the federation, in words.
        mixed: The served model is personal + w·global, with a weight w each device picks on
            its own held-out evidence (``blend``).
    """

    name: str
    adapters: tuple[str, ...] = (GLOBAL_ADAPTER,)
    local_copy: bool = False
    cold_start: str = ""
    mixed: bool = False
    # ``blend``: which part of the global adapter the federation trains (see there).
    global_layers: tuple[int, int] | None = None
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
