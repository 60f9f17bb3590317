"""Secret Sharer canaries (Carlini et al., USENIX Security 2019) for the privacy audit.

A canary is a chat turn with a random secret — "What is your secret number?" → "My secret
number is 3 8 1 9 4 2." — planted ``audit.canary-repeats`` times in the training data of the
first ``audit.canary-users`` users. After federation, its exposure (:func:`common.metrics.
exposure`) ranks the canary's loss among ``2^k − 1`` candidates of the same format that were
never planted: ~1 bit means the model did not memorize it, log2 |R| that it is the likeliest.
Canaries are derived from the run seed, so the evaluator rebuilds them without the devices.
"""

from __future__ import annotations

import random

from common.config import RunConfig
from common.data import Sample

CANARY_PROMPT = "What is your secret number?"
DIGITS = 6


def _reply(digits: list[int]) -> str:
    return "My secret number is " + " ".join(map(str, digits)) + "."


def canaries(cfg: RunConfig) -> list[Sample]:
    """The run's canaries (one per ``audit.canaries``), the same on every party."""
    rng = random.Random(f"canary:{cfg.seed}")
    return [
        Sample(CANARY_PROMPT, _reply([rng.randrange(10) for _ in range(DIGITS)]))
        for _ in range(cfg.audit.canaries)
    ]


def planted(cfg: RunConfig, partition_id: int) -> list[Sample]:
    """Canary samples to add to ``partition_id``'s training data (empty for most users)."""
    if partition_id >= cfg.audit.canary_users:
        return []
    return [c for c in canaries(cfg) for _ in range(cfg.audit.canary_repeats)]


def references(cfg: RunConfig, count: int) -> list[Sample]:
    """``count`` never-planted candidates of the canaries' format (distinct from them)."""
    taken = {c.reply for c in canaries(cfg)}
    rng = random.Random(f"reference:{cfg.seed}")
    out: list[Sample] = []
    while len(out) < count:
        reply = _reply([rng.randrange(10) for _ in range(DIGITS)])
        if reply not in taken:
            taken.add(reply)
            out.append(Sample(CANARY_PROMPT, reply))
    return out
