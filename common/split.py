"""How a user's examples divide: the newest held out, the rest trained on — the same rule on
a device (:mod:`client.store.examples`) and for a simulation's users (:mod:`common.corpus`). No
torch here: a device's read-only commands import it."""

from __future__ import annotations


def held_out_count(n: int, fraction: float) -> int:
    """How many of ``n`` examples (the newest) are held out: ``round(n·fraction)``, at least one
    once there are two examples, and never all of them."""
    if n < 2:
        return 0
    return min(n - 1, max(1, round(n * fraction)))
