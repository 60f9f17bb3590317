"""Gaussian noise for user-level DP on the aggregate, central or distributed.

With noise multiplier ``σ`` and clipping norm ``C`` the sum of clipped updates must carry
N(0, (σC)²). *Central*: the server adds it after unmasking (trusts the server). *Distributed*:
each client adds N(0, (σC)² / m_min) before SecAgg+, so any ``m >= m_min`` contributions sum to
at least the required variance and the server never holds a noise-free sum (trusts that at
least ``m_min`` clients are honest).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


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
