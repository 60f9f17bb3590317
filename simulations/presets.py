"""Simulation presets: run-config overrides plus the federation's size and resources.

``tiny`` is for tests and smoke runs (random 2-layer model, < 2 min on 2 cores). ``quick`` is
the README's main job: SmolLM2-135M on 128 Shakespeare roles, ≤ 10 min on 2 CPU cores.
``full`` is larger and meant for a machine with more cores or a GPU. ``audit`` is
``population`` with 400 canary clients for the user-level privacy audit. ``population`` is a
federation in which federating can help: 200 users, about 40 Poisson-sampled per round, 10
rounds, every device at ε ≤ 1, and 20 users who never join (cold start) — in 13–17 min on
2 CPU cores, with 25 simulated users per Flower node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    """A named simulation setting."""

    name: str
    num_supernodes: int  # simulated users (Flower nodes: users / simulation.users-per-node)
    run_config: dict[str, Any] = field(default_factory=dict)
    # Users after the federation's, never sampled: the released model is measured on them.
    cold_start_users: int = 0


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        num_supernodes=4,
        run_config={
            "model.name": "tiny",
            "num-server-rounds": 2,
            # 4 users: the DP noise on the mean is σC/4 per entry; keep it well below the
            # tiny model's LoRA scale (see docs/privacy.md).
            "dp.clip-norm": 0.01,
            "data.max-seq-len": 64,
            "data.max-test-samples": 8,
            "train.local-steps": 8,
            "train.batch-size": 4,
            "train.learning-rate": 0.05,
            "eval.local-only": True,
        },
    ),
    "small": Preset(
        name="small",
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


# The shape of a federation in which federating can help (`quick` and `population`): the
# federated part of the global adapter is small, users are Poisson-sampled, devices are hosted
# 16-25 per Flower node, and every user's local-only LoRA is measured beside the served model.
_FEDERATION_SHAPE: dict[str, Any] = {
    "model.name": "smollm2",
    "model.lora-layers": "22-29",
    "personalization.strategy": "blend",
    # The federated part of the global adapter: B of v_proj in layers 26-29 (3,072 numbers).
    # Measured on an ε ≤ 1 run: G's v_proj half carried nearly all of what G's q_proj + v_proj
    # gave its users; federating v_proj alone puts each clipped change on 4x fewer numbers.
    "personalization.global-layers": "26-29",
    "personalization.global-targets": "v_proj",
    "personalization.global-part": "B",
    # Replaying an ε ≤ 1 run's devices: the global adapter at weight 1 helped as many users
    # as at 0.5 (95 % of 65 trained), with twice the mean gain.
    "personalization.mix-prior": 1.0,
    "sampling": "poisson",
    "evaluate-every": 0,
    "data.min-lines": 100,
    "data.max-seq-len": 64,
    # A larger held-out slice: each device decides its mixing weight on evidence.
    "data.test-fraction": 0.3,
    "data.max-test-samples": 6,
    "train.local-steps": 2,
    "train.batch-size": 4,
    "train.learning-rate": 0.01,
    "dp.clip-norm": 0.05,
    # The simulated server samples Poisson as configured: devices credit the sampling.
    "privacy.verifiable-sampling": True,
    "ab.interactions": 0,
    "eval.local-only": True,
}

# σ for user-level ε = 1 (δ = 1e-5) over 2 rounds that every user joins (q = 1, RDP):
# `fedpersona privacy noise --population 128 --per-round 128 --rounds 2` prints 5.742.
QUICK_SIGMA = 5.75

PRESETS["quick"] = Preset(
    name="quick",
    num_supernodes=128,
    cold_start_users=16,
    run_config={
        **_FEDERATION_SHAPE,
        # Two rounds, every user in both: the noise on a round's mean, σC/m, falls with the
        # 128 users in it; the global adapter takes two server steps of 50 (population: ten of
        # 10), each user four local steps, as a user sampled twice in population does.
        "num-server-rounds": 2,
        "fraction-train": 1.0,
        "simulation.users-per-node": 16,
        # Each device picks its weight on up to 6 held-out examples: the main job stays
        # ~5 minutes (24, as in population, took 9.6).
        "data.max-select-samples": 6,
        "server.learning-rate": 50.0,
        "dp.noise-multiplier": QUICK_SIGMA,
        # m_min: every user trains in every round; a few may drop out.
        "dp.min-clients": 120,
    },
)

# σ for user-level ε = 1 (δ = 1e-5) over 10 Poisson-sampled rounds at q = 0.2 (RDP):
# `fedpersona privacy noise --population 200 --per-round 40 --rounds 10` prints 3.105.
POPULATION_SIGMA = 3.11

PRESETS["population"] = Preset(
    name="population",
    num_supernodes=200,
    cold_start_users=20,
    run_config={
        **_FEDERATION_SHAPE,
        "num-server-rounds": 10,
        "fraction-train": 0.2,
        "simulation.users-per-node": 25,
        # Devices send minus their round's gradients (the direction users share most: 0.61
        # mean cosine between two users' updates against 0.46 for their AdamW changes); the
        # server steps 20x along the clipped, noised mean, and devices start from half of it.
        # Measured side by side: benchmarks/server_step.py; docs/results.md, "A
        # federation in which federating can help".
        "personalization.update": "gradient",
        "server.learning-rate": 20.0,
        "personalization.mix-prior": 0.5,
        # A device picks its weight on the rest of its held-out slice, up to 24 examples: users
        # with more data decide on more evidence (6 at 0d0b5bf: 2 users ended up worse off).
        "data.max-select-samples": 24,
        # Each device reports on up to 12 held-out examples (6 before): a served model within
        # noise of its local-only one no longer lands 0.5 % worse on 6 examples by chance.
        "data.max-test-samples": 12,
        # The B of v_proj in layers 22-29 (6,144 numbers; 26-29 in quick): measured at ε ≤ 1,
        # 0.063 nats over local-only for the users who trained, against 0.056-0.064 on three
        # draws of 26-29 (docs/results.md).
        "personalization.global-layers": "22-29",
        "dp.noise-multiplier": POPULATION_SIGMA,
        # m_min: a Poisson cohort (mean 40, sd 5.7) falls below 26 in about 1 round of 150.
        "dp.min-clients": 26,
    },
)

# The user-level privacy audit (common/audit.py, "canary clients"): `population`'s federation
# with 400 canary clients beside its 200 users (each takes part with probability ½ and, when
# sampled, sends a random direction of norm C through the same noise and SecAgg+). Run as is
# for the private run, and with `--set dp.noise-mode=none` for the run the audit must catch.
PRESETS["audit"] = Preset(
    name="audit",
    num_supernodes=600,
    run_config={
        **PRESETS["population"].run_config,
        "audit.canary-clients": 400,
        # What it measures is the released rounds: the users' evaluation is kept small.
        "data.max-select-samples": 2,
        "data.max-test-samples": 2,
        "eval.local-only": False,
    },
)


def get_preset(name: str) -> Preset:
    """Return the preset called ``name``.

    Raises:
        ValueError: For an unknown preset.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
