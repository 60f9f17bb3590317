"""Privacy accounting over Opacus' accountants (RDP and PRV), for devices and the server.

A history is Opacus' own format: a list of ``(noise_multiplier, sample_rate, steps)``. The
same history gives the same ε here as in Opacus, because Opacus computes it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

# isort: off
import common.dp.opacus_quiet  # noqa: F401  (before Opacus: no second log handler)
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier

# isort: on

ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}

History = list[tuple[float, float, int]]


def make_accountant(name: str, history: Iterable[tuple[float, float, int]] = ()) -> IAccountant:
    """An Opacus accountant (``rdp`` or ``prv``) holding ``history``.

    Raises:
        ValueError: For an unknown name or a malformed history entry.
    """
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; choose one of {', '.join(ACCOUNTANTS)}")
    acc = ACCOUNTANTS[name]()
    clean: History = []
    for entry in history:
        try:
            sigma, q, steps = float(entry[0]), float(entry[1]), int(entry[2])
        except (TypeError, ValueError, IndexError) as err:
            raise ValueError(f"malformed accountant history entry {entry!r}") from err
        if sigma < 0 or not 0 < q <= 1 or steps < 1:
            raise ValueError(f"invalid accountant history entry {entry!r}")
        clean.append((sigma, q, steps))
    acc.history = clean
    return acc


def epsilon(
    history: Iterable[tuple[float, float, int]], *, delta: float, accountant: str = "rdp"
) -> float:
    """ε spent by ``history`` at ``delta``; ``inf`` if any step had no noise, 0 if empty."""
    entries = list(history)
    if not entries:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in entries):
        return math.inf
    # PRV's discretisation takes log(0) at the edge of its domain (harmless; NumPy warns).
    with np.errstate(divide="ignore"):
        return float(make_accountant(accountant, entries).get_epsilon(delta=delta))


def noise_for_target(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """Smallest noise multiplier σ keeping ``steps`` rounds at ``sample_rate`` within ε.

    This is the physical limit of DP-FedAvg: with ``sample_rate = clients per round /
    population`` and ``steps`` rounds, σ below this value cannot meet ``target_epsilon``.
    """
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )
