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
    shares: int | float = int(num_shares) if num_shares > 1 else float(num_shares)
    if isinstance(shares, int) and shares <= 2:
        raise ValueError("secagg.num-shares as a count must be > 2 (or a fraction in (0, 1])")
    threshold: int | float = (
        int(reconstruction_threshold)
        if reconstruction_threshold > 1
        else float(reconstruction_threshold)
    )
    if isinstance(threshold, int) and isinstance(shares, int) and threshold >= shares:
        raise ValueError("secagg.reconstruction-threshold must be below secagg.num-shares")
    return SecAggParams(
        num_shares=shares,
        reconstruction_threshold=threshold,
        max_weight=float(max_weight),
        clipping_range=clipping_range,
        quantization_range=quantization_range,
        modulus_range=MODULUS_RANGE,
        quantization_step=step,
    )
