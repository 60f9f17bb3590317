"""The one privatize step of a device's update: clip → noise → quantize.

An update leaves a device as:

1. **clip** to L2 norm ``C`` (``dp.clip-norm``): user-level DP's sensitivity bound;
2. **noise** — under distributed DP, the device's share N(0, (σC)²/m_min) of the round's noise
   (σ = ``dp.noise-multiplier``): any ``m >= m_min`` shares sum to at least N(0, (σC)²), so
   the server never holds a noise-free sum (see :mod:`common.dp.noise`);
3. **quantize** — SecAgg+ (Flower's ``secaggplus_mod``) maps every entry of the result into
   integers over ``[-R, R]``, ``R`` = :attr:`Privatize.clipping_range`: ``C`` plus
   :data:`NOISE_TAIL_SIGMAS` standard deviations of the share.

:class:`Privatize` is where ``dp.clip-norm`` and ``dp.noise-multiplier`` become the numbers an
update is privatized with: the device calls it on its update, the server derives SecAgg+'s
range (:func:`common.secagg.derive_secagg_params`) and its central noise from the same object,
and a device checks a server's SecAgg+ setup against :attr:`Privatize.clipping_range`
(:mod:`client.federation.gate`). Both sides build it from the public run config, never from a
server message: a device does not let the server talk it into less noise. The accountants read
σ for the charges (:mod:`common.dp.accounting`).

torch is imported only when an update is privatized: the gate checks a setup without it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.config import RunConfig

if TYPE_CHECKING:
    import numpy as np
    import torch

# SecAgg+ clips each entry at C plus this many standard deviations of the device's noise
# share: an entry is cut only where its noise passes 7σ (erfc(7/√2) ≈ 2.6e-12 per entry;
# server/privacy.py prints the bound for a run).
NOISE_TAIL_SIGMAS = 7.0


def distributed_noise_std(*, noise_multiplier: float, clip_norm: float, min_clients: int) -> float:
    """Per-device noise std ``σC / sqrt(m_min)``.

    Raises:
        ValueError: On a negative multiplier, non-positive clip norm or ``min_clients < 1``.
    """
    if noise_multiplier < 0:
        raise ValueError(f"dp.noise-multiplier must be >= 0, got {noise_multiplier}")
    if clip_norm <= 0:
        raise ValueError(f"dp.clip-norm must be > 0, got {clip_norm}")
    if min_clients < 1:
        raise ValueError(f"the minimum number of updates per round must be >= 1, got {min_clients}")
    return noise_multiplier * clip_norm / math.sqrt(min_clients)


@dataclass(frozen=True)
class Privatize:
    """How a round's updates are privatized (see the module docstring).

    Attributes:
        clip_norm: ``C`` (0: updates are not clipped; no DP, no SecAgg+).
        noise_std: A device's per-entry noise share under distributed DP (0 otherwise).
        central_std: The server's per-entry noise on the sum under central DP (0 otherwise).
    """

    clip_norm: float
    noise_std: float = 0.0
    central_std: float = 0.0

    @classmethod
    def of(cls, cfg: RunConfig, num_nodes: int) -> Privatize:
        """What the run config asks of a federation of ``num_nodes`` devices (m_min from
        ``dp.min-clients``, else every device the server samples per round)."""
        dp = cfg.dp
        share = 0.0
        if dp.distributed:
            share = distributed_noise_std(
                noise_multiplier=dp.noise_multiplier,
                clip_norm=dp.clip_norm,
                min_clients=cfg.m_min(num_nodes),
            )
        central = dp.noise_multiplier * dp.clip_norm if dp.noise_mode == "central" else 0.0
        return cls(dp.clip_norm, share, central if dp.adds_noise else 0.0)

    @property
    def clipping_range(self) -> float:
        """``R``: the largest entry SecAgg+ must quantize without cutting it (``C`` plus
        :data:`NOISE_TAIL_SIGMAS` standard deviations of the device's noise share)."""
        return self.clip_norm + NOISE_TAIL_SIGMAS * self.noise_std

    def __call__(
        self, update: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], float | None]:
        """``update`` clipped to ``C`` and given this device's noise share (a fresh dict).

        Returns:
            ``(privatized update, its L2 norm before clipping)`` — the norm is ``None`` when
            updates are not clipped.

        Raises:
            ValueError: If the update is not finite (nothing is sent).
        """
        from common.dp.clipping import clip_update
        from common.dp.noise import add_gaussian_noise

        out, norm = dict(update), None
        if self.clip_norm > 0:
            out, norm = clip_update(out, clip_norm=self.clip_norm)
        if self.noise_std > 0:
            out = add_gaussian_noise(out, std=self.noise_std)
        return out, norm


def uniform_weights(cfg: RunConfig) -> bool:
    """Average per user (weight 1) rather than per example: needed for user-level DP's
    sensitivity bound and for SecAgg+'s bounded weights."""
    return cfg.secagg.enabled or cfg.dp.clip_norm > 0


def ab_in_range(cfg: RunConfig, counts: np.ndarray) -> np.ndarray:
    """A device's A/B counts scaled so every entry lies within ``C`` — the range SecAgg+
    quantizes the update in — to ride in the same masked vector (:func:`common.ab.to_masked`)."""
    from common import ab

    return ab.to_masked(counts, max_interactions=cfg.ab.interactions, clip_norm=cfg.dp.clip_norm)
