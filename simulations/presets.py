"""Simulation presets: run-config overrides plus the federation's size and resources.

``tiny`` is for tests and smoke runs (random 2-layer model, < 2 min on 2 cores). ``quick`` is
the README's main job: SmolLM2-135M on 8 Shakespeare roles, < 15 min on 2 CPU cores.
``full`` is larger and meant for a machine with more cores or a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    """A named simulation setting."""

    name: str
    num_supernodes: int
    run_config: dict[str, Any] = field(default_factory=dict)
    cpus_per_client: int = 1
    gpus_per_client: float = 0.0


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        num_supernodes=4,
        run_config={
            "model.name": "tiny",
            "num-server-rounds": 2,
            # 4 users: the DP noise on the mean is σC/4 per entry; keep it well below the
            # tiny model's LoRA scale (see README, "Privacy").
            "dp.clip-norm": 0.01,
            "data.max-seq-len": 64,
            "data.max-test-samples": 8,
            "train.local-steps": 8,
            "train.batch-size": 4,
            "train.learning-rate": 0.05,
            "eval.local-only": True,
        },
    ),
    "quick": Preset(
        name="quick",
        num_supernodes=8,
        run_config={
            "model.name": "smollm2",
            "num-server-rounds": 3,
            "data.max-seq-len": 96,
            "data.max-test-samples": 16,
            "train.local-steps": 5,
            "train.batch-size": 4,
            "train.learning-rate": 0.005,
            "eval.local-only": True,
        },
    ),
    "full": Preset(
        name="full",
        num_supernodes=16,
        run_config={
            "model.name": "smollm2",
            "num-server-rounds": 8,
            "data.max-seq-len": 128,
            "data.max-test-samples": 32,
            "train.local-steps": 10,
            "train.batch-size": 8,
            "train.learning-rate": 0.003,
            # 8 rounds at q = 1 within each device's ε = 1 cap (fedpersona privacy noise).
            "dp.noise-multiplier": 11.5,
            "eval.local-only": True,
        },
    ),
}


def get_preset(name: str) -> Preset:
    """Return the preset called ``name``.

    Raises:
        ValueError: For an unknown preset.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
