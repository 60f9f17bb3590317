"""Distributed discrete noise inside SecAgg+'s integers: the Skellam mechanism.

With continuous noise (:mod:`common.dp.privatize`) a device adds its Gaussian share and
SecAgg+ then rounds and clips the result into integers, so what the server unmasks is not
exactly a sum the accountant analysed. Here every step that touches the numbers is in the
analysis (Kairouz, Liu, Steinke, ICML 2021; Agarwal, Kairouz, Liu, NeurIPS 2021; the same
pipeline as TensorFlow Federated's distributed-DP aggregator):

**A device** (:func:`encode`), on its update clipped to L2 norm ``C``:

1. flattens it and pads it with zeros to ``d``, a power of two;
2. **rotates** it: multiplies by random signs ``D`` drawn from the round's public seed, then
   by the orthonormal Walsh–Hadamard matrix ``H`` (every device uses the same ``D``, so the
   server undoes the rotation once, on the sum). The rotation spreads the update's norm over
   all ``d`` coordinates, so no coordinate is large and few bits suffice;
3. **scales** it by ``s`` and **rounds** each coordinate stochastically to one of its two
   neighbouring integers (unbiased). Rounding moves each coordinate by less than 1, so the
   integer vector's norm is at most ``T = s·C + √d`` — always, not with high probability:
   ``T / s`` is the sensitivity the accountant uses (:attr:`DiscreteParams.l2_sensitivity`);
4. **adds its noise share as integers**: Skellam(λ) per coordinate (the difference of two
   Poisson(λ) draws), λ = (s·σC)² / (2·m_min). Skellam is closed under sums: any ``m >= m_min``
   shares sum to Skellam noise of variance at least (s·σC)², exactly, whatever the rounding;
5. reduces the result to centred residues modulo ``2^b`` and hands them to SecAgg+, which
   masks them as they are (:func:`common.secagg.discrete_secagg_params` sets its quantizer to
   the identity on these integers).

**The server** (:func:`decode`) takes the unmasked sum modulo ``2^b``, centres it, divides by
``s``, rotates back and drops the padding: the sum of the devices' clipped updates plus noise.

**Parameters are derived, not guessed** (:meth:`DiscreteParams.derive`): the bit width is the
largest SecAgg+'s 32-bit modulus allows for the cohort (its weight factor must not wrap), and
the scale the largest whose probability that any coordinate of the sum wraps around modulo
``2^b`` stays below ``wrap_target`` (1e-9) — a Chernoff bound on the sum of the rotated
signal (sub-Gaussian over the random signs), the rounding errors (bounded) and the Skellam
noise (its exact moment generating function), over all ``d`` coordinates. A setting that
cannot meet it is refused before a round starts.

Randomness: the rotation's signs are public (derived from the round); the rounding and the
noise come from a generator seeded with 128 bits of the OS's randomness per encode
(NumPy's PCG64: a statistical, not a cryptographic, generator — as Opacus and Flower use).
"""

from __future__ import annotations

import functools
import hashlib
import math
import secrets
from dataclasses import dataclass

import numpy as np

# SecAgg+'s masks and sums live modulo 2^32 (Flower 1.42).
MODULUS_BITS = 32
# Flower's quantizer casts to int32: a residue in [0, 2^b) must fit.
MAX_BITS = 31
# The probability that any coordinate of a round's sum wraps around modulo 2^b.
WRAP_TARGET = 1e-9
# Rounding may inflate the sensitivity T/s over C by at most this much (more bits or a
# smaller cohort otherwise): the accountant charges for it, and past this the noise would
# have to grow to keep the same ε.
MAX_ROUNDING_INFLATION = 0.01


def padded_dim(dim: int) -> int:
    """The power of two the rotation works on (at least ``dim``)."""
    if dim < 1:
        raise ValueError(f"an update needs at least one number, got {dim}")
    return 1 << (dim - 1).bit_length()


def fwht(x: np.ndarray) -> np.ndarray:
    """The orthonormal Walsh–Hadamard transform of ``x`` (length a power of two): its own
    inverse, and norm-preserving."""
    d = x.shape[-1]
    if d & (d - 1):
        raise ValueError(f"the Walsh–Hadamard transform needs a power of two, got {d}")
    y = np.array(x, dtype=np.float64).reshape(-1)
    h = 1
    while h < d:
        blocks = y.reshape(-1, 2, h)
        y = np.stack((blocks[:, 0] + blocks[:, 1], blocks[:, 0] - blocks[:, 1]), axis=1)
        y = y.reshape(-1)
        h *= 2
    return y / math.sqrt(d)


def round_seed(run_id: int | str, server_round: int) -> int:
    """The rotation's public seed for one round of one run (every device and the server
    derive the same)."""
    digest = hashlib.sha256(f"fedpersona-rotation:{run_id}:{server_round}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def rotation_signs(seed: int, d: int) -> np.ndarray:
    """The rotation's ±1 signs ``D`` for a seed (public)."""
    return np.random.default_rng(seed).integers(0, 2, size=d, dtype=np.int8) * 2.0 - 1.0


def bits_for(max_contributions: int) -> int:
    """``b`` for sums of up to ``max_contributions`` updates: the most SecAgg+'s 32-bit field
    allows, since Flower's weight factor sums ``n·2^b`` in it: ``(n + 1)·2^b <= 2^32``.

    Raises:
        ValueError: If fewer than 8 bits remain.
    """
    n = int(max_contributions)
    if n < 1:
        raise ValueError(f"a sum needs at least one update, got {max_contributions}")
    bits = min(MAX_BITS, int(math.floor(MODULUS_BITS - math.log2(n + 1))))
    if bits < 8:
        raise ValueError(
            f"{n} updates per round leave {bits} bits per number under SecAgg+'s 32-bit "
            "modulus; sample fewer devices per round"
        )
    return bits


def wrap_probability(
    *, scale: float, bits: int, d: int, clip_norm: float, share_std: float, contributions: int
) -> float:
    """An upper bound on the probability that any of the ``d`` coordinates of a sum of
    ``contributions`` encoded updates leaves ``[-2^(b-1), 2^(b-1))`` (and so wraps around).

    One coordinate of the sum, in the scaled domain, is signal + rounding + noise: the signal
    ``s·(H D Σx)_j`` is sub-Gaussian over the random signs with variance proxy
    ``s²·‖Σx‖²/d <= s²(nC)²/d`` (Hoeffding); each rounding error is bounded in an interval of
    length 1 with mean 0 (proxy 1/4 each); the noise is Skellam with variance
    ``v = n·(s·share_std)²`` and moment generating function ``exp(v(cosh t − 1))``. For each
    side ``P(Z >= A) <= exp(min_t t²V/2 + v(cosh t − 1) − tA)``, with ``V`` the two proxies'
    sum and ``A = 2^(b-1)``; times 2 sides and ``d`` coordinates.
    """
    n = contributions
    limit = 2.0 ** (bits - 1)
    proxy = (scale * n * clip_norm) ** 2 / d + n / 4.0
    v = n * (scale * share_std) ** 2

    if v == 0:  # sub-Gaussian alone: the minimum is at t = A / V
        log_tail = -(limit**2) / (2 * proxy)
    else:  # the exponent is convex in t; its minimum is where its slope crosses 0
        lo, hi = 0.0, min(limit / proxy, math.asinh(limit / v))
        for _ in range(200):
            mid = (lo + hi) / 2
            if mid * proxy + v * math.sinh(mid) < limit:
                lo = mid
            else:
                hi = mid
        t = (lo + hi) / 2
        log_tail = t * t * proxy / 2 + v * (math.cosh(t) - 1) - t * limit
    return min(1.0, 2.0 * d * math.exp(log_tail))


@dataclass(frozen=True)
class DiscreteParams:
    """How one round's updates become integers (see the module docstring).

    Attributes:
        dim: Numbers in one update.
        d: The rotation's length (``dim`` padded to a power of two).
        bits: ``b``: residues live in ``[-2^(b-1), 2^(b-1))``.
        scale: ``s``.
        clip_norm: ``C``.
        share_std: One device's noise share, unscaled: ``σC / sqrt(m_min)`` (0: no noise).
        max_contributions: The most updates one sum may hold (sets ``b`` and the wrap bound).
        wrap_probability: The bound on a wrap-around in one round's sum.
    """

    dim: int
    d: int
    bits: int
    scale: float
    clip_norm: float
    share_std: float
    max_contributions: int
    wrap_probability: float

    @property
    def skellam_lambda(self) -> float:
        """λ of each of the two Poisson draws of a device's Skellam share per coordinate."""
        return (self.scale * self.share_std) ** 2 / 2.0

    @property
    def norm_bound(self) -> float:
        """``T``: the largest L2 norm an encoded update has before its noise (scaled)."""
        return self.scale * self.clip_norm + math.sqrt(self.d)

    @property
    def l2_sensitivity(self) -> float:
        """``T / s``: one device's L2 sensitivity after rounding, in the update's units."""
        return self.norm_bound / self.scale

    @property
    def l1_sensitivity(self) -> float:
        """One device's L1 sensitivity after rounding, in the update's units (on the integer
        grid ``L1 <= min(sqrt(d)·L2, L2²)``)."""
        t = self.norm_bound
        return t * min(math.sqrt(self.d), t) / self.scale

    @property
    def charge(self) -> tuple[float, float, float]:
        """``(Δ1/C, Δ2/C, s·C)``: what the Skellam accountant needs beyond σ and q, in units
        of ``C`` (:class:`common.dp.skellam.SkellamRound` with variance σ²)."""
        c = self.clip_norm
        return (self.l1_sensitivity / c, self.l2_sensitivity / c, self.scale * c)

    @classmethod
    def derive(
        cls,
        *,
        dim: int,
        clip_norm: float,
        share_std: float,
        max_contributions: int,
        wrap_target: float = WRAP_TARGET,
    ) -> DiscreteParams:
        """The largest bit width SecAgg+ allows for ``max_contributions`` updates, and the
        largest scale whose wrap-around bound stays below ``wrap_target``.

        Raises:
            ValueError: If no scale meets the bound, or rounding would inflate the
                sensitivity by more than :data:`MAX_ROUNDING_INFLATION` (the message says
                what to change).
        """
        if clip_norm <= 0:
            raise ValueError(f"discrete noise needs dp.clip-norm > 0, got {clip_norm}")
        if share_std < 0:
            raise ValueError(f"a noise share must be >= 0, got {share_std}")
        n = int(max_contributions)
        if n < 1:
            raise ValueError(f"a sum needs at least one update, got {max_contributions}")
        d = padded_dim(dim)
        bits = bits_for(n)

        def bound(scale: float) -> float:
            return wrap_probability(
                scale=scale, bits=bits, d=d, clip_norm=clip_norm, share_std=share_std,
                contributions=n,
            )  # fmt: skip

        # Bisect log(s): the bound grows with s (the signal and the noise grow as s²).
        lo, hi = -30.0, 60.0
        if bound(math.exp(lo)) > wrap_target:
            raise ValueError(
                f"no scale keeps the wrap-around probability below {wrap_target:g} with "
                f"{bits} bits for {n} updates of {d} numbers; sample fewer devices per round"
            )
        for _ in range(200):
            mid = (lo + hi) / 2
            if bound(math.exp(mid)) <= wrap_target:
                lo = mid
            else:
                hi = mid
        params = cls(
            dim=dim, d=d, bits=bits, scale=math.exp(lo), clip_norm=clip_norm,
            share_std=share_std, max_contributions=n, wrap_probability=bound(math.exp(lo)),
        )  # fmt: skip
        inflation = params.l2_sensitivity / clip_norm - 1
        if inflation > MAX_ROUNDING_INFLATION:
            raise ValueError(
                f"rounding to {bits}-bit integers would inflate the sensitivity by "
                f"{inflation:.1%} (over {MAX_ROUNDING_INFLATION:.0%}) for {n} updates of {d} "
                "numbers; sample fewer devices per round or federate fewer numbers"
            )
        return params


@functools.lru_cache(maxsize=64)
def derived(
    *, dim: int, clip_norm: float, share_std: float, max_contributions: int
) -> DiscreteParams:
    """:meth:`DiscreteParams.derive`, computed once per setting (a bisection of 200 bounds)."""
    return DiscreteParams.derive(
        dim=dim, clip_norm=clip_norm, share_std=share_std, max_contributions=max_contributions
    )


def centred(values: np.ndarray, bits: int) -> np.ndarray:
    """Integers as their residues modulo ``2^bits`` in ``[-2^(bits-1), 2^(bits-1))``."""
    half = np.int64(1) << (bits - 1)
    return ((values.astype(np.int64) + half) & ((half << 1) - 1)) - half


def encode(
    update: np.ndarray, params: DiscreteParams, seed: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """One device's clipped update as the integers it hands to SecAgg+ (module docstring):
    rotated, scaled, rounded, given its Skellam share, reduced modulo ``2^b``.

    Args:
        update: The flattened update (``params.dim`` numbers, L2 norm at most ``C``; a norm
            above ``C`` by float error is scaled back to ``C``).
        params: The round's parameters.
        seed: The round's public rotation seed (:func:`round_seed`).
        rng: The generator for rounding and noise (default: 128 bits of the OS's randomness).

    Raises:
        ValueError: On a wrong length, a non-finite value or a norm above ``C``.
    """
    x = np.asarray(update, dtype=np.float64).reshape(-1)
    if x.size != params.dim:
        raise ValueError(f"an update of {x.size} numbers, expected {params.dim}")
    if not np.all(np.isfinite(x)):
        raise ValueError("the update is not finite: nothing is sent")
    norm = float(np.linalg.norm(x))
    if norm > params.clip_norm * (1 + 1e-6):
        raise ValueError(f"the update's norm {norm:.6g} exceeds C = {params.clip_norm:g}")
    if norm > params.clip_norm:
        x = x * (params.clip_norm / norm)
    rng = rng or np.random.default_rng(secrets.randbits(128))
    padded = np.zeros(params.d)
    padded[: params.dim] = x
    scaled = fwht(padded * rotation_signs(seed, params.d)) * params.scale
    low = np.floor(scaled)
    rounded = low + (rng.random(params.d) < scaled - low)
    if float(np.linalg.norm(rounded)) > params.norm_bound:  # cannot happen: |error| < 1
        raise RuntimeError("stochastic rounding exceeded its analysed norm bound")
    ints = rounded.astype(np.int64)
    lam = params.skellam_lambda
    if lam > 0:
        ints += rng.poisson(lam, params.d) - rng.poisson(lam, params.d)
    return centred(ints, params.bits)


def decode(total: np.ndarray, params: DiscreteParams, seed: int) -> np.ndarray:
    """The sum of the encoded updates SecAgg+ unmasked (any integers congruent to it modulo
    ``2^b``) back in the updates' units: centred, unscaled, rotated back, unpadded."""
    t = np.asarray(total)
    if t.shape != (params.d,):
        raise ValueError(f"a sum of {t.size} numbers, expected {params.d}")
    ints = centred(np.rint(t).astype(np.int64), params.bits)
    return (fwht(ints / params.scale) * rotation_signs(seed, params.d))[: params.dim]


def unmasked_sum(mean: np.ndarray, weight: float, bits: int) -> np.ndarray:
    """The integer sum SecAgg+ unmasked, from what Flower hands the strategy: its weighted
    mean ``Σ w_i·y_i / Σ w_i`` of the devices' integer vectors (each sent with weight 1, or 0
    when it declined and sent zeros), times ``weight`` = ``Σ w_i``, as centred residues modulo
    ``2^bits``. Exact: the mean is a float64 ratio of integers below ``2^32``."""
    m = np.asarray(mean, dtype=np.float64)
    if not np.all(np.isfinite(m)):
        raise ValueError("the unmasked sum is not finite")
    return centred(np.rint(m * float(weight)).astype(np.int64), bits)


def offer(params: DiscreteParams, seed: int) -> dict[str, int | float | str]:
    """What the server publishes with a round (in its fit config) so that every device can
    check it against its own derivation: seed, scale, bit width, vector length."""
    return {
        "discrete-seed": str(seed),
        "discrete-scale": float(params.scale),
        "discrete-bits": int(params.bits),
        "discrete-dim": int(params.dim),
    }


def offer_problem(config: dict, params: DiscreteParams, seed: int) -> str | None:
    """Why a device will not encode its update under the server's ``config`` (``None``: it
    matches what the device derived itself from the public run config)."""
    expected = offer(params, seed)
    for key, value in expected.items():
        got = config.get(key)
        if got is None:
            return f"the round's config has no {key} (the skellam noise mode needs it)"
        same = (
            math.isclose(float(got), value, rel_tol=1e-12)
            if key == "discrete-scale"
            else (str(got) == str(value))
        )
        if not same:
            return (
                f"the server's {key} = {got!r:.40} is not the {value!r} this device derives "
                "from the run config; it encodes its update only with its own parameters"
            )
    return None
