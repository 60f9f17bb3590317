"""Federated A/B test: which model answers better, learned only as a secure sum of counts.

Each round a device lets a coin decide, per interaction, whether the ``global`` (cold-start)
or the ``personal`` model answers, and records the user's 1–5 rating. It reports one vector
per round — ``[n, Σr, Σr²]`` per arm — which rides along the SecAgg+ masked update (appended
after the LoRA tensors, scaled into the clipping range), so the server unmasks only the
federation-wide sums. From those sums the server runs Welch's t-test and reports the
difference in mean rating with its confidence interval (:func:`summarize`); satisfaction over
time is the per-round mean rating per arm.

Ratings come from the device's store (interactions the assistant answered with a recorded
variant and the user rated), and — in simulation, where there is no human — from a simulated
user (:func:`simulated_rating`) whose rating rises with how well the variant predicts the
user's own held-out reply. The counts carry no DP noise: they are covered by secure
aggregation only, and ``summary.json`` says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from common.metrics import welch_test

ARMS = ("global", "personal")
FIELDS = 3 * len(ARMS)  # n, Σr, Σr² per arm
MAX_RATING = 5


def simulated_rating(loss: float, reference: float) -> int:
    """A simulated user's 1–5 rating of an answer whose reply loss is ``loss``.

    ``reference`` is the base model's loss on the same reply: an answer as good as the base
    model's gets 3; each nat better moves the expected rating up (logistic, slope 2).
    """
    return 1 + round(4 / (1 + math.exp(-2.0 * (reference - loss))))


def counts(ratings: Iterable[tuple[str, float]]) -> np.ndarray:
    """``[n, Σr, Σr²]`` per arm from ``(arm, rating)`` pairs."""
    out = np.zeros(FIELDS, dtype=np.float64)
    for arm, rating in ratings:
        i = 3 * ARMS.index(arm)
        out[i : i + 3] += (1.0, rating, rating * rating)
    return out


def scale(max_interactions: int, clip_norm: float) -> float:
    """Divide a device's counts by this so every coordinate is ≤ ``clip_norm`` (inside the
    SecAgg+ clipping range); the server multiplies the sum back."""
    return MAX_RATING**2 * max_interactions / clip_norm


def to_masked(counts: np.ndarray, *, max_interactions: int, clip_norm: float) -> np.ndarray:
    """A device's (or a node's, divided by its users) counts as they ride along the SecAgg+
    masked update: scaled into the clipping range (:func:`scale`)."""
    return np.asarray(counts, np.float64) / scale(max_interactions, clip_norm)


def check_integer_headroom(max_interactions: int, max_devices: int, bits: int) -> None:
    """``skellam`` mode sends the counts as integers in SecAgg+'s ``b``-bit residues: their sum
    over ``max_devices`` must stay below ``2^(b-1)``.

    Raises:
        ValueError: If it might not (the message says what to change).
    """
    largest = MAX_RATING**2 * max_interactions * max_devices
    if largest >= 2 ** (bits - 1):
        raise ValueError(
            f"A/B counts of {max_devices} devices (up to {largest}) do not fit {bits}-bit "
            "residues; lower ab.interactions (0 turns the A/B test off)"
        )


def from_masked(mean: np.ndarray, *, users: int, ab_scale: float) -> np.ndarray:
    """The federation-wide counts from the unmasked mean of :func:`to_masked` vectors over
    ``users`` participants (the only thing SecAgg+ reveals)."""
    return np.asarray(mean, np.float64) * users * ab_scale


METRIC_KEYS = tuple(f"ab_{f}_{arm}" for arm in ARMS for f in ("n", "sum", "sumsq"))


def to_metrics(vector: np.ndarray) -> dict[str, float]:
    """The counts as scalar metrics (the Message-API path, without secure aggregation)."""
    return {k: float(v) for k, v in zip(METRIC_KEYS, vector, strict=True)}


def from_metrics(row: dict[str, float]) -> np.ndarray | None:
    """Inverse of :func:`to_metrics`; ``None`` if the row carries no counts."""
    if not all(k in row for k in METRIC_KEYS):
        return None
    return np.array([row[k] for k in METRIC_KEYS], dtype=np.float64)


def summarize(per_round: list[np.ndarray], *, secure: bool = True) -> dict:
    """Welch's test on the summed counts, plus satisfaction (mean rating per arm) per round."""
    # Counts and ratings are integers: rounding removes the SecAgg+ quantization error
    # (about 1e-3 per round here, far below 0.5) and recovers the sums exactly.
    per_round = [np.rint(c) for c in per_round]
    total = np.sum(per_round, axis=0) if per_round else np.zeros(FIELDS)
    test = welch_test(tuple(total[0:3]), tuple(total[3:6]))
    rounds = []
    for i, c in enumerate(per_round):
        row = {"round_index": i}
        for j, arm in enumerate(ARMS):
            n = c[3 * j]
            row[f"n_{arm}"] = float(n)
            row[f"mean_{arm}"] = float(c[3 * j + 1] / n) if n else None
        rounds.append(row)
    return {
        "arms": {"a": ARMS[0], "b": ARMS[1]},
        **test,
        "satisfaction": rounds,
        "privacy": (
            "the server saw only the SecAgg+ sum of the counts; no DP noise (not covered by ε)"
            if secure
            else "secure aggregation off: the server saw each device's counts"
        ),
    }
