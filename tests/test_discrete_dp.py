"""Distributed discrete noise (common/dp/discrete.py) and its accountant (common/dp/skellam.py):
the integer pipeline round-trips exactly through SecAgg+'s field, its noise is what the
accountant is fed, its parameters meet their wrap-around bound, and the RDP formulas give the
numbers the authors' accounting code gives for the same settings."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from scipy.linalg import hadamard

from common.dp import skellam
from common.dp.accounting import epsilon as gaussian_epsilon
from common.dp.discrete import (
    DiscreteParams,
    decode,
    encode,
    fwht,
    padded_dim,
    round_seed,
    wrap_probability,
)

C = 0.05


def _updates(n: int, dim: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_t(3, size=dim)  # heavy-tailed: a few large entries
        out.append(x * C / np.linalg.norm(x))
    return out


def test_the_rotation_is_the_orthonormal_walsh_hadamard_transform() -> None:
    eye = np.eye(16)
    matrix = np.array([fwht(row) for row in eye])
    assert np.allclose(matrix, hadamard(16) / 4)
    x = np.random.default_rng(1).normal(size=64)
    assert np.allclose(fwht(fwht(x)), x)
    assert math.isclose(np.linalg.norm(fwht(x)), np.linalg.norm(x))
    assert [padded_dim(n) for n in (1, 2, 3, 3072, 4096)] == [1, 2, 4, 4096, 4096]
    with pytest.raises(ValueError, match="power of two"):
        fwht(np.ones(12))


def test_noiseless_updates_round_trip_through_secagg_integers() -> None:
    # Prepare: five clipped updates; no noise, so only rounding separates the sum.
    dim, n = 3072, 5
    params = DiscreteParams.derive(dim=dim, clip_norm=C, share_std=0.0, max_contributions=n)
    seed = round_seed("run", 3)
    updates = _updates(n, dim)

    # Execute: each device's residues go through Flower's own quantizer, set as the identity
    # (clipping range 2^(b-1), 2^b levels), are summed in SecAgg+'s 32-bit field with its
    # offsets, and the server decodes the sum.
    half, levels = 2 ** (params.bits - 1), 2**params.bits
    encoded = [encode(u, params, seed) for u in updates]
    quantized = [quantize([e.astype(np.float64)], half, levels)[0] for e in encoded]
    for q, e in zip(quantized, encoded, strict=True):
        assert np.array_equal(q.astype(np.int64) - half, e)
    field = sum(q.astype(np.int64) for q in quantized) % 2**32
    unmasked = dequantize([field], half, levels)[0] - (n - 1) * half  # Flower's offset
    total = decode(np.rint(unmasked), params, seed)

    # Assert: the sum, up to rounding (each coordinate moves by < 1/s per device).
    assert np.max(np.abs(total - sum(updates))) < n * math.sqrt(params.d) / params.scale
    assert params.wrap_probability <= 1e-9 and params.bits == 29


def test_each_device_adds_a_skellam_share_and_rounding_stays_unbiased() -> None:
    # Prepare: population-like numbers (σ = 3.11, m_min = 26) for 30 devices.
    dim, n = 1024, 30
    share = 3.11 * C / math.sqrt(26)
    params = DiscreteParams.derive(dim=dim, clip_norm=C, share_std=share, max_contributions=60)
    seed = round_seed(7, 1)
    updates = _updates(n, dim, seed=2)
    rng = np.random.default_rng(11)

    # Execute
    errors = []
    for _ in range(20):
        total = sum(encode(u, params, seed, rng) for u in updates)
        errors.append(decode(total, params, seed) - sum(updates))
    err = np.concatenate(errors)

    # Assert: the decoded noise has the variance of n shares (the accountant's), mean 0.
    assert math.isclose(np.var(err), n * share**2, rel_tol=0.03)
    assert abs(np.mean(err)) < 4 * math.sqrt(n) * share / math.sqrt(err.size)
    assert params.skellam_lambda == pytest.approx((params.scale * share) ** 2 / 2)


def test_the_wrap_bound_sets_the_scale_and_impossible_settings_are_refused() -> None:
    share = 3.11 * C / math.sqrt(26)
    params = DiscreteParams.derive(dim=3072, clip_norm=C, share_std=share, max_contributions=60)
    common = dict(bits=params.bits, d=params.d, clip_norm=C, share_std=share, contributions=60)
    # The derived scale sits at the target: a little more would pass it.
    assert wrap_probability(scale=params.scale, **common) <= 1e-9
    assert wrap_probability(scale=params.scale * 1.05, **common) > 1e-9
    # (n + 1)·2^b <= 2^32 for SecAgg+'s weight factor; rounding costs < 1 % of C.
    assert (60 + 1) * 2**params.bits <= 2**32 and params.bits == 26
    assert params.l2_sensitivity / C - 1 < 0.01
    with pytest.raises(ValueError, match="sample fewer devices"):
        DiscreteParams.derive(dim=3072, clip_norm=C, share_std=share, max_contributions=2**25)
    with pytest.raises(ValueError, match="inflate the sensitivity"):
        DiscreteParams.derive(dim=2**22, clip_norm=C, share_std=share, max_contributions=10_000)
    with pytest.raises(ValueError, match="clip-norm"):
        DiscreteParams.derive(dim=8, clip_norm=0, share_std=share, max_contributions=3)


def test_encode_refuses_what_it_cannot_bound() -> None:
    params = DiscreteParams.derive(dim=8, clip_norm=C, share_std=0.01, max_contributions=3)
    with pytest.raises(ValueError, match="8"):
        encode(np.zeros(7), params, 1)
    with pytest.raises(ValueError, match="not finite"):
        encode(np.array([np.nan] + [0.0] * 7), params, 1)
    with pytest.raises(ValueError, match="exceeds C"):
        encode(np.full(8, 1.0), params, 1)
    with pytest.raises(ValueError, match="expected"):
        decode(np.zeros(3), params, 1)


def _tff_row(clip: float, z: float, d: int, scale: float) -> float:
    """ε (δ = 1e-5, q = 1, one round) of distributed Skellam at TFF's settings, with the
    rounding-inflated sensitivities of unconditional rounding (β = 0)."""
    t = clip * scale + math.sqrt(d)
    return skellam.epsilon(
        [
            skellam.SkellamRound(
                l1=t * min(math.sqrt(d), t) / scale,
                l2=t / scale,
                variance=(z * clip) ** 2,
                scale=scale,
            )
        ],
        1e-5,
    )


def test_skellam_epsilon_matches_the_authors_accounting_for_their_settings() -> None:
    # The numbers google-research/federated's distributed_dp/accounting_utils.skellam_epsilon
    # gives (TFF's default aggregator settings: 16 bits, 100 clients, C = 0.1, z = 0.5; and a
    # 2^20-dimensional model at 20 bits, z = 1), worked out in docs/research.
    assert _tff_row(0.1, 0.5, 128, 9513.6113) == pytest.approx(10.9453, abs=1e-3)
    assert _tff_row(1.0, 1.0, 2**20, 134119.886) == pytest.approx(4.7910, abs=1e-3)


def test_skellam_tends_to_the_gaussian_and_sampling_only_lowers_it() -> None:
    # Prepare: a fine grid (large scale): Skellam's extra term vanishes.
    fine = skellam.SkellamRound(l1=C * 64, l2=C, variance=(3.11 * C) ** 2, scale=1e9)
    gaussian_rdp = np.array(skellam.ORDERS) / (2 * 3.11**2)

    # Assert: the Gaussian's RDP curve at the same σ; Poisson sampling at q = 0.2 over 10
    # rounds lowers ε but, with the general subsampling bound, not below the subsampled
    # Gaussian's exact analysis (Opacus).
    assert np.allclose(skellam.round_rdp(fine), gaussian_rdp, rtol=1e-6)
    sampled = skellam.SkellamRound(**{**fine.__dict__, "sample_rate": 0.2, "steps": 10})
    unsampled = skellam.SkellamRound(**{**fine.__dict__, "steps": 10})
    eps_sampled = skellam.epsilon([sampled], 1e-5)
    assert eps_sampled < skellam.epsilon([unsampled], 1e-5)
    assert eps_sampled >= gaussian_epsilon([(3.11, 0.2, 10)], delta=1e-5)
    assert skellam.epsilon([], 1e-5) == 0.0
    with pytest.raises(ValueError):
        skellam.SkellamRound(l1=1, l2=1, variance=0, scale=1)


def test_a_sampled_federated_run_gets_the_general_subsampling_bound() -> None:
    # A fine grid (s = 1e9), 2^20 numbers, C = 0.03, z = 1, 100 of 3,400 clients per round for
    # 1,500 rounds, δ = 1/3400: 7.475051 in the authors' accounting (as Zhu & Wang's general
    # bound on the Gaussian's RDP; the subsampled Gaussian's own, tighter analysis gives 6.71).
    d, clip, scale = 2**20, 0.03, 1e9
    run = skellam.SkellamRound(
        l1=clip * math.sqrt(d),
        l2=clip,
        variance=clip**2,
        scale=scale,
        sample_rate=100 / 3400,
        steps=1500,
    )
    assert skellam.epsilon([run], 1 / 3400) == pytest.approx(7.475051, abs=1e-5)
    # Unconditional rounding's inflated sensitivity (C + √d/s) costs a little more.
    t = clip * scale + math.sqrt(d)
    rounded = skellam.SkellamRound(
        **{**run.__dict__, "l1": t * math.sqrt(d) / scale, "l2": t / scale}
    )
    assert 7.475051 < skellam.epsilon([rounded], 1 / 3400) < 7.4760


@pytest.mark.parametrize(("mu", "shift"), [(4.0, 1), (25.0, 2), (100.0, 5)])
def test_the_skellam_bound_holds_over_the_exact_divergence(mu: float, shift: int) -> None:
    from scipy.special import logsumexp
    from scipy.stats import skellam as sk

    # The exact Rényi divergence of a shifted 1-D Skellam of variance μ from the centred one.
    k = np.arange(-400, 401)
    log_p, log_q = sk.logpmf(k - shift, mu / 2, mu / 2), sk.logpmf(k, mu / 2, mu / 2)
    keep = np.isfinite(log_p) & np.isfinite(log_q)
    for order in (2, 4, 16, 64):
        exact = logsumexp(order * log_p[keep] + (1 - order) * log_q[keep]) / (order - 1)
        bound = skellam.skellam_rdp(order, l1=shift, l2=shift, variance=mu, scale=1.0)
        assert exact <= bound * (1 + 1e-9), (mu, shift, order)
        assert bound >= order * shift**2 / (2 * mu)  # never below the Gaussian's
