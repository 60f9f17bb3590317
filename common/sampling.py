"""Who takes part in a round, and which rounds are evaluated.

Poisson sampling — every node independently with probability q, drawn from the operating
system's randomness — is what the accountant's amplification by sampling assumes; the
fixed-size sample of ``fraction-train`` of the nodes is the familiar alternative (its ε is
the Poisson figure, an approximation the privacy report states).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")
_SECURE = random.SystemRandom()


def poisson_sample(items: Sequence[T], rate: float, rng: random.Random | None = None) -> list[T]:
    """Each of ``items`` independently with probability ``rate`` (OS randomness by default)."""
    draw = (rng or _SECURE).random
    return [item for item in items if draw() < rate]


def fixed_sample(
    items: Sequence[T], rate: float, *, minimum: int = 2, rng: random.Random | None = None
) -> list[T]:
    """``rate`` of ``items`` (at least ``minimum``, at most all), uniformly without repeats."""
    n = min(len(items), max(int(len(items) * rate), minimum))
    return (rng or _SECURE).sample(list(items), n)


def evaluation_due(server_round: int, num_rounds: int, every: int) -> bool:
    """Whether round ``server_round`` of ``num_rounds`` is evaluated: every ``every``-th round
    and the last one (``every = 0``: the last one only)."""
    if server_round >= num_rounds:
        return True
    return every > 0 and server_round % every == 0
