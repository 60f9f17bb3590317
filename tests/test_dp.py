"""Clipping, noise and accounting: properties, a statistical test, and agreement with Opacus."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant

from common.config import parse_run_config
from common.dp.accounting import epsilon, make_accountant, noise_for_target
from common.dp.clipping import clip_update, global_norm
from common.dp.noise import add_gaussian_noise
from common.dp.privatize import NOISE_TAIL_SIGMAS, Privatize, distributed_noise_std
from common.secagg import derive_secagg_params
from server.accountant import FederationAccountant
from tests.conftest import tiny_run_config


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 8), st.integers(1, 8)), min_size=1, max_size=4),
    scale=st.floats(1e-6, 1e4),
    clip=st.floats(1e-4, 10.0),
    seed=st.integers(0, 2**16),
)
def test_clipped_norm_never_exceeds_c(shapes, scale, clip, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    delta = {f"p{i}": torch.randn(s, generator=gen) * scale for i, s in enumerate(shapes)}
    clipped, norm = clip_update(delta, clip_norm=clip)
    assert global_norm(clipped) <= clip
    assert norm == pytest.approx(global_norm(delta))
    if norm <= clip:  # small updates pass through unchanged
        for name in delta:
            assert torch.allclose(clipped[name], delta[name])
    else:  # large ones keep their direction
        ratio = [
            float((clipped[n] / delta[n])[delta[n] != 0].mean()) for n in delta if delta[n].any()
        ]
        assert max(ratio) - min(ratio) < 1e-4


def test_clip_rejects_non_finite_and_bad_norm() -> None:
    with pytest.raises(ValueError, match="not finite"):
        clip_update({"a": torch.tensor([float("nan")])}, clip_norm=1.0)
    with pytest.raises(ValueError, match="clip-norm"):
        clip_update({"a": torch.ones(2)}, clip_norm=0.0)


def test_distributed_noise_sums_to_the_configured_variance() -> None:
    # Prepare: m_min clients each add N(0, (σC)²/m_min); their sum must be N(0, (σC)²).
    sigma, clip, m_min, n = 1.3, 0.5, 6, 200_000
    std = distributed_noise_std(noise_multiplier=sigma, clip_norm=clip, min_clients=m_min)
    zero = {"w": torch.zeros(n, dtype=torch.float64)}

    # Execute
    total = sum(
        add_gaussian_noise(zero, std=std, generator=torch.Generator().manual_seed(i))["w"]
        for i in range(m_min)
    )

    # Assert: the sample variance of 200k draws is within 2 % of (σC)² (≈ 6 standard errors).
    target = (sigma * clip) ** 2
    assert float(total.var()) == pytest.approx(target, rel=0.02)
    assert abs(float(total.mean())) < 5 * sigma * clip / math.sqrt(n)


@pytest.mark.parametrize(
    ("mode", "share", "central"),
    [("distributed", 1.3 * 0.5 / 2, 0.0), ("central", 0.0, 1.3 * 0.5), ("none", 0.0, 0.0)],
)
def test_the_privatize_step_reads_c_and_sigma_from_the_run_config(mode, share, central) -> None:
    # Prepare: 4 devices, every one sampled (m_min = 4).
    cfg = parse_run_config(
        tiny_run_config(**{"dp.noise-mode": mode, "dp.noise-multiplier": 1.3, "dp.clip-norm": 0.5})
    )
    update = {"a": torch.full((3,), 10.0), "b": torch.zeros(2)}

    # Execute
    step = Privatize.of(cfg, 4)
    out, norm = step(update)

    # Assert: the device's share σC/√m_min (distributed) or the server's σC (central); the
    # range SecAgg+ quantizes in covers C and the share's tail; the update is clipped to C.
    assert step.noise_std == pytest.approx(share) and step.central_std == pytest.approx(central)
    assert step.clipping_range == pytest.approx(0.5 + NOISE_TAIL_SIGMAS * share)
    assert norm == pytest.approx(math.sqrt(300.0))
    assert torch.equal(update["a"], torch.full((3,), 10.0))  # the input is untouched
    if share == 0.0:
        assert math.sqrt(sum(float(t.pow(2).sum()) for t in out.values())) <= 0.5
        assert torch.equal(out["b"], torch.zeros(2))
    else:
        assert not torch.equal(out["b"], torch.zeros(2))  # noised


def test_default_noise_generator_is_not_reproducible() -> None:
    zero = {"w": torch.zeros(16)}
    a = add_gaussian_noise(zero, std=1.0)["w"]
    b = add_gaussian_noise(zero, std=1.0)["w"]
    assert not torch.equal(a, b)


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_epsilon_matches_opacus_for_the_same_history(name) -> None:
    history = [(1.1, 0.01, 100), (0.9, 0.02, 50), (1.1, 0.01, 10)]
    ours = epsilon(history, delta=1e-5, accountant=name)
    acc = RDPAccountant() if name == "rdp" else PRVAccountant()
    for sigma, q, steps in history:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    assert ours == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-6 if name == "rdp" else 1e-2)


@settings(max_examples=15, deadline=None)
@given(sigma=st.floats(0.5, 5.0), q=st.floats(0.01, 1.0), steps=st.integers(1, 30))
def test_epsilon_grows_with_steps_and_shrinks_with_noise(sigma, q, steps) -> None:
    base = epsilon([(sigma, q, steps)], delta=1e-5)
    assert epsilon([(sigma, q, steps + 1)], delta=1e-5) >= base
    assert epsilon([(sigma * 1.5, q, steps)], delta=1e-5) <= base


def test_no_noise_is_infinite_epsilon_and_bad_history_is_rejected() -> None:
    assert epsilon([(0.0, 1.0, 1)], delta=1e-5) == math.inf
    assert epsilon([], delta=1e-5) == 0.0
    with pytest.raises(ValueError):
        make_accountant("rdp", [(1.0, 1.5, 1)])
    with pytest.raises(ValueError, match="unknown accountant"):
        make_accountant("gdp-ish")


def test_noise_for_target_is_the_physical_limit() -> None:
    # The first plan's example: N = 1000 users, 100 a round, 50 rounds, ε = 1 -> σ ≈ 3.
    sigma = noise_for_target(target_epsilon=1.0, delta=1e-5, sample_rate=0.1, steps=50)
    assert 2.8 < sigma < 3.4
    assert epsilon([(sigma, 0.1, 50)], delta=1e-5) <= 1.0
    assert epsilon([(sigma * 0.9, 0.1, 50)], delta=1e-5) > 1.0


def test_federation_accountant_round_trip_and_rejects_wrong_state() -> None:
    acc = FederationAccountant(noise_multiplier=2.0, sample_rate=0.5, delta=1e-5)
    acc.release()
    acc.release()
    state = acc.state_dict()
    other = FederationAccountant(noise_multiplier=2.0, sample_rate=0.5, delta=1e-5)
    other.load_state_dict(state)
    assert other.epsilon() == acc.epsilon() == epsilon([(2.0, 0.5, 1)] * 2, delta=1e-5)
    assert acc.epsilon(extra_rounds=1) > acc.epsilon()
    with pytest.raises(ValueError, match="noise_multiplier"):
        FederationAccountant(noise_multiplier=1.0, sample_rate=0.5, delta=1e-5).load_state_dict(
            state
        )
    with pytest.raises(ValueError, match="keys"):
        other.load_state_dict({"history": []})


def _derive(privatize: Privatize, num_clients: int, num_params: int):  # type: ignore[no-untyped-def]
    return derive_secagg_params(
        privatize,
        num_clients=num_clients,
        num_params=num_params,
        num_shares=1.0,
        reconstruction_threshold=0.67,
    )


def test_secagg_params_refuse_overflow_and_precision_loss() -> None:
    ok = _derive(Privatize(1.0, 0.3), 8, 10_000)
    # The sum of every client's quantized values fits the modulus.
    assert ok.quantization_range * (8 + 1) <= ok.modulus_range
    assert ok.clipping_range >= 1.0 + 7 * 0.3
    assert np.isfinite(ok.quantization_step)
    refused = [
        (Privatize(0.0, 0.0), 8, 10, "clip-norm"),
        (Privatize(1.0, 0.0), 2**25, 10, "quantization"),
        (Privatize(1.0, 0.0), 1000, 10**12, "swamp"),
    ]
    for privatize, clients, params, says in refused:
        with pytest.raises(ValueError, match=says):
            _derive(privatize, clients, params)
