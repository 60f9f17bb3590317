"""SecAgg+ quantization parameters, derived from the DP settings instead of guessed.

Flower's SecAgg+ fails *silently* when these are wrong: values beyond ``clipping_range`` are
clipped, a ``modulus_range`` too small for the client count wraps around, and a weight above
``max_weight`` overflows. fedpersona sends each client's clipped (and, with distributed DP,
noised) update with weight 1, so every parameter follows from ``C``, the noise and the number
of clients; :func:`derive_secagg_params` refuses settings that would overflow or lose precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from common.dp.privatize import Privatize

MODULUS_RANGE = 2**32  # Flower's upper limit (masks are uint32)
# Quantization noise must stay far below the signal it rides on.
MAX_RELATIVE_QUANTIZATION_ERROR = 1e-2


@dataclass(frozen=True)
class SecAggParams:
    """Arguments for ``SecAggPlusWorkflow`` plus the numbers that justify them."""

    num_shares: int | float
    reconstruction_threshold: int | float
    max_weight: float
    clipping_range: float
    quantization_range: int
    modulus_range: int
    quantization_step: float


# Bell et al. (CCS 2020) size SecAgg+'s neighbourhoods for a statistical security parameter
# of 40 bits (no device's update exposed, the survivors' graph connected) and 20 bits of
# correctness (every dropped device's masks recoverable); these are theirs.
SECURITY_BITS = 40
CORRECTNESS_BITS = 20


def _log_binomial_tail(n: int, p: float, k: int) -> float:
    """``log P[Binomial(n, p) >= k]`` (``-inf`` when impossible), summed exactly in logs."""
    if k <= 0:
        return 0.0
    if k > n or p <= 0:
        return -math.inf
    if p >= 1:
        return 0.0
    terms = [
        math.lgamma(n + 1)
        - math.lgamma(i + 1)
        - math.lgamma(n - i + 1)
        + i * math.log(p)
        + (n - i) * math.log1p(-p)
        for i in range(k, n + 1)
    ]
    top = max(terms)
    return top + math.log(sum(math.exp(t - top) for t in terms))


def neighbourhood_failure(
    cohort: int, shares: int, *, threshold: float, dropout: float, corrupt: float
) -> tuple[float, float]:
    """log2 of the union bounds over a round of ``cohort`` devices, each with ``shares``
    neighbours (itself included, on Flower's randomly shuffled ring) and a reconstruction
    threshold of ``round(threshold · shares)`` (Flower's rule):

    * **security**: some device has at least the threshold of colluding neighbours (its
      masks are then recoverable: its update is exposed), or ``shares // 2`` consecutive
      devices on the ring all drop out or collude (the survivors' graph splits, and a partial
      sum could be unmasked);
    * **correctness**: some device that drops out keeps fewer than the threshold of
      surviving neighbours (its masks cannot be removed: the round fails).

    Each device drops out with probability ``dropout`` and colludes with ``corrupt``,
    independently (the ring is shuffled by the server each round).
    """
    t = max(2, round(threshold * shares))
    others = shares - 1
    log_n = math.log(cohort)
    exposed = _log_binomial_tail(others, corrupt, t)
    split = (shares // 2) * math.log(dropout + corrupt) if dropout + corrupt > 0 else -math.inf
    top = max(exposed, split)
    security = (
        -math.inf
        if top == -math.inf
        else log_n + top + math.log(math.exp(exposed - top) + math.exp(split - top))
    )
    stuck = _log_binomial_tail(others, dropout, others - t + 1)
    correctness = log_n + stuck if stuck > -math.inf else -math.inf
    return security / math.log(2), correctness / math.log(2)


def neighbourhood_size(
    cohort: int, *, threshold: float, dropout: float, corrupt: float, at_least: int = 0
) -> int:
    """Each device's SecAgg+ neighbours (itself included) for a round of ``cohort`` devices:
    the fewest (odd, as Flower's ring needs) whose :func:`neighbourhood_failure` bounds are
    below 2^-40 and 2^-20, and at least ``at_least`` (the m_min a device counts its cohort
    by, which it can only see among its neighbours); ``cohort`` (everyone) when none smaller
    does. Grows as log(cohort): 10,000 devices share keys with about a hundred neighbours
    each instead of 10,000 (the server routes ``cohort × shares`` key shares).
    """
    for shares in range(max(3, at_least | 1), cohort, 2):
        security, correctness = neighbourhood_failure(
            cohort, shares, threshold=threshold, dropout=dropout, corrupt=corrupt
        )
        if security <= -SECURITY_BITS and correctness <= -CORRECTNESS_BITS:
            return shares
    return cohort


def quantization_range_for(num_clients: int) -> int:
    """The largest power-of-two quantization range whose sum over ``num_clients`` updates
    plus their weight factors stays below the 2**32 modulus: q * (num_clients + 1) <= 2**32."""
    return 2 ** int(math.floor(math.log2(MODULUS_RANGE / (max(num_clients, 1) + 1))))


def _discrete_range(
    privatize: Privatize, *, num_clients: int, num_params: int, max_weight: float
) -> tuple[float, int, float]:
    """``skellam`` mode's ``(clipping_range, quantization_range, step)``: ``2^(b-1)`` and
    ``2^b``, so that SecAgg+'s quantizer is the identity on the devices' integers (every
    device sends weight 1, the maximum), and the step one unit of the scaled grid (``1/s``).

    Raises:
        ValueError: More SecAgg+ clients than the bit width was derived for, or a weight
            other than 1.
    """
    if max_weight != 1:
        raise ValueError(
            'dp.noise-mode = "skellam" sends every update with weight 1 (SecAgg+\'s quantizer '
            f"is the identity only then), got max_weight {max_weight:g}"
        )
    if num_clients > privatize.max_contributions:
        raise ValueError(
            f"{num_clients} SecAgg+ clients per round, but the bit width was derived for sums "
            f"of at most {privatize.max_contributions} updates (data.num-users)"
        )
    params = privatize.discrete_params(num_params)
    return privatize.clipping_range, int(privatize.quantization_range or 0), 1.0 / params.scale


def _share_counts(num_shares: float, reconstruction_threshold: float) -> tuple[Any, Any]:
    """``secagg.num-shares`` and ``secagg.reconstruction-threshold`` as Flower takes them: a
    count (int) or a fraction (float).

    Raises:
        ValueError: A count of 2 or less, or a threshold count not below the share count.
    """
    # 0: derived for each round's cohort (neighbourhood_size); Flower's workflow is built
    # with everyone (1.0) and told each round's size.
    shares: int | float = int(num_shares) if num_shares > 1 else float(num_shares)
    if isinstance(shares, int) and shares <= 2:
        raise ValueError(
            "secagg.num-shares as a count must be > 2 (or 0: derived, or a fraction in (0, 1])"
        )
    threshold: int | float = (
        int(reconstruction_threshold)
        if reconstruction_threshold > 1
        else float(reconstruction_threshold)
    )
    if isinstance(threshold, int) and isinstance(shares, int) and threshold >= shares:
        raise ValueError("secagg.reconstruction-threshold must be below secagg.num-shares")
    return shares, threshold


def derive_secagg_params(
    privatize: Privatize,
    *,
    num_clients: int,
    num_params: int,
    num_shares: float,
    reconstruction_threshold: float,
    max_weight: float = 1.0,
) -> SecAggParams:
    """Derive SecAgg+ parameters for updates privatized by ``privatize``: L2 norm ≤ ``C``
    plus each device's noise share N(0, std²), quantized over ``privatize.clipping_range``.

    Args:
        privatize: The round's privatize step (:class:`common.dp.privatize.Privatize`).
        num_clients: Most clients that can contribute to one sum.
        num_params: Number of shared parameters (sets the per-entry signal scale).
        num_shares: ``secagg.num-shares`` (a count > 2, or a fraction of clients).
        reconstruction_threshold: ``secagg.reconstruction-threshold`` (count or fraction).
        max_weight: Largest weight a client may send (fedpersona sends 1 per participant;
            weighting by example counts needs the largest count here).

    Raises:
        ValueError: If the sum could overflow the modulus or quantization would swamp the
            signal (the message says which key to change).
    """
    clip_norm, noise_std = privatize.clip_norm, privatize.noise_std
    if clip_norm <= 0:
        raise ValueError("SecAgg+ needs dp.clip-norm > 0: it bounds every value it quantizes")
    if max_weight < 1:
        raise ValueError(f"max_weight must be >= 1, got {max_weight}")
    if num_clients < 2:
        raise ValueError(f"SecAgg+ needs at least 2 clients per round, got {num_clients}")
    if privatize.discrete:
        clipping_range, quantization_range, step = _discrete_range(
            privatize, num_clients=num_clients, num_params=num_params, max_weight=max_weight
        )
    else:
        # Every entry of a clipped update lies in [-C, C]; the noise adds a tail we bound too.
        clipping_range = privatize.clipping_range
        # Each client contributes values in [0, q) plus the weight factor; the sum of
        # num_clients of them must stay below the modulus: q * (num_clients + 1) <= 2**32.
        quantization_range = quantization_range_for(num_clients)
        if quantization_range < 2**8:
            raise ValueError(
                f"{num_clients} clients leave only {quantization_range} quantization levels "
                "under the 2**32 modulus; sample fewer clients per round (fraction-train)"
            )
        step = 2 * clipping_range / quantization_range
        # Stochastic rounding adds error of std <= step/2 per entry. Compare it with the
        # smallest scale that matters: the DP noise, or (without noise) a typical entry of a
        # norm-C update.
        signal = noise_std if noise_std > 0 else clip_norm / math.sqrt(max(num_params, 1))
        if step / 2 > MAX_RELATIVE_QUANTIZATION_ERROR * signal:
            raise ValueError(
                f"SecAgg+ quantization step {step:.3g} would swamp the signal ({signal:.3g} "
                f"per entry) with {num_clients} clients; lower dp.clip-norm's ratio to the "
                "noise, or sample fewer clients per round"
            )
    shares, threshold = _share_counts(num_shares, reconstruction_threshold)
    return SecAggParams(
        num_shares=shares,
        reconstruction_threshold=threshold,
        max_weight=float(max_weight),
        clipping_range=clipping_range,
        quantization_range=quantization_range,
        modulus_range=MODULUS_RANGE,
        quantization_step=step,
    )
