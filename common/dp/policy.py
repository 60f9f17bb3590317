"""The numbers both sides derive identically from the run config: m_min, noise, charges.

Server and devices compute these from the (public) run config, never from per-round server
messages: a device does not let the server talk it into less noise.
"""

from __future__ import annotations

from common.config import RunConfig
from common.dp.noise import distributed_noise_std


def min_updates(cfg: RunConfig, num_nodes: int) -> int:
    """m_min: the fewest updates the server accepts for a round.

    ``dp.min-clients`` when set, else every client the server samples per round.
    """
    return cfg.m_min(num_nodes)


def client_noise_std(cfg: RunConfig, num_nodes: int) -> float:
    """Per-client noise std under distributed DP (0 otherwise)."""
    if not cfg.dp.distributed:
        return 0.0
    return distributed_noise_std(
        noise_multiplier=cfg.dp.noise_multiplier,
        clip_norm=cfg.dp.clip_norm,
        min_clients=min_updates(cfg, num_nodes),
    )


def uniform_weights(cfg: RunConfig) -> bool:
    """Average per user (weight 1) rather than per example: needed for user-level DP's
    sensitivity bound and for SecAgg+'s bounded weights."""
    return cfg.secagg.enabled or cfg.dp.clip_norm > 0
