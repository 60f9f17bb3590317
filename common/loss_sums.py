"""Held-out losses summed under SecAgg+: how a federation learns how its model does from
devices whose owners share no per-device losses.

With ``eval.secure-sums`` every device that trains in a round also measures, on its own
held-out text, the model the round started from — the base model, the federation's global
adapter and the model it serves — and appends ``[1, base, global, served]`` to the vector it
masks, after its update (and the A/B counts). The server unmasks only the cohort's sums, so it
learns the mean losses of the round's participants and their number, never one device's. Like
the A/B counts they carry no DP noise: covered by secure aggregation over a cohort the device
accepts (docs/privacy.md), not by any ε.

Each loss is clipped to ``[0, MAX_LOSS]`` and scaled into the update's clipping range, so the
entries stay inside SecAgg+'s quantization range whatever the model does.
"""

from __future__ import annotations

import numpy as np

FIELDS = ("devices", "base_loss", "global_loss", "personal_loss")
MAX_LOSS = 16.0  # nats per token; a loss above it is counted as MAX_LOSS


def vector(*, base: float, global_: float, served: float) -> np.ndarray:
    """One device's entry: ``[1, base, global, served]``, each loss clipped to the range."""
    losses = np.clip(np.nan_to_num([base, global_, served], nan=MAX_LOSS), 0.0, MAX_LOSS)
    return np.concatenate([[1.0], losses]).astype(np.float64)


def nothing() -> np.ndarray:
    """The entry of a device that trained nothing this round: zeros (it counts no device)."""
    return np.zeros(len(FIELDS))


def scale(clip_norm: float) -> float:
    """Divide an entry by this so each coordinate is within ``clip_norm`` (inside the SecAgg+
    clipping range); the server multiplies the sum back."""
    return MAX_LOSS / clip_norm


def to_masked(entry: np.ndarray, *, clip_norm: float) -> np.ndarray:
    """An entry (or a node's mean entry) as it rides in the masked vector."""
    return np.asarray(entry, np.float64) / scale(clip_norm)


def from_masked(mean: np.ndarray, *, users: int, clip_norm: float) -> np.ndarray:
    """The cohort's sums from the unmasked mean of :func:`to_masked` entries over ``users``
    participants."""
    return np.asarray(mean, np.float64) * users * scale(clip_norm)


def summarize(sums: np.ndarray) -> dict[str, float]:
    """The cohort's number of devices and mean losses from its sums (empty: no device)."""
    devices = float(np.rint(sums[0]))
    if devices < 1:
        return {}
    return {
        "devices": int(devices),
        **{name: float(total / devices) for name, total in zip(FIELDS[1:], sums[1:], strict=True)},
    }
