"""Privacy accounting over Opacus' accountants (RDP and PRV), for devices and the server.

A history is Opacus' own format: a list of ``(noise_multiplier, sample_rate, steps)``. The
same history gives the same ε here as in Opacus, because Opacus computes it.

A ``skellam`` round (:mod:`common.dp.discrete`) is the same triple plus its rounding:
``(σ, q, steps, (Δ1/C, Δ2/C, s·C))``. A history holding one is composed in RDP over integer
orders — Opacus' RDP for its Gaussian rounds, :mod:`common.dp.skellam` for the Skellam ones —
whichever accountant is asked for: there is no PRV analysis of the Skellam mechanism here, and
RDP is an upper bound either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np

# isort: off
import common.dp.opacus_quiet  # noqa: F401  (before Opacus: no second log handler)
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier

# isort: on

ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}

History = list[tuple[float, float, int]]
# (σ, q, steps) for a Gaussian round; (σ, q, steps, (Δ1/C, Δ2/C, s·C)) for a Skellam round.
Entry = tuple


def is_skellam(entry: Entry) -> bool:
    """A history entry of a ``skellam`` round (it carries its rounding)."""
    return len(entry) == 4 and entry[3] is not None


def _skellam_epsilon(entries: list[Entry], delta: float) -> float:
    """ε of a history with Skellam rounds: RDP composed over integer orders."""
    from opacus.accountants.analysis.rdp import compute_rdp

    from common.dp.skellam import ORDERS, SkellamRound, epsilon_of_rdp, round_rdp

    total = np.zeros(len(ORDERS))
    for entry in entries:
        sigma, q, steps = float(entry[0]), float(entry[1]), int(entry[2])
        if is_skellam(entry):
            l1, l2, scale = (float(v) for v in entry[3])
            total += round_rdp(SkellamRound(l1, l2, sigma**2, scale, q, steps))
        else:
            total += np.asarray(
                compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(ORDERS))
            )
    return epsilon_of_rdp(total, delta)[0]


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
        if is_skellam(entry):
            raise ValueError("Opacus has no accountant for skellam rounds (see epsilon)")
        if sigma < 0 or not 0 < q <= 1 or steps < 1:
            raise ValueError(f"invalid accountant history entry {entry!r}")
        clean.append((sigma, q, steps))
    acc.history = clean
    return acc


def epsilon(history: Iterable[Entry], *, delta: float, accountant: str = "rdp") -> float:
    """ε spent by ``history`` at ``delta``; ``inf`` if any step had no noise, 0 if empty.
    A history with a Skellam round is composed in RDP (module docstring)."""
    entries = list(history)
    if not entries:
        return 0.0
    if any(float(entry[0]) == 0 for entry in entries):
        return math.inf
    if any(is_skellam(entry) for entry in entries):
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {accountant!r}")
        return _skellam_epsilon(entries, delta)
    # PRV's discretisation takes log(0) at the edge of its domain (harmless; NumPy warns).
    with np.errstate(divide="ignore"):
        return float(make_accountant(accountant, entries).get_epsilon(delta=delta))


def noise_for_target(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    rounding: Callable[[float], tuple[float, float, float]] | None = None,
) -> float:
    """Smallest noise multiplier σ keeping ``steps`` rounds at ``sample_rate`` within ε.

    This is the physical limit of DP-FedAvg: with ``sample_rate = clients per round /
    population`` and ``steps`` rounds, σ below this value cannot meet ``target_epsilon``.
    ``rounding``: ``skellam`` rounds, whose rounding at σ is ``rounding(σ)`` (the scale is
    derived from the noise, and may be refused); σ is then found from the Gaussian's, doubled
    until it meets the target, by bisection to 1e-3 relative.

    Raises:
        ValueError: If no σ up to 2^10 times the Gaussian's meets the target, or the
            encoding is refused on the way (its message says why).
    """
    if rounding is not None:

        def eps(sigma: float) -> float:
            entry = (sigma, sample_rate, steps, rounding(sigma))
            return epsilon([entry], delta=delta, accountant=accountant)

        base = noise_for_target(
            target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps
        )
        lo, hi = base / 2, base
        for _ in range(10):
            if eps(hi) <= target_epsilon:
                break
            lo, hi = hi, hi * 2
        else:
            raise ValueError(f"no noise multiplier up to {hi:g} reaches ε = {target_epsilon}")
        while hi / lo > 1 + 1e-3:
            mid = math.sqrt(lo * hi)
            lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
        return hi
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )
