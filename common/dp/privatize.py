"""The one privatize step of a device's update: clip → noise → quantize.

An update leaves a device as:

1. **clip** to L2 norm ``C`` (``dp.clip-norm``): user-level DP's sensitivity bound;
2. **noise** — under distributed DP, the device's share N(0, (σC)²/⌊h·m_min⌋) of the round's
   noise (σ = ``dp.noise-multiplier``, h = ``dp.honest-fraction``): the honest ``⌊h·m_min⌋``
   of any cohort of ``m >= m_min`` shares sum to at least N(0, (σC)²), so the server never
   holds a sum with less noise unless more than ``1 - h`` of a cohort is its own (see
   :mod:`common.dp.noise`); never below ``dp.share-floor``·C, the noise of the update alone;
3. **quantize** — SecAgg+ (Flower's ``secaggplus_mod``) maps every entry of the result into
   integers over ``[-R, R]``, ``R`` = :attr:`Privatize.clipping_range`: ``C`` plus
   :data:`NOISE_TAIL_SIGMAS` standard deviations of the share.

In ``skellam`` mode steps 2 and 3 are one, exact for what the server sees
(:mod:`common.dp.discrete`): the device rotates, scales and rounds its clipped update into
integers and adds its Skellam share there (:meth:`Privatize.encode`); SecAgg+'s range is set so
that its quantizer is the identity on those integers (``R = 2^(b-1)``, ``2^b`` levels).

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.config import RunConfig

if TYPE_CHECKING:
    import numpy as np
    import torch

    from common.dp.discrete import DiscreteParams

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
        noise_std: A device's per-entry noise share under distributed DP (0 otherwise); in
            ``skellam`` mode the standard deviation of its Skellam share (unscaled).
        central_std: The server's per-entry noise on the sum under central DP (0 otherwise).
        max_contributions: ``skellam`` mode: the most updates one sum may hold (the
            federation's size: it sets the bit width and the wrap-around bound); 0 otherwise.
    """

    clip_norm: float
    noise_std: float = 0.0
    central_std: float = 0.0
    max_contributions: int = 0

    @classmethod
    def of(cls, cfg: RunConfig, num_nodes: int) -> Privatize:
        """What the run config asks of a federation of ``num_nodes`` devices: each device's
        share sized for the honest ``⌊h·m_min⌋`` of a cohort (m_min from ``dp.min-clients``,
        else every device the server samples per round; h = ``dp.honest-fraction``), and at
        least ``dp.share-floor``·C."""
        dp = cfg.dp
        share = 0.0
        if dp.distributed:
            share = distributed_noise_std(
                noise_multiplier=dp.noise_multiplier,
                clip_norm=dp.clip_norm,
                min_clients=cfg.honest_cohort(num_nodes),
            )
            share = max(share, dp.share_floor * dp.clip_norm)
        central = dp.noise_multiplier * dp.clip_norm if dp.noise_mode == "central" else 0.0
        return cls(
            dp.clip_norm,
            share,
            central if dp.adds_noise else 0.0,
            max(1, num_nodes) if dp.discrete else 0,
        )

    @property
    def alone_noise_multiplier(self) -> float:
        """The noise multiplier of one device's update alone: its own share over C (the
        worst case, every other device of its cohort the server's; 0 without a share)."""
        return self.noise_std / self.clip_norm if self.clip_norm > 0 else 0.0

    @property
    def discrete(self) -> bool:
        """Noise shares are Skellam integers inside SecAgg+ (``dp.noise-mode = "skellam"``)."""
        return self.max_contributions > 0

    @property
    def bits(self) -> int:
        """``skellam`` mode's bit width ``b`` (:func:`common.dp.discrete.bits_for`)."""
        from common.dp.discrete import bits_for

        if not self.discrete:
            raise ValueError("only the skellam noise mode has a bit width")
        return bits_for(self.max_contributions)

    @property
    def clipping_range(self) -> float:
        """``R``: the largest entry SecAgg+ must quantize without cutting it (``C`` plus
        :data:`NOISE_TAIL_SIGMAS` standard deviations of the device's noise share); in
        ``skellam`` mode ``2^(b-1)``, which with :attr:`quantization_range` makes SecAgg+'s
        quantizer the identity on the devices' integers."""
        if self.discrete:
            return float(2 ** (self.bits - 1))
        return self.clip_norm + NOISE_TAIL_SIGMAS * self.noise_std

    @property
    def quantization_range(self) -> int | None:
        """``skellam`` mode: SecAgg+'s fixed quantization range ``2^b`` (``None`` otherwise:
        it is sized for each round's cohort, :func:`common.secagg.quantization_range_for`)."""
        return 2**self.bits if self.discrete else None

    def discrete_params(self, dim: int) -> DiscreteParams:
        """``skellam`` mode: the derived rotation length, bit width and scale for updates of
        ``dim`` numbers (the same on every device and on the server)."""
        from common.dp.discrete import derived

        if not self.discrete:
            raise ValueError("only the skellam noise mode encodes updates as integers")
        return derived(
            dim=int(dim),
            clip_norm=float(self.clip_norm),
            share_std=float(self.noise_std),
            max_contributions=int(self.max_contributions),
        )

    def encode(
        self, update: Mapping[str, torch.Tensor], names: Sequence[str], seed: int
    ) -> np.ndarray:
        """``skellam`` mode: a clipped update (``names`` order) as the integers the device
        hands to SecAgg+ — rotated with the round's public ``seed``, scaled, rounded, given
        its Skellam share, reduced modulo ``2^b`` (:func:`common.dp.discrete.encode`)."""
        import numpy as np

        from common.dp.discrete import encode

        flat = np.concatenate(
            [update[n].detach().to("cpu").double().reshape(-1).numpy() for n in names]
        )
        return encode(flat, self.discrete_params(flat.size), seed)

    def leaving(
        self,
        update: Mapping[str, torch.Tensor],
        names: Sequence[str],
        *,
        run: str,
        server_round: int,
    ) -> tuple[dict[str, torch.Tensor], float | None, np.ndarray | None]:
        """What leaves a device for ``update`` in round ``server_round`` of run ``run``:
        ``(clipped and noised update, its norm before clipping, None)``, or in ``skellam``
        mode ``({}, norm, its integers)`` — the clipped update itself never leaves."""
        from common.dp.discrete import round_seed

        clipped, norm = self(update)
        if not self.discrete:
            return clipped, norm, None
        return {}, norm, self.encode(clipped, names, round_seed(run, server_round))

    def __call__(
        self, update: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], float | None]:
        """``update`` clipped to ``C`` and given this device's noise share (a fresh dict).

        Returns:
            ``(privatized update, its L2 norm before clipping)`` (in ``skellam`` mode clipped
            only: its noise is added as integers by :meth:`encode`) — the norm is ``None`` when
            updates are not clipped.

        Raises:
            ValueError: If the update is not finite (nothing is sent).
        """
        from common.dp.clipping import clip_update
        from common.dp.noise import add_gaussian_noise

        out, norm = dict(update), None
        if self.clip_norm > 0:
            out, norm = clip_update(out, clip_norm=self.clip_norm)
        if self.noise_std > 0 and not self.discrete:
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
