"""The device's privacy ledger: caps, declines, periods, persistence, Opacus agreement."""

from __future__ import annotations

import pytest
from opacus.accountants import RDPAccountant

from client.federation.ledger import BudgetExhausted, PrivacyLedger
from common.config import PrivacyCaps
from tests.conftest import open_test_store

DAY = 86400.0


def test_declines_exactly_when_the_cap_would_be_crossed() -> None:
    ledger = PrivacyLedger(PrivacyCaps(epsilon_cap=1.0, delta=1e-5))
    user = (7.1, 1.0, 1)
    charged = 0
    while True:
        try:
            after = ledger.check(record=None, user=user)
        except BudgetExhausted as err:
            assert "privacy budget exhausted" in str(err) and "privacy.epsilon-cap" in str(err)
            break
        assert after["user"] <= 1.0
        ledger.charge(server_round=charged + 1, record=None, user=user)
        charged += 1
    assert charged == 3  # σ = 7.1 buys three rounds under ε = 1 without sampling credit
    assert ledger.epsilon("user") <= 1.0
    assert ledger.rounds_charged() == 3


def test_epsilon_matches_opacus_accountant() -> None:
    ledger = PrivacyLedger(PrivacyCaps(epsilon_cap=100.0, delta=1e-5))
    ledger.charge(server_round=1, record=(1.0, 0.04, 5), user=(3.0, 1.0, 1))
    ledger.charge(server_round=2, record=(1.0, 0.04, 5), user=(3.0, 1.0, 1))
    acc = RDPAccountant()
    for _ in range(10):
        acc.step(noise_multiplier=1.0, sample_rate=0.04)
    assert ledger.epsilon("record") == pytest.approx(acc.get_epsilon(delta=1e-5))


def test_period_cap_limits_recent_spend_without_erasing_lifetime() -> None:
    policy = PrivacyCaps(epsilon_cap=10.0, delta=1e-5, period_days=30, period_epsilon_cap=1.0)
    ledger = PrivacyLedger(policy)
    t0 = 1_000_000_000.0
    user = (7.1, 1.0, 1)
    for r in range(3):
        ledger.charge(server_round=r, record=None, user=user, now=t0)
    with pytest.raises(BudgetExhausted, match="period budget"):
        ledger.check(record=None, user=user, now=t0 + DAY)
    lifetime = ledger.epsilon("user")
    # A new period allows spending again; the lifetime total still counts everything.
    ledger.check(record=None, user=user, now=t0 + 31 * DAY)
    ledger.charge(server_round=4, record=None, user=user, now=t0 + 31 * DAY)
    assert ledger.epsilon("user") > lifetime
    assert len(ledger.events) == 4


def test_round_trip_and_rejects_wrong_state(tmp_path) -> None:
    policy = PrivacyCaps(epsilon_cap=5.0, delta=1e-5)
    ledger = PrivacyLedger(policy)
    ledger.charge(server_round=1, record=(1.0, 0.1, 3), user=(2.0, 1.0, 1))
    ledger.note_declined(server_round=2, reason="cap")
    store = open_test_store(tmp_path / "dev")
    ledger.save(store)
    loaded = PrivacyLedger.load(store, policy)
    assert loaded.state_dict() == ledger.state_dict()
    assert loaded.epsilon("user") == ledger.epsilon("user")

    state = ledger.state_dict()
    for bad in (
        {k: v for k, v in state.items() if k != "events"},
        {**state, "version": 99},
        {**state, "accountant": "prv"},
        {**state, "events": [{"kind": "user"}]},
        {**state, "events": [{**state["events"][0], "sample_rate": 2.0}]},
        {**state, "events": [{**state["events"][0], "alone_noise_multiplier": -1.0}]},
    ):
        with pytest.raises(ValueError):
            PrivacyLedger(policy).load_state_dict(bad)
    with pytest.raises(ValueError, match="δ"):
        PrivacyLedger.load(store, PrivacyCaps(epsilon_cap=5.0, delta=1e-6))
    store.close()


def test_saved_epsilon_is_the_accountants_and_v1_ledgers_still_load(tmp_path) -> None:
    # Prepare: a ledger with both kinds of charge, saved (version 2 keeps ε beside events).
    policy = PrivacyCaps(epsilon_cap=50.0, delta=1e-5)
    ledger = PrivacyLedger(policy)
    ledger.charge(server_round=1, record=(1.1, 0.05, 5), user=(3.0, 1.0, 1))
    ledger.charge(server_round=2, record=None, user=(3.0, 0.5, 2))
    state = ledger.state_dict()
    acc = RDPAccountant()
    acc.step(noise_multiplier=3.0, sample_rate=1.0)
    for _ in range(2):
        acc.step(noise_multiplier=3.0, sample_rate=0.5)

    # Execute
    loaded = PrivacyLedger(policy)
    loaded.load_state_dict(state)
    v1 = PrivacyLedger(policy)
    old_events = [{k: v for k, v in e.items() if k != "run"} for e in state["events"]]
    v1.load_state_dict(
        {
            **{k: v for k, v in state.items() if k != "epsilon"},
            "version": 1,
            "events": old_events,
        }
    )

    # Assert: the stored ε is Opacus' for exactly these events, and a v1 ledger (events
    # without their run) recomputes it.
    assert state["version"] == 5
    assert {e["run"] for e in v1.events} == {""}
    # A version-4 ledger (kept before the alone kind) loads with nothing spent alone.
    v4 = PrivacyLedger(policy)
    v4_eps = {k: v for k, v in state["epsilon"].items() if k != "alone"}
    v4.load_state_dict({**state, "version": 4, "epsilon": v4_eps})
    assert v4.epsilon("alone") == 0.0 and v4.summary() == ledger.summary()
    assert state["epsilon"]["user"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-12)
    assert loaded.summary() == ledger.summary()
    assert v1.epsilon("user") == pytest.approx(state["epsilon"]["user"], rel=1e-12)
    assert v1.epsilon("record") == pytest.approx(state["epsilon"]["record"], rel=1e-12)
    # A new charge invalidates the stored value.
    loaded.charge(server_round=3, record=None, user=(3.0, 1.0, 1))
    assert loaded.epsilon("user") > state["epsilon"]["user"]
    bad_eps = (
        {"user": -1.0, "record": 0.0},
        {"user": float("nan"), "record": 0.0},
        {"user": 1},
        {"user": 0.0, "record": 0.0, "alone": -1.0},
    )
    for bad in bad_eps:
        with pytest.raises(ValueError, match="epsilon"):
            PrivacyLedger(policy).load_state_dict({**state, "epsilon": bad})
    with pytest.raises(ValueError, match="keys"):
        PrivacyLedger(policy).load_state_dict({**state, "version": 1})


def test_corrupted_ledger_is_reported_and_kept(tmp_path) -> None:
    with open_test_store(tmp_path / "dev") as store:
        store.put_blob("ledger", b'{"version": 1, "events": [')
        with pytest.raises(ValueError, match="corrupted privacy ledger"):
            PrivacyLedger.load(store, PrivacyCaps())
        assert store.get_blob("ledger") == b'{"version": 1, "events": ['


def test_saved_ledger_survives_reopening_the_store(tmp_path) -> None:
    ledger = PrivacyLedger(PrivacyCaps())
    ledger.charge(server_round=1, record=None, user=(7.1, 1.0, 1))
    with open_test_store(tmp_path / "dev") as store:
        ledger.save(store)
    with open_test_store(tmp_path / "dev") as store:
        loaded = PrivacyLedger.load(store, PrivacyCaps())
    assert loaded.events[0]["round"] == 1
    assert loaded.epsilon("user") == pytest.approx(ledger.epsilon("user"))


def test_device_charges_match_the_server_accountant_with_verifiable_sampling(tmp_path) -> None:
    # Prepare: q = 0.25; the device joins rounds 1 and 4 of 4.
    from client.federation.device import Device
    from common.config import parse_run_config
    from common.dp.accounting import epsilon
    from tests.conftest import open_test_store, tiny_run_config

    raw = tiny_run_config(
        **{"privacy.verifiable-sampling": True, "fraction-train": 0.25, "privacy.epsilon-cap": 50.0}
    )
    device = Device.simulated(
        parse_run_config(raw),
        store=open_test_store(tmp_path / "dev"),
        partition_id=0,
        num_partitions=4,
    )
    sigma = device.cfg.dp.noise_multiplier

    # Execute
    first = device.planned_charges(1).user
    device.ledger.charge(server_round=1, record=None, user=first)
    later = device.planned_charges(4).user
    device.ledger.charge(server_round=4, record=None, user=later)

    # Assert: the device has charged all four federation rounds at rate q, as the server does.
    assert first == (sigma, 0.25, 1) and later == (sigma, 0.25, 3)
    assert device.ledger.epsilon("user") == pytest.approx(epsilon([(sigma, 0.25, 4)], delta=1e-5))


def test_without_verifiable_sampling_each_joined_round_costs_q_one(tmp_path) -> None:
    from client.federation.device import Device
    from common.config import parse_run_config
    from tests.conftest import open_test_store, tiny_run_config

    device = Device.simulated(
        parse_run_config(tiny_run_config()),
        store=open_test_store(tmp_path / "dev"),
        partition_id=1,
        num_partitions=4,
    )
    record, user, alone = device.planned_charges(7)
    assert record is None
    assert user == (device.cfg.dp.noise_multiplier, 1.0, 1)
    # Alone: one round of its update with its own noise share only (σC/√m_min over C).
    m_min = device.cfg.m_min(4)
    assert alone == (pytest.approx(device.cfg.dp.noise_multiplier / m_min**0.5), 1.0, 1)


def test_local_dp_sgd_charges_record_level_epsilon(tmp_path) -> None:
    # Prepare: Opacus DP-SGD on the device, 2 steps at the device's Poisson rate.
    from client.federation.device import Device
    from common.config import parse_run_config
    from common.dp.accounting import epsilon
    from tests.conftest import open_test_store, tiny_run_config

    raw = tiny_run_config(
        **{
            "dp.local.enabled": True,
            "dp.local.noise-multiplier": 1.2,
            "privacy.epsilon-cap": 50.0,
            "dp.noise-mode": "none",
        }
    )
    device = Device.simulated(
        parse_run_config(raw),
        store=open_test_store(tmp_path / "dev"),
        partition_id=0,
        num_partitions=4,
    )
    rt = device.rt
    g = {n: rt.init[n] for n in rt.shared_names}

    # Execute
    result = device.train(g, server_round=1)

    # Assert
    q = device.cfg.train.batch_size / len(device.train_set)
    assert not result.declined
    assert device.ledger.epsilon("record") == pytest.approx(
        epsilon([(1.2, q, device.cfg.train.local_steps)], delta=1e-5)
    )
    assert result.metrics["record_epsilon"] == pytest.approx(device.ledger.epsilon("record"))
    assert any(float(t.abs().sum()) > 0 for t in result.update.values())
    assert device.ledger.epsilon("user") == 0.0  # no user-level noise, nothing charged
    from common.dp.clipping import global_norm

    assert global_norm(result.update) <= device.cfg.dp.clip_norm


def test_server_stops_before_the_target_epsilon() -> None:
    import numpy as np

    from server.accountant import FederationAccountant
    from server.recorder import RoundRecorder
    from server.release import RoundOptions
    from server.secagg import SecAggDPStrategy

    acc = FederationAccountant(noise_multiplier=7.1, sample_rate=1.0, delta=1e-5)
    strategy = SecAggDPStrategy(
        RoundOptions(
            recorder=RoundRecorder(acc),
            min_updates=2,
            target_epsilon=0.8,
        ),
        shared_names=["w"],
        initial=[np.zeros(2, dtype=np.float32)],
        min_nodes=2,
    )
    acc.release()
    acc.release()  # ε = 0.79 after two rounds; a third would give 0.99 > 0.8
    assert strategy.configure_fit(3, None, client_manager=None) == []  # type: ignore[arg-type]
    assert strategy.stopped_at == 3
