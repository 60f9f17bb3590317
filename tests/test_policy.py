"""The device's own privacy policy against a server that asks for less than its owner accepts.

Each attack is a run config (or a message) a curious server could send; the device must
decline it before training, charge nothing, send nothing but the decline, and say why.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from client.client_app import train as client_train
from client.federation.device import Device
from client.federation.policy import KNOB_LIMITS, DevicePolicy
from client.federation.runtime import get_runtime
from common.config import parse_run_config
from common.serialization import to_arrayrecord
from common.train import train_steps_dp
from tests.conftest import (
    device_node_config,
    make_context,
    make_message,
    open_test_store,
    tiny_run_config,
)

# What the default policy accepts: SecAgg+-masked distributed noise, σ >= 1, m_min >= 8,
# shares sized for at most half of a cohort honest, and for at most 10,000 honest devices.
HONEST = {
    "data.num-users": 8,
    "dp.noise-multiplier": 7.1,
    "dp.honest-fraction": 0.5,
    "privacy.epsilon-cap": 1.0,
}

ATTACKS = {
    "noise off": {"dp.noise-mode": "none"},
    "σ = 0": {"dp.noise-multiplier": 0.0},
    "σ below the floor": {"dp.noise-multiplier": 0.5},
    "m_min = 1": {"dp.min-clients": 1},
    "central noise": {"dp.noise-mode": "central"},
    "every device assumed honest": {"dp.honest-fraction": 1.0},
    "a cohort of a million": {"dp.min-clients": 1_000_000},
}


def _global(cfg):
    rt = get_runtime(cfg)
    return {n: rt.init[n] for n in rt.shared_names}


def _real_device(tmp_path, cfg, *, partitions: int = 8) -> Device:
    """A user's device with the default policy (``device init`` keeps the same one)."""
    device_node_config(tmp_path / "dev", 0, 4, policy=None)  # fill the store with examples
    store = open_test_store(tmp_path / "dev")
    return Device(cfg, store=store, num_partitions=partitions)


def test_the_default_policy_accepts_the_default_federation() -> None:
    cfg = parse_run_config(tiny_run_config(**HONEST))
    assert DevicePolicy().refusal(cfg, num_partitions=8, masked=True) is None


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_weaker_round_is_refused_by_the_default_policy(attack) -> None:
    cfg = parse_run_config(tiny_run_config(**{**HONEST, **ATTACKS[attack]}))
    masked = cfg.secagg.enabled  # the server decides whether SecAgg+ runs
    reason = DevicePolicy().refusal(cfg, num_partitions=8, masked=masked)
    assert reason is not None and len(reason) > 20


def test_distributed_noise_is_refused_when_the_message_is_not_masked() -> None:
    # A config that turns SecAgg+ off under distributed noise does not even parse ...
    with pytest.raises(ValueError, match="secagg.enabled"):
        parse_run_config(tiny_run_config(**{**HONEST, "secagg.enabled": False}))
    # ... and a server that says secagg.enabled = true but sends a plain Message-API round
    # is refused by the device.
    cfg = parse_run_config(tiny_run_config(**HONEST))
    assert "SecAgg+" in DevicePolicy().refusal(cfg, num_partitions=8, masked=False)
    owner_accepts = DevicePolicy(require_secagg=False)
    assert owner_accepts.refusal(cfg, num_partitions=8, masked=False) is None


@pytest.mark.parametrize("key", KNOB_LIMITS)
def test_every_server_knob_is_bounded_on_the_device(key) -> None:
    _, limit = KNOB_LIMITS[key]
    at = parse_run_config(tiny_run_config(**{**HONEST, key: limit}))
    above = parse_run_config(tiny_run_config(**{**HONEST, key: limit + 1}))
    assert DevicePolicy().refusal(at, num_partitions=8, masked=True) is None
    assert key in DevicePolicy().refusal(above, num_partitions=8, masked=True)


@pytest.mark.parametrize(
    ("key", "limit"), [("data.max-seq-len", 4096), ("model.lora-r", 256), ("ab.interactions", 64)]
)
def test_the_other_knobs_are_bounded_when_the_config_is_parsed(key, limit) -> None:
    parse_run_config(tiny_run_config(**{**HONEST, key: limit}))
    with pytest.raises(ValueError, match=key):
        parse_run_config(tiny_run_config(**{**HONEST, key: limit + 1}))


@pytest.mark.parametrize("attack", ["noise off", "σ below the floor", "m_min = 1", "central noise"])
def test_a_device_declines_a_weaker_round_and_its_ledger_is_unchanged(
    tmp_path, caplog, attack
) -> None:
    # Prepare: a real device that has already spent on one honest round.
    honest = parse_run_config(tiny_run_config(**HONEST))
    device = _real_device(tmp_path, honest)
    assert not device.train(_global(honest), server_round=1, run="1", masked=True).declined
    events = [dict(e) for e in device.ledger.events]
    personal = device.state.load_personal()
    device.store.close()

    # Execute: the server's next run asks for less.
    cfg = parse_run_config(tiny_run_config(**{**HONEST, **ATTACKS[attack]}))
    with open_test_store(tmp_path / "dev") as store:
        device = Device(cfg, store=store, num_partitions=8)
        with caplog.at_level(logging.WARNING, logger="client.federation.device"):
            result = device.train(_global(cfg), server_round=1, run="2", masked=True)

        # Assert: declined, nothing charged or trained, the reason logged and kept; what
        # leaves is zeros — or, with distributed noise, inside the masked stage it already
        # joined, its noise share alone (weight 1 in the sum, nobody's update).
        assert result.declined and result.metrics["declined"] == 1
        assert result.noise_share == cfg.dp.distributed
        flat = torch.cat([t.reshape(-1) for t in result.update.values()])
        if result.noise_share:
            assert flat.std().item() == pytest.approx(device.privatize.noise_std, rel=0.1)
            assert result.metrics["noise_shares"] == 1
        else:
            assert not flat.any()
        assert device.ledger.events == events
        after = device.state.load_personal()
        assert all(torch.equal(after[n], personal[n]) for n in personal)
        assert device.ledger.declined[-1]["reason"] in caplog.text
        assert "policy" in device.ledger.declined[-1]["reason"]


def test_the_servers_privacy_keys_do_not_move_the_devices_cap(tmp_path) -> None:
    # A server that raises privacy.epsilon-cap to 1000 and lowers δ: the device keeps its own.
    cfg = parse_run_config(
        tiny_run_config(**{**HONEST, "privacy.epsilon-cap": 1000.0, "privacy.delta": 0.5})
    )
    device = _real_device(tmp_path, cfg)
    try:
        assert device.ledger.policy.epsilon_cap == 1.0
        assert device.ledger.policy.delta == 1e-5
        # σ = 1.0 at q = 1: one round costs ε > 1, so the device declines it.
        weak = parse_run_config(tiny_run_config(**{**HONEST, "dp.noise-multiplier": 1.0}))
        device.cfg = weak
        assert device.train(_global(weak), server_round=1, masked=True).declined
        assert "budget" in device.ledger.declined[-1]["reason"]
    finally:
        device.store.close()


def test_a_claimed_sampling_rate_is_credited_only_when_the_device_drew_the_coin(
    tmp_path,
) -> None:
    # A server that claims verifiable sampling at 1 % while it picks this device every round.
    cfg = parse_run_config(
        tiny_run_config(**{**HONEST, "fraction-train": 0.01, "privacy.verifiable-sampling": True})
    )
    device = _real_device(tmp_path, cfg)
    try:
        assert device.planned_charges(1, run="1")[1] == (7.1, 1.0, 1)  # no credit
        assert device.planned_charges(1, run="1", self_sampled=True)[1] == (7.1, 0.01, 1)
        owner_trusts = device.policy.with_changes(trust_server_sampling=True)
        assert owner_trusts.sample_rate(cfg, self_sampled=False) == 0.01
    finally:
        device.store.close()


def test_two_runs_in_a_row_charge_every_round_of_each(tmp_path) -> None:
    # Prepare: a device that draws its own coin at q = 0.5 (a simulated user on a node).
    cfg = parse_run_config(
        tiny_run_config(**{**HONEST, "fraction-train": 0.5, "dp.min-clients": 8})
    )
    device = _real_device(tmp_path, cfg)
    g = _global(cfg)
    try:
        # Execute: run "1" round 3, then a new run "2" whose round numbers restart, round 2.
        for run, rnd in (("1", 3), ("2", 2), ("2", 5)):
            result = device.train(g, server_round=rnd, run=run, masked=True, self_sampled=True)
            assert not result.declined

        # Assert: 3 steps, then 2 (rounds 1–2 of the new run), then 3 (rounds 3–5).
        user = [e for e in device.ledger.events if e["kind"] == "user"]
        assert [(e["run"], e["round"], e["steps"]) for e in user] == [
            ("1", 3, 3),
            ("2", 2, 2),
            ("2", 5, 3),
        ]
        assert device.ledger.rounds_charged() == 3
    finally:
        device.store.close()


def test_a_plain_message_with_distributed_noise_is_declined_through_the_client_app(
    tmp_path,
) -> None:
    # Prepare: the default federation's config, but the round comes without SecAgg+.
    raw = tiny_run_config(**HONEST)
    cfg = parse_run_config(raw)
    node = device_node_config(tmp_path / "dev", 0, 8, policy=None)
    ctx = make_context(raw, node)

    # Execute
    reply = client_train(make_message(to_arrayrecord(_global(cfg)), "train"), ctx)

    # Assert: declined, the change sent is zero (and weighs nothing), nothing charged.
    assert reply.content["metrics"]["declined"] == 1
    assert reply.content["metrics"]["weight"] == 0
    assert set(reply.content["arrays"]) == set(_global(cfg))
    for array in reply.content["arrays"].values():
        assert not array.numpy().any()
    with open_test_store(tmp_path / "dev") as store:
        ledger = store.get_json("ledger")
    assert ledger["events"] == [] and "SecAgg+" in ledger["declined"][0]["reason"]


def test_the_policy_round_trips_and_refuses_bad_values(tmp_path) -> None:
    policy = DevicePolicy(epsilon_cap=2.0, min_cohort=20, trust_server_noise=True)
    with open_test_store(tmp_path / "s") as store:
        policy.save(store)
        assert DevicePolicy.load(store) == policy
        store.put_json("privacy_policy", {**policy.to_dict(), "min_cohort": 0})
        with pytest.raises(ValueError, match="min-cohort"):
            DevicePolicy.load(store)
        store.put_json("privacy_policy", {**policy.to_dict(), "extra": 1})
        with pytest.raises(ValueError, match="keys"):
            DevicePolicy.load(store)
    for bad in (
        {"epsilon_cap": math.inf},
        {"delta": 1.0},
        {"min_noise_multiplier": math.nan},
        {"require_secagg": 1},
        {"accountant": "moments"},
    ):
        with pytest.raises(ValueError, match="device privacy policy"):
            DevicePolicy(**bad)


def test_dp_sgd_batches_and_noise_come_from_the_os_unless_seeded() -> None:
    from common.config import ModelConfig
    from common.data import Encoded
    from common.lora import build_peft_model, get_lora_tensors, load_lora_tensors
    from common.model import load_base_for
    from common.personalization import get_strategy

    mcfg = ModelConfig(name="tiny")
    model = build_peft_model(load_base_for(mcfg), mcfg, get_strategy("fedsa"))
    start = get_lora_tensors(model)
    trainable = [n for n in start if "lora_A" in n]
    samples = [Encoded(tuple(range(5 + i, 25 + i)), tuple(range(5 + i, 25 + i))) for i in range(8)]

    def run_once(seed):
        load_lora_tensors(model, start)
        train_steps_dp(
            model, trainable, samples, steps=2, batch_size=2, learning_rate=0.01,
            noise_multiplier=1.0, max_grad_norm=1.0, seed=seed, pad_id=0,
        )  # fmt: skip
        return get_lora_tensors(model)

    seeded = [run_once(3), run_once(3)]
    fresh = [run_once(None), run_once(None)]
    assert all(torch.equal(seeded[0][n], seeded[1][n]) for n in trainable)
    assert any(not torch.equal(fresh[0][n], fresh[1][n]) for n in trainable)


def test_the_privacy_report_states_its_assumptions_and_the_effective_delta() -> None:
    from server.accountant import FederationAccountant
    from server.privacy import privacy_report, secagg_clip_probability

    cfg = parse_run_config(tiny_run_config(**HONEST))
    acc = FederationAccountant(noise_multiplier=7.1, sample_rate=1.0, delta=1e-5)
    for _ in range(3):
        acc.release()
    report = privacy_report(
        cfg, m_min=8, sample_rate=1.0, acc=acc, num_params=137_000, round_updates=(8, 8, 7)
    )
    user = report["user_level"]

    # Each round: P(some coordinate of some update passes C + 7 std) <= m·d·erfc(7/√2).
    per_round = secagg_clip_probability(updates=8, num_params=137_000)
    assert per_round == pytest.approx(8 * 137_000 * 2.5596e-12, rel=1e-4)
    assert user["effective_delta"] == pytest.approx(
        1e-5 + 2 * per_round + secagg_clip_probability(updates=7, num_params=137_000)
    )
    assert "add or remove one user" in user["neighbouring"]
    assert "honest-but-curious" in user["trust"] and "reconstruction threshold" in user["trust"]
    assert "own participation coin" in user["assumes"]
    central = parse_run_config(
        tiny_run_config(**{**HONEST, "dp.noise-mode": "central", "secagg.enabled": False})
    )
    user = privacy_report(central, m_min=8, sample_rate=1.0, acc=acc)["user_level"]
    assert user["effective_delta"] == 1e-5 and "trusted server" in user["trust"]


@pytest.mark.parametrize("min_cohort", [3, 2])
def test_devices_refuse_to_mask_into_a_cohort_smaller_than_they_accept(tmp_path, min_cohort):
    # Prepare: three real devices (tiny model) under SecAgg+ with distributed noise sized for
    # m_min = min_cohort (so all join at setup); device 3 is lost during key sharing, so two
    # are left to mask their updates.
    import numpy as np

    from tests.conftest import permissive_policy
    from tests.flower_harness import secagg_device_round

    raw = tiny_run_config(
        **{
            "data.num-users": 3,
            "dp.min-clients": min_cohort,
            "train.local-steps": 1,
            "dp.clip-norm": 0.01,
        }
    )
    rt = get_runtime(parse_run_config(raw))
    policy = permissive_policy(min_cohort=min_cohort, require_secagg=True)
    nodes = {
        nid: device_node_config(tmp_path / f"d{nid}", nid - 1, 3, policy=policy)
        for nid in (1, 2, 3)
    }

    # Execute
    _, strategy = secagg_device_round(raw, nodes, min_updates=2, drop={"share_keys": {3}})

    # Assert: with min-cohort 3 neither device masked a vector (nothing trained or charged,
    # the refusal kept with its reason) and nothing was released; with 2, the round was.
    ledgers = {}
    for nid in (1, 2):
        with open_test_store(tmp_path / f"d{nid}") as store:
            ledgers[nid] = store.get_json("ledger")
    record = strategy.recorder._train.get(1)
    if min_cohort == 3:
        for ledger in ledgers.values():
            assert ledger["events"] == []
            assert "cohort of at least 3" in ledger["declined"][-1]["reason"]
        assert record is None or record["released"] is False
        assert all(
            np.array_equal(c, rt.init[n].numpy())
            for c, n in zip(strategy.current, rt.shared_names, strict=True)
        )
    else:
        assert record["released"] is True and record["updates"] == 2
        assert all(len(ledger["events"]) == 1 for ledger in ledgers.values())


def test_seven_of_eight_declining_leave_at_setup_and_no_masked_vector_reaches_the_server(
    tmp_path,
) -> None:
    # Prepare: eight real devices under SecAgg+ with distributed noise sized for m_min = 8;
    # seven of them require more noise than the round carries and so will not contribute.
    from tests.conftest import permissive_policy
    from tests.flower_harness import secagg_device_round

    raw = tiny_run_config(**{"data.num-users": 8, "train.local-steps": 1, "dp.clip-norm": 0.01})
    nodes = {
        nid: device_node_config(
            tmp_path / f"d{nid}",
            (nid - 1) % 4,
            8,
            policy=permissive_policy(
                require_secagg=True, min_noise_multiplier=0.0 if nid == 1 else 100.0
            ),
        )
        for nid in range(1, 9)
    }

    # Execute
    grid, strategy = secagg_device_round(raw, nodes, min_updates=8)

    # Assert: the seven left at setup (an error code, no text), which halts the round (the one
    # left would also refuse to mask into a cohort of 1, see the test above); the server
    # received no masked vector and released nothing (the round is closed as discarded);
    # nobody was charged.
    setup = {nid: reply for nid, stage, reply in grid.received if stage == "setup"}
    assert all(setup[nid].has_error() for nid in range(2, 9)) and not setup[1].has_error()
    assert all("device error: declined" in setup[nid].error.reason for nid in range(2, 9))
    masked = [
        reply
        for _, stage, reply in grid.received
        if stage == "collect_masked_vectors" and not reply.has_error()
    ]
    assert masked == []
    assert strategy.recorder._train[1]["released"] is False
    for nid in range(1, 9):
        with open_test_store(tmp_path / f"d{nid}") as store:
            ledger = store.get_json("ledger")
        if nid == 1:
            assert ledger is None or ledger["events"] == []
        else:
            assert ledger["events"] == []
            assert "at SecAgg+ setup" in ledger["declined"][-1]["reason"]


def _stage_replies(grid, stage: str) -> dict:  # type: ignore[no-untyped-def]
    return {nid: reply for nid, s, reply in grid.received if s == stage}


# What a server could bend in the SecAgg+ setup it sends (4 devices, m_min = 4), and the words
# of the reason each device keeps.
BENT_SETUPS = {
    "clipping range without room for the noise": ({"clipping_range": 0.01}, "clipping range"),
    "threshold of half the neighbours": ({"reconstruction_threshold": 2}, "threshold"),
    "a weight range other than 1": ({"max_weight": 4.0}, "max_weight"),
}


@pytest.mark.parametrize("bent", BENT_SETUPS)
def test_a_server_bending_the_secagg_setup_is_declined_by_every_device(tmp_path, bent) -> None:
    # Prepare: four real devices under SecAgg+ with distributed noise sized for m_min = 4.
    from tests.conftest import permissive_policy
    from tests.flower_harness import secagg_device_round

    override, words = BENT_SETUPS[bent]
    raw = tiny_run_config(**{"data.num-users": 4, "train.local-steps": 1, "dp.clip-norm": 0.01})
    policy = permissive_policy(require_secagg=True, min_cohort=4)
    nodes = {
        nid: device_node_config(tmp_path / f"d{nid}", nid - 1, 4, policy=policy)
        for nid in range(1, 5)
    }

    # Execute
    grid, strategy = secagg_device_round(raw, nodes, min_updates=4, params_override=override)

    # Assert: every device left at setup with a code; no masked vector; nothing charged.
    setup = _stage_replies(grid, "setup")
    assert all("device error: declined" in setup[nid].error.reason for nid in range(1, 5))
    assert _stage_replies(grid, "collect_masked_vectors") == {}
    assert strategy.recorder._train[1]["released"] is False
    for nid in range(1, 5):
        with open_test_store(tmp_path / f"d{nid}") as store:
            ledger = store.get_json("ledger")
        assert ledger["events"] == []
        assert words in ledger["declined"][-1]["reason"]


@pytest.mark.parametrize("server", ["aborts", "unmasks anyway"])
def test_a_device_lost_after_key_sharing_leaves_no_under_noised_sum(tmp_path, server) -> None:
    # Prepare: three real devices, noise shares sized for m_min = 3; device 3 completes key
    # sharing and is lost before it sends its masked vector, so the sum would hold two shares.
    # An honest server aborts before unmasking; a curious one (min_masked = 1) asks anyway.
    from tests.conftest import permissive_policy
    from tests.flower_harness import secagg_device_round

    raw = tiny_run_config(
        **{"data.num-users": 3, "dp.min-clients": 3, "train.local-steps": 1, "dp.clip-norm": 0.01}
    )
    policy = permissive_policy(require_secagg=True, min_cohort=3)
    nodes = {
        nid: device_node_config(tmp_path / f"d{nid}", nid - 1, 3, policy=policy)
        for nid in (1, 2, 3)
    }
    min_masked = 3 if server == "aborts" else 1

    # Execute
    grid, strategy = secagg_device_round(
        raw, nodes, min_updates=3, min_masked=min_masked, drop={"collect_masked_vectors": {3}}
    )

    # Assert: two masked vectors reached the server and nothing was unmasked or released.
    masked = _stage_replies(grid, "collect_masked_vectors")
    assert sorted(nid for nid, r in masked.items() if not r.has_error()) == [1, 2]
    unmask = _stage_replies(grid, "unmask")
    if server == "aborts":
        assert unmask == {}
    else:  # both survivors refused to hand out mask shares, with a code
        assert sorted(unmask) == [1, 2]
        assert all("device error: unmask-refused" in r.error.reason for r in unmask.values())
        for nid in (1, 2):
            with open_test_store(tmp_path / f"d{nid}") as store:
                reason = store.get_json("ledger")["declined"][-1]["reason"]
            assert reason.startswith("at unmasking: only 2 of this device's neighbours")
    assert strategy.recorder._train[1]["released"] is False


def test_the_setup_check_names_each_bent_parameter() -> None:
    # The server's own workflow sizes the quantization range for the cohort it samples (a
    # bent range cannot reach the devices through it), so the wrap check is exercised here.
    from flwr.common.secure_aggregation.secaggplus_constants import Key

    from client.federation.gate import secagg_setup_problem

    cfg = parse_run_config(
        tiny_run_config(**{"data.num-users": 4, "dp.clip-norm": 0.01, "dp.noise-multiplier": 1.0})
    )
    honest = {
        Key.SAMPLE_NUMBER: 4,
        Key.SHARE_NUMBER: 4,
        Key.THRESHOLD: 3,
        Key.CLIPPING_RANGE: 0.01 + 7 * 0.01 / 2,  # C + 7σC/√m_min, m_min = 4
        Key.TARGET_RANGE: 2**29,
        Key.MOD_RANGE: 2**32,
        Key.MAX_WEIGHT: 1.0,
    }
    bent = {
        "cohort": ({Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3}, "smaller than the 4"),
        "neighbours": ({Key.SHARE_NUMBER: 3}, "smaller than the 4"),
        "threshold": ({Key.THRESHOLD: 2}, "threshold of 2 of 4"),
        "clipping": ({Key.CLIPPING_RANGE: 0.02}, "clipping range 0.02"),
        "weight": ({Key.MAX_WEIGHT: 2.0}, "max_weight 2"),
        "wrap": ({Key.TARGET_RANGE: 2**31}, "wrap the modulus"),
        "missing": ({Key.MOD_RANGE: None}, "incomplete or malformed"),
    }
    assert secagg_setup_problem(cfg, honest, required=4, num_partitions=4) is None
    for name, (change, words) in bent.items():
        configs = {k: v for k, v in {**honest, **change}.items() if v is not None}
        problem = secagg_setup_problem(cfg, configs, required=4, num_partitions=4)
        assert problem is not None and words in problem, (name, problem)


def test_unmasking_a_node_both_alive_and_dead_is_refused() -> None:
    from flwr.common.secure_aggregation.secaggplus_constants import Key

    from client.federation.gate import unmask_problem

    ok = {Key.ACTIVE_NODE_ID_LIST: [1, 2, 3], Key.DEAD_NODE_ID_LIST: [4]}
    both = {Key.ACTIVE_NODE_ID_LIST: [1, 2, 3], Key.DEAD_NODE_ID_LIST: [3]}
    assert unmask_problem(ok, required=3) is None
    assert "both active and dead" in unmask_problem(both, required=3)
    assert "only 3" in unmask_problem(ok, required=4)
