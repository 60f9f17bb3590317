"""Per-client clipping of a model update to L2 norm ``C`` (user-level DP's sensitivity bound)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


def global_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of all tensors taken together, computed in float64."""
    total = sum(float(t.detach().double().pow(2).sum()) for t in tensors.values())
    return math.sqrt(total)


def clip_update(
    delta: Mapping[str, torch.Tensor], *, clip_norm: float
) -> tuple[dict[str, torch.Tensor], float]:
    """Scale ``delta`` so its global L2 norm is at most ``clip_norm``.

    Args:
        delta: The update (new shared tensors minus the global ones).
        clip_norm: The bound ``C`` (> 0).

    Returns:
        ``(clipped delta, norm before clipping)``.

    Raises:
        ValueError: If ``clip_norm`` is not positive or the update is not finite.
    """
    if not clip_norm > 0:
        raise ValueError(f"dp.clip-norm must be > 0, got {clip_norm}")
    norm = global_norm(delta)
    if not math.isfinite(norm):
        raise ValueError("the model update is not finite; refusing to send it")
    # 1e-12 guards the division; the float64 factor keeps norm(clipped) <= C after rounding.
    scale = min(1.0, clip_norm / (norm + 1e-12))
    clipped = {n: (t.double() * scale).to(t.dtype) for n, t in delta.items()}
    if global_norm(clipped) > clip_norm:  # fp32 rounding can overshoot by ~1 ulp
        shrink = clip_norm / global_norm(clipped) * (1 - 1e-6)
        clipped = {n: (t.double() * shrink).to(t.dtype) for n, t in clipped.items()}
    return clipped, norm
