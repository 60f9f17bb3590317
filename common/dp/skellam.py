"""Rényi-DP accounting of the distributed Skellam mechanism (:mod:`common.dp.discrete`).

What the server unmasks in a round is ``Σ y_i + Z``: the devices' rotated, scaled and rounded
updates plus the sum ``Z`` of their Skellam shares — Skellam noise of variance ``μ`` per
coordinate, ``μ >= (s·σC)²`` whenever at least ``m_min`` devices contribute (a sum of
Skellams is Skellam, exactly). One user changes ``Σ y_i`` by one device's vector, of L2 norm
at most ``Δ2 = T`` and L1 norm at most ``Δ1 = T·min(√d, T)`` on the integer grid
(add/remove neighbours: a user is in the round or not).

**One round** (Agarwal, Kairouz, Liu 2021, the multidimensional Skellam's RDP bound, in the
integer domain)::

    ε(α) <= α Δ2² / (2μ) + min( ((2α − 1) Δ2² + 6 Δ1) / (4 μ²),  3 Δ1 / (2μ) )

the Gaussian's ``α Δ2²/(2μ)`` plus a term that vanishes as ``μ`` grows.

**Poisson sampling at rate q** (Zhu & Wang 2019, the general upper bound for a Poisson-
subsampled mechanism at integer orders α >= 2), kept only where it is below the unsampled
bound::

    ε_q(α) <= log( (1−q)^(α−1) (αq − q + 1) + C(α,2) q² (1−q)^(α−2) e^ε(2)
                   + 3 Σ_{l=3..α} C(α,l) (1−q)^(α−l) q^l e^((l−1) ε(l)) ) / (α − 1)

Rounds compose by adding RDP; ε at δ is the same conversion Opacus' RDP accountant uses
(``ε = min_α RDP(α) + log((α−1)/α) − (log δ + log α)/(α−1)``), over integer orders (the
subsampling bound needs them). Everything here takes the unscaled quantities: the scale
cancels in the first term and is passed for the second.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from scipy import special

ORDERS: tuple[int, ...] = (*range(2, 129), 256)


@dataclass(frozen=True)
class SkellamRound:
    """One kind of round's charge: ``steps`` rounds alike.

    Attributes:
        l1: One device's L1 sensitivity after rounding (unscaled, :class:`DiscreteParams`).
        l2: Its L2 sensitivity after rounding (unscaled).
        variance: The total noise variance per coordinate the sum is sure to carry
            (unscaled: ``(σC)²`` for ``m_min`` shares of ``(σC)²/m_min``).
        scale: ``s``, the integer grid's scale.
        sample_rate: ``q``, the probability a user's device is in a round (1: always).
        steps: How many such rounds.
    """

    l1: float
    l2: float
    variance: float
    scale: float
    sample_rate: float = 1.0
    steps: int = 1

    def __post_init__(self) -> None:
        if min(self.l1, self.l2, self.variance, self.scale) <= 0:
            raise ValueError(f"a Skellam round needs positive sensitivities, noise, scale: {self}")
        if not 0 < self.sample_rate <= 1 or self.steps < 1:
            raise ValueError(f"a Skellam round needs 0 < q <= 1 and steps >= 1: {self}")


def skellam_rdp(order: int, *, l1: float, l2: float, variance: float, scale: float) -> float:
    """One unsampled round's RDP at ``order`` (module docstring), unscaled quantities."""
    if order <= 1:
        raise ValueError(f"RDP orders are > 1, got {order}")
    a, s, mu = order, scale, variance
    gaussian = a * l2**2 / (2 * mu)
    extra = min(((2 * a - 1) * s * l2**2 + 6 * l1) / (4 * s**3 * mu**2), 3 * l1 / (2 * s * mu))
    return gaussian + extra


def poisson_subsampled(order: int, q: float, rdp: Callable[[int], float]) -> float:
    """Zhu & Wang's upper bound on the RDP of a mechanism with RDP ``rdp`` run on a Poisson
    sample at rate ``q``, at an integer ``order`` >= 2 (module docstring)."""
    if q == 1:
        return rdp(order)
    a = int(order)
    if a != order or a < 2:
        raise ValueError(f"the subsampling bound needs an integer order >= 2, got {order}")
    second = math.log(special.comb(a, 2)) + 2 * math.log(q) + (a - 2) * math.log1p(-q)
    terms = [0.0, second + rdp(2)]
    weights = [(1 - q) ** (a - 1) * (a * q - q + 1), 1.0]
    for k in range(3, a + 1):
        log_comb = special.gammaln(a + 1) - special.gammaln(k + 1) - special.gammaln(a - k + 1)
        terms.append(
            (k - 1) * rdp(k) + float(log_comb) + (a - k) * math.log1p(-q) + k * math.log(q)
        )
        weights.append(3.0)
    return float(special.logsumexp(terms, b=weights)) / (a - 1)


def round_rdp(entry: SkellamRound) -> np.ndarray:
    """The RDP curve (over :data:`ORDERS`) of ``entry``'s rounds together."""

    def one(order: int) -> float:
        return skellam_rdp(
            order, l1=entry.l1, l2=entry.l2, variance=entry.variance, scale=entry.scale
        )

    curve = [
        min(poisson_subsampled(a, entry.sample_rate, one), one(a))
        if entry.sample_rate < 1
        else one(a)
        for a in ORDERS
    ]
    return np.asarray(curve) * entry.steps


def epsilon_of_rdp(rdp: np.ndarray, delta: float) -> tuple[float, int]:
    """(ε, the order that gave it) at ``delta`` for an RDP curve over :data:`ORDERS`."""
    if not 0 < delta < 1:
        raise ValueError(f"δ must be in (0, 1), got {delta}")
    orders = np.asarray(ORDERS, dtype=np.float64)
    eps = rdp + np.log1p(-1 / orders) - (np.log(delta) + np.log(orders)) / (orders - 1)
    best = int(np.nanargmin(eps))
    return max(0.0, float(eps[best])), int(ORDERS[best])


def epsilon(rounds: Iterable[SkellamRound], delta: float) -> float:
    """ε at ``delta`` of these rounds composed (0 for none)."""
    total = np.zeros(len(ORDERS))
    any_round = False
    for entry in rounds:
        total = total + round_rdp(entry)
        any_round = True
    return epsilon_of_rdp(total, delta)[0] if any_round else 0.0
