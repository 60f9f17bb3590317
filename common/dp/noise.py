"""Gaussian noise for user-level DP on the aggregate, central or distributed.

With noise multiplier ``σ`` and clipping norm ``C`` the sum of clipped updates must carry
N(0, (σC)²). *Central*: the server adds it after unmasking (trusts the server). *Distributed*:
each client adds N(0, (σC)² / m_min) before SecAgg+, so any ``m >= m_min`` contributions sum to
at least the required variance and the server never holds a noise-free sum (trusts that at
least ``m_min`` clients are honest).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


def distributed_noise_std(*, noise_multiplier: float, clip_norm: float, min_clients: int) -> float:
    """Per-client noise std ``σC / sqrt(m_min)``.

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


def add_gaussian_noise(
    tensors: Mapping[str, torch.Tensor], *, std: float, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Return ``tensors + N(0, std²)`` elementwise (a fresh dict; inputs untouched).

    Noise comes from a CSPRNG-seeded generator by default: the seed is not predictable by
    anyone who could otherwise subtract it.
    """
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    if generator is None:
        import secrets

        generator = torch.Generator().manual_seed(secrets.randbits(63))
    out = {}
    for name, t in tensors.items():
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float64) * std
        out[name] = (t.double() + noise).to(t.dtype)
    return out
