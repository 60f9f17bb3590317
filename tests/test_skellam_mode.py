"""``dp.noise-mode = "skellam"``: devices add their noise as integers inside SecAgg+'s field,
through Flower's real workflow and mod — the server decodes exactly what the devices sent, the
device and the server charge the same Skellam ε, and a server that bends the derived encoding
or drops devices after masking gets no under-noised sum."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig

from common.config import parse_run_config
from common.dp import skellam
from common.dp.accounting import epsilon, noise_for_target
from common.dp.discrete import encode, round_seed
from common.dp.privatize import Privatize
from common.secagg import derive_secagg_params
from server.accountant import FederationAccountant
from server.recorder import RoundRecorder
from server.release import RoundOptions
from server.secagg import SecAggDPStrategy, secagg_workflow
from tests.conftest import device_node_config, open_test_store, permissive_policy, tiny_run_config
from tests.flower_harness import InProcessGrid, secagg_device_round

C = 0.05


def _integer_app(vectors: dict[int, np.ndarray], weights: dict[int, int]) -> ClientApp:
    """Node ``i`` sends ``vectors[i]`` (integers, as float64) with weight ``weights[i]`` (0:
    it declined, and says so as a device does)."""
    app = ClientApp(mods=[secaggplus_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        nid = context.node_id
        arrays = [vectors[nid].astype(np.float64)]
        metrics = {"declined": int(weights[nid] == 0)}
        res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(arrays), weights[nid], metrics)
        return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)

    return app


def test_flowers_secagg_carries_the_integers_exactly_and_the_server_decodes_the_mean() -> None:
    # Prepare: five devices' clipped updates of two tensors (19 numbers), encoded without
    # noise so only rounding separates the result; device 4 declined (zeros, weight 0).
    shapes, n = [(7,), (3, 4)], 5
    privatize = Privatize(C, 0.0, max_contributions=n)
    params = privatize.discrete_params(19)
    rng = np.random.default_rng(0)
    updates = {}
    for nid in range(1, n + 1):
        x = rng.normal(size=19)
        updates[nid] = x * C / np.linalg.norm(x)
    seed = round_seed(1, 1)
    vectors = {nid: encode(u, params, seed) for nid, u in updates.items()}
    vectors[4] = np.zeros(params.d, dtype=np.int64)
    weights = {nid: int(nid != 4) for nid in updates}
    secagg = derive_secagg_params(
        privatize, num_clients=n, num_params=19, num_shares=1.0, reconstruction_threshold=0.6
    )
    strategy = SecAggDPStrategy(
        RoundOptions(recorder=RoundRecorder(None), min_updates=4),
        shared_names=["t0", "t1"],
        initial=[np.zeros(s, dtype=np.float32) for s in shapes],
        min_nodes=n,
        discrete=params,
        run_id=1,
    )
    grid = InProcessGrid(_integer_app(vectors, weights), {nid: {} for nid in updates})
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})

    # Execute: one round of Flower's SecAgg+ at the derived (identity) range.
    workflow = secagg_workflow(secagg, timeout=30, min_masked=4, evaluate=False, fixed_range=True)
    workflow(grid, LegacyContext(context=ctx, config=ServerConfig(num_rounds=1), strategy=strategy))

    # Assert: the identity range, and the mean of the four senders' updates up to rounding
    # (< 1/s per coordinate per device, rotated back).
    assert (secagg.clipping_range, secagg.quantization_range) == (
        2 ** (params.bits - 1),
        2**params.bits,
    )
    sent = [updates[nid] for nid in updates if nid != 4]
    expected = sum(sent) / 4
    got = np.concatenate([a.reshape(-1) for a in strategy.current])
    assert np.max(np.abs(got - expected)) < math.sqrt(params.d) / params.scale
    assert strategy.recorder._train[1]["released"] is True


def _skellam_devices(tmp_path, n: int = 3, **extra):  # type: ignore[no-untyped-def]
    raw = tiny_run_config(
        **{
            "data.num-users": n,
            "dp.min-clients": n,
            "train.local-steps": 1,
            "dp.clip-norm": 0.01,
            "dp.noise-mode": "skellam",
            "dp.noise-multiplier": 6.0,
            "ab.interactions": 0,
            **extra,
        }
    )
    policy = permissive_policy(require_secagg=True, min_cohort=n)
    nodes = {
        nid: device_node_config(tmp_path / f"d{nid}", nid - 1, n, policy=policy)
        for nid in range(1, n + 1)
    }
    return raw, nodes


def _ledger(tmp_path, nid: int) -> dict:  # type: ignore[no-untyped-def]
    with open_test_store(tmp_path / f"d{nid}") as store:
        return store.get_json("ledger")


def test_real_devices_charge_the_skellam_epsilon_the_server_charges(tmp_path) -> None:
    # Prepare: three real devices in skellam mode, m_min = 3.
    raw, nodes = _skellam_devices(tmp_path)
    cfg = parse_run_config(raw)

    # Execute
    grid, strategy = secagg_device_round(raw, nodes, min_updates=3)

    # Assert: released; each device charged one Skellam round with the rounding the server
    # derived, and its ε is the server accountant's for the same round, above the Gaussian's.
    assert strategy.recorder._train[1]["released"] is True
    rounding = strategy.discrete.charge
    server = FederationAccountant(
        noise_multiplier=6.0, sample_rate=1.0, delta=cfg.privacy.delta, rounding=rounding
    )
    server.release()
    for nid in nodes:
        ledger = _ledger(tmp_path, nid)
        (event,) = ledger["events"]
        assert event["kind"] == "user" and np.allclose(event["discrete"], rounding)
        assert math.isclose(ledger["epsilon"]["user"], server.epsilon("rdp"), rel_tol=1e-9)
    gaussian = epsilon([(6.0, 1.0, 1)], delta=cfg.privacy.delta)
    assert server.epsilon("rdp") >= gaussian


# What a server could publish other than the devices derive, and the words of the reason.
BENT_OFFERS = {
    "rotation seed": ({"server_run_id": 2}, "discrete-seed"),
    "scale": ({"offer_override": {"scale": 1.0}}, "discrete-scale"),
    "bit width": ({"offer_override": {"bits": 20}}, "discrete-bits"),
}


@pytest.mark.parametrize("bent", BENT_OFFERS)
def test_a_server_publishing_another_encoding_is_declined_with_the_reason(tmp_path, bent) -> None:
    # Prepare
    raw, nodes = _skellam_devices(tmp_path)
    override, words = BENT_OFFERS[bent]

    # Execute
    _, strategy = secagg_device_round(raw, nodes, min_updates=3, **override)

    # Assert: every device declined the round (nothing charged, the reason kept), so nothing
    # was released.
    assert strategy.recorder._train[1]["released"] is False
    for nid in nodes:
        ledger = _ledger(tmp_path, nid)
        assert ledger["events"] == []
        assert words in ledger["declined"][-1]["reason"]


def test_a_secagg_range_other_than_the_identity_is_declined_at_setup(tmp_path) -> None:
    # Prepare: the server sends its continuous-mode range instead of 2^(b-1).
    raw, nodes = _skellam_devices(tmp_path)

    # Execute
    grid, strategy = secagg_device_round(
        raw, nodes, min_updates=3, params_override={"clipping_range": 0.5}
    )

    # Assert
    assert strategy.recorder._train[1]["released"] is False
    for nid in nodes:
        assert "is not the identity" in _ledger(tmp_path, nid)["declined"][-1]["reason"]


def test_a_server_dropping_a_device_after_masking_gets_no_under_noised_sum(tmp_path) -> None:
    # Prepare: noise shares sized for m_min = 3; device 3 is lost after key sharing, and a
    # curious server (min_masked = 1) asks the two survivors to unmask their sum anyway.
    raw, nodes = _skellam_devices(tmp_path)

    # Execute
    grid, strategy = secagg_device_round(
        raw, nodes, min_updates=3, min_masked=1, drop={"collect_masked_vectors": {3}}
    )

    # Assert: both survivors refused to hand out their mask shares; nothing was released.
    unmask = {nid: r for nid, s, r in grid.received if s == "unmask"}
    assert sorted(unmask) == [1, 2]
    assert all("device error: unmask-refused" in r.error.reason for r in unmask.values())
    assert strategy.recorder._train[1]["released"] is False


def test_skellam_accounting_composes_with_gaussian_rounds_and_survives_a_restart() -> None:
    # Prepare: a population-like setting (q = 0.2, 10 rounds).
    privatize = Privatize(C, 3.11 * C / math.sqrt(26), max_contributions=200)
    rounding = privatize.discrete_params(3072).charge
    entry = (3.11, 0.2, 10, rounding)

    # Execute / Assert: the history form gives the Skellam module's own number, above the
    # Gaussian's; both accountant names give it (there is no PRV analysis of Skellam).
    direct = skellam.epsilon(
        [skellam.SkellamRound(rounding[0], rounding[1], 3.11**2, rounding[2], 0.2, 10)], 1e-5
    )
    assert math.isclose(epsilon([entry], delta=1e-5), direct)
    assert epsilon([entry], delta=1e-5, accountant="prv") == epsilon([entry], delta=1e-5)
    assert direct > epsilon([(3.11, 0.2, 10)], delta=1e-5)
    mixed = epsilon([entry, (3.11, 0.2, 1)], delta=1e-5)
    assert mixed > direct

    # The server's accountant keeps its mechanism across a restart and refuses another one.
    acc = FederationAccountant(
        noise_multiplier=3.11, sample_rate=0.2, delta=1e-5, rounding=rounding
    )
    acc.release()
    state = acc.state_dict()
    again = FederationAccountant(
        noise_multiplier=3.11, sample_rate=0.2, delta=1e-5, rounding=rounding
    )
    again.load_state_dict(state)
    assert again.epsilon() == acc.epsilon()
    gaussian = FederationAccountant(noise_multiplier=3.11, sample_rate=0.2, delta=1e-5)
    with pytest.raises(ValueError, match="another mechanism"):
        gaussian.load_state_dict(state)


def test_the_noise_for_a_target_accounts_for_the_skellam_rounding() -> None:
    # σ for ε = 1 over 10 rounds at q = 0.2 (population's shape): above the Gaussian's 3.105
    # (the general subsampling bound), and the ε it gives is within the target.
    def rounding(sigma: float) -> tuple[float, float, float]:
        share = sigma * C / math.sqrt(26)
        return Privatize(C, share, max_contributions=200).discrete_params(3072).charge

    sigma = noise_for_target(
        target_epsilon=1.0, delta=1e-5, sample_rate=0.2, steps=10, rounding=rounding
    )
    assert 3.2 < sigma < 6.0
    assert epsilon([(sigma, 0.2, 10, rounding(sigma))], delta=1e-5) <= 1.0
    assert epsilon([(sigma * 0.99, 0.2, 10, rounding(sigma * 0.99))], delta=1e-5) > 1.0


def test_skellam_mode_needs_secagg_and_its_ledger_events_are_validated(tmp_path) -> None:
    from client.federation.ledger import PrivacyLedger
    from common.config import PrivacyCaps

    with pytest.raises(ValueError, match="dp.noise-mode.*secagg.enabled"):
        parse_run_config(tiny_run_config(**{"dp.noise-mode": "skellam", "secagg.enabled": False}))
    ledger = PrivacyLedger(PrivacyCaps())
    ledger.charge(server_round=1, record=None, user=(1.0, 1.0, 1, (1.2, 1.0, 5e6)), run="r")
    state = ledger.state_dict()
    restored = PrivacyLedger(PrivacyCaps())
    restored.load_state_dict(state)
    assert restored.epsilon("user") == ledger.epsilon("user") > 0
    bad = replace_event(state, discrete=[1.0, -1.0, 5e6])
    with pytest.raises(ValueError, match="discrete"):
        PrivacyLedger(PrivacyCaps()).load_state_dict(bad)


def replace_event(state: dict, **changes) -> dict:  # type: ignore[no-untyped-def]
    """``state`` with its first event changed."""
    events = [dict(state["events"][0], **changes), *state["events"][1:]]
    return {**state, "events": events}


def test_a_discrete_privatize_never_adds_gaussian_noise() -> None:
    import torch

    privatize = Privatize(C, 0.01, max_contributions=4)
    update = {"a": torch.full((8,), 1.0)}
    clipped, norm = privatize(update)
    assert norm == pytest.approx(math.sqrt(8))
    assert torch.allclose(clipped["a"], torch.full((8,), C / math.sqrt(8)))
    assert replace(privatize, max_contributions=0).clipping_range == pytest.approx(C + 0.07)


def test_a_non_finite_or_empty_unmasked_sum_releases_nothing() -> None:
    privatize = Privatize(C, 0.0, max_contributions=4)
    params = privatize.discrete_params(8)
    strategy = SecAggDPStrategy(
        RoundOptions(recorder=RoundRecorder(None), min_updates=2),
        shared_names=["t"],
        initial=[np.zeros(8, dtype=np.float32)],
        min_nodes=2,
        discrete=params,
        run_id=1,
    )
    res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([]), 1, {})
    results = [(None, res), (None, res)]
    bad = np.full(params.d, np.nan)
    assert strategy._decoded(1, [bad], results, users=2) == ([], None)
    assert strategy._decoded(1, [], results, users=2) == ([], None)
    good = strategy._decoded(1, [np.zeros(params.d)], results, users=2)[0]
    assert [a.shape for a in good] == [(8,)] and not np.any(good[0])
