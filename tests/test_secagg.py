"""SecAgg+ with Flower's real workflow and mod: exactness, dropouts at every stage, declines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.client_app import app as fedpersona_app
from client.federation.ledger import PrivacyLedger
from client.federation.runtime import get_runtime
from common import ab
from common.config import PrivacyCaps, parse_run_config
from common.dp.privatize import Privatize
from common.secagg import derive_secagg_params
from server.recorder import RoundRecorder
from server.release import RoundOptions
from server.secagg import SecAggDPStrategy, secagg_workflow
from tests.conftest import device_node_config, open_test_store, tiny_run_config
from tests.flower_harness import InProcessGrid, secagg_device_round

STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")


def _vector_app(updates: dict[int, list[np.ndarray]], weights: dict[int, int]) -> ClientApp:
    """A ClientApp whose node ``i`` returns ``updates[i]`` with weight ``weights[i]``."""
    app = ClientApp(mods=[secaggplus_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        nid = context.node_id
        res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(updates[nid]), weights[nid], {})
        return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)

    return app


def _run_round(  # type: ignore[no-untyped-def]
    grid: InProcessGrid, strategy: SecAggDPStrategy, params, *, min_masked: int | None = None
) -> None:
    """One round; the server unmasks a sum of at least ``min_masked`` (default m_min) nodes."""
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    masked = strategy.min_updates if min_masked is None else min_masked
    workflow = secagg_workflow(params, timeout=30, min_masked=masked, evaluate=False)
    workflow(grid, LegacyContext(context=ctx, config=ServerConfig(num_rounds=1), strategy=strategy))


def _strategy(shapes, n_nodes: int, min_updates: int) -> SecAggDPStrategy:  # type: ignore[no-untyped-def]
    return SecAggDPStrategy(
        RoundOptions(recorder=RoundRecorder(None), min_updates=min_updates),
        shared_names=[f"t{i}" for i in range(len(shapes))],
        initial=[np.zeros(s, dtype=np.float32) for s in shapes],
        min_nodes=n_nodes,
    )


def _clipped_updates(n: int, shapes, clip: float, rng: np.random.Generator) -> dict:  # type: ignore[no-untyped-def]
    out = {}
    for nid in range(1, n + 1):
        arrays = [rng.normal(size=s).astype(np.float32) for s in shapes]
        norm = np.sqrt(sum(float((a.astype(np.float64) ** 2).sum()) for a in arrays))
        scale = min(1.0, clip / norm)
        out[nid] = [a * scale for a in arrays]
    return out


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_clients=st.integers(3, 6),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    weights=st.lists(st.integers(1, 50), min_size=6, max_size=6),
    seed=st.integers(0, 1000),
)
def test_secagg_sum_equals_weighted_mean_within_quantization(n_clients, sizes, weights, seed):
    # Prepare
    rng = np.random.default_rng(seed)
    shapes = [(s,) for s in sizes]
    clip = 1.0
    updates = _clipped_updates(n_clients, shapes, clip, rng)
    w = {nid: weights[nid - 1] for nid in updates}
    params = derive_secagg_params(
        Privatize(clip, 0.0),
        num_clients=n_clients,
        num_params=sum(sizes),
        num_shares=1.0,
        reconstruction_threshold=0.67,
        max_weight=max(w.values()),
    )
    grid = InProcessGrid(_vector_app(updates, w), {nid: {} for nid in updates})
    strategy = _strategy(shapes, n_clients, min_updates=n_clients)

    # Execute
    _run_round(grid, strategy, params)

    # Assert: the unmasked result is the plain weighted mean, up to quantization.
    total = sum(w.values())
    for i in range(len(shapes)):
        expected = sum(w[n] * updates[n][i] for n in updates) / total
        # Each client's value is quantized (step) and its weight ratio too (1/q_range).
        bound = params.quantization_step * 2 + 4 * params.clipping_range / params.quantization_range
        np.testing.assert_allclose(strategy.current[i], expected, atol=bound + 1e-6)
    assert strategy.recorder.rounds == [] and strategy.recorder._train[1]["released"]


@pytest.mark.parametrize("stage", STAGES)
def test_one_of_five_dropped_at_each_stage(stage) -> None:
    # Prepare
    rng = np.random.default_rng(0)
    shapes = [(7,), (3, 4)]
    updates = _clipped_updates(5, shapes, 1.0, rng)
    weights = dict.fromkeys(updates, 1)
    params = derive_secagg_params(
        Privatize(1.0, 0.0),
        num_clients=5,
        num_params=19,
        num_shares=1.0,
        reconstruction_threshold=0.6,
    )
    lost = 3
    grid = InProcessGrid(
        _vector_app(updates, weights), {n: {} for n in updates}, drop={stage: {lost}}
    )
    strategy = _strategy(shapes, 5, min_updates=4)

    # Execute
    _run_round(grid, strategy, params)

    # Assert: the round completed; the sum holds exactly the vectors that were masked in.
    record = strategy.recorder._train[1]
    assert record["released"] is True
    # A node lost while unmasking had already sent its masked vector: it is in the sum.
    included = list(updates) if stage == "unmask" else [n for n in updates if n != lost]
    assert record["updates"] == len(included)
    for i in range(len(shapes)):
        expected = sum(updates[n][i] for n in included) / len(included)
        np.testing.assert_allclose(
            strategy.current[i], expected, atol=3 * params.quantization_step + 1e-6
        )


def test_more_nodes_than_planned_get_a_quantization_range_that_does_not_wrap() -> None:
    # Prepare: SecAgg+ parameters derived for 2 clients (range 2**30), then 8 nodes sampled:
    # 8 quantized updates in [0, 2**30] would wrap the 2**32 modulus.
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    from common.secagg import quantization_range_for

    rng = np.random.default_rng(5)
    shapes = [(6,)]
    updates = _clipped_updates(8, shapes, 1.0, rng)
    params = derive_secagg_params(
        Privatize(1.0, 0.0),
        num_clients=2,
        num_params=6,
        num_shares=1.0,
        reconstruction_threshold=0.67,
    )
    grid = InProcessGrid(_vector_app(updates, dict.fromkeys(updates, 1)), {n: {} for n in updates})
    strategy = _strategy(shapes, 8, min_updates=8)

    # Execute
    _run_round(grid, strategy, params)

    # Assert: the range the devices were sent fits 8, and the mean is right.
    q = quantization_range_for(8)
    assert params.quantization_range == 2**30 and q == 2**28
    sent = {
        msg.content.config_records[RECORD_KEY_CONFIGS][Key.TARGET_RANGE]
        for msg in grid.sent
        if RECORD_KEY_CONFIGS in msg.content.config_records
        and Key.TARGET_RANGE in msg.content.config_records[RECORD_KEY_CONFIGS]
    }
    assert sent == {q}
    expected = sum(u[0] for u in updates.values()) / 8
    step = 2 * params.clipping_range / q
    np.testing.assert_allclose(strategy.current[0], expected, atol=3 * step + 1e-6)


def test_too_few_updates_discard_the_round() -> None:
    rng = np.random.default_rng(1)
    shapes = [(5,)]
    updates = _clipped_updates(5, shapes, 1.0, rng)
    params = derive_secagg_params(
        Privatize(1.0, 0.0),
        num_clients=5,
        num_params=5,
        num_shares=1.0,
        reconstruction_threshold=0.6,
    )
    grid = InProcessGrid(
        _vector_app(updates, dict.fromkeys(updates, 1)),
        {n: {} for n in updates},
        drop={"collect_masked_vectors": {2}},
    )
    strategy = _strategy(shapes, 5, min_updates=5)
    _run_round(grid, strategy, params)
    assert strategy.recorder._train[1]["released"] is False
    np.testing.assert_array_equal(strategy.current[0], np.zeros(5, dtype=np.float32))


def test_ledger_declines_at_cap_and_the_round_still_completes(tmp_path) -> None:
    # Prepare: five real fedpersona devices (tiny model); device 4 has spent its budget.
    # Noise shares sized for m_min = 4 (with 5, the four left would refuse to mask).
    raw = tiny_run_config(**{"data.num-users": 5, "train.local-steps": 1, "dp.min-clients": 4})
    cfg = parse_run_config(raw)
    dirs = {nid: tmp_path / f"device{nid}" for nid in range(1, 6)}
    policy = PrivacyCaps(epsilon_cap=cfg.privacy.epsilon_cap, delta=cfg.privacy.delta)
    spent = PrivacyLedger(policy)
    spent.charge(server_round=0, record=None, user=(cfg.dp.noise_multiplier, 1.0, 1))
    spent.charge(server_round=0, record=None, user=(cfg.dp.noise_multiplier, 1.0, 1))
    spent.charge(server_round=0, record=None, user=(cfg.dp.noise_multiplier, 1.0, 1))
    with open_test_store(dirs[4]) as store:
        spent.save(store)
    before = spent.state_dict()["events"]
    rt = get_runtime(cfg)
    node_cfgs = {nid: device_node_config(d, nid - 1, 5) for nid, d in dirs.items()}

    # Execute
    _, strategy = secagg_device_round(raw, node_cfgs, min_updates=4)

    # Assert
    record = strategy.recorder._train[1]
    assert record["released"] is True
    # Device 4 left at SecAgg+ setup (before any key was shared): not a zero update.
    assert record["declined"] == 0 and record["updates"] == 4
    ledgers = {}
    for nid, d in dirs.items():
        with open_test_store(d) as store:
            ledgers[nid] = store.get_json("ledger")
    after = ledgers[4]
    assert after["events"] == before  # nothing charged for the declined round
    assert len(after["declined"]) == 1 and "budget exhausted" in after["declined"][0]["reason"]
    for nid in (1, 2, 3, 5):
        assert [e["round"] for e in ledgers[nid]["events"]] == [1]
    # The A/B vector rode in the sum, and it is empty: real devices rate nothing by
    # themselves, whatever the server's `ab.simulate-ratings` asks (their users rated nothing).
    (counts,) = strategy.recorder.ab_rounds
    assert cfg.ab.simulate_ratings and cfg.ab.interactions > 0
    assert np.abs(counts).max() == pytest.approx(0.0, abs=1e-3)
    moved = sum(
        float(np.abs(c - rt.init[n].numpy()).sum())
        for c, n in zip(strategy.current, rt.shared_names, strict=True)
    )
    assert moved > 0
    assert not torch.isnan(torch.tensor(strategy.current[0])).any()


def test_simulation_nodes_hosting_users_aggregate_per_user(tmp_path) -> None:
    # Prepare: 6 users on 2 simulation nodes (3 each), every user in the round (q = 1), no
    # noise, so the securely summed mean can be checked against each user's own update.
    from client.client_app import evaluate as client_evaluate
    from client.federation.device import Device
    from common.serialization import to_arrayrecord
    from server.recorder import expand_hosted
    from tests.conftest import make_context, make_message

    raw = tiny_run_config(
        **{
            "data.num-users": 6,
            "simulation.users-per-node": 3,
            "sampling": "poisson",
            "fraction-train": 1.0,
            "dp.noise-mode": "none",
            "dp.min-clients": 6,
            "train.local-steps": 1,
            "eval.local-only": True,
            "simulation.device-root": str(tmp_path / "hosted"),
        }
    )
    cfg = parse_run_config(raw)
    rt = get_runtime(cfg)
    shapes = [tuple(rt.shapes[n]) for n in rt.shared_names]
    nodes = {nid: {"partition-id": nid - 1, "num-partitions": 2} for nid in (1, 2)}
    grid = InProcessGrid(fedpersona_app, nodes, run_config=raw)
    params = derive_secagg_params(
        Privatize(cfg.dp.clip_norm, 0.0),
        num_clients=2,
        num_params=sum(int(np.prod(s)) for s in shapes) + ab.FIELDS,
        num_shares=1.0,
        reconstruction_threshold=0.6,
        max_weight=3.0,
    )
    strategy = SecAggDPStrategy(
        RoundOptions(recorder=RoundRecorder(None), min_updates=6),
        shared_names=rt.shared_names,
        initial=[rt.init[n].numpy() for n in rt.shared_names],
        min_nodes=2,
        ab_scale=ab.scale(cfg.ab.interactions, cfg.dp.clip_norm),
    )
    g = {n: rt.init[n] for n in rt.shared_names}

    # Execute: one SecAgg+ round; the same users alone; one node's evaluation.
    _run_round(grid, strategy, params, min_masked=2)  # 6 users on 2 nodes
    alone = []
    for user in range(6):
        with open_test_store(tmp_path / "alone" / str(user)) as store:
            device = Device.simulated(cfg, store=store, partition_id=user, num_partitions=6)
            alone.append(device.train(g, server_round=1).update)
    reply = client_evaluate(
        make_message(to_arrayrecord(g), "evaluate"), make_context(raw, nodes[2])
    )

    # Assert: six users' updates, their mean, their A/B counts; one evaluation row per user.
    record = strategy.recorder._train[1]
    assert record["released"] and record["updates"] == 6 and record["declined"] == 0
    for i, name in enumerate(rt.shared_names):
        expected = (sum(u[name] for u in alone) / 6).numpy()
        init = rt.init[name].numpy()
        got = strategy.current[i] - init
        # Each node's value is quantized (step), and so is its weight (3 users: 1/q_range of
        # the clipping range); float32 rounding of init + mean where init ≠ 0 (blend's A); and
        # float32 arithmetic of the same training elsewhere (1e-5 of the tensor's largest
        # entry: a wrong weight or a missing user is off by a sixth of it or more).
        bound = 4 * params.quantization_step + 4 * params.clipping_range / params.quantization_range
        rounding = 2 * np.finfo(np.float32).eps * float(np.abs(init).max())
        scale = 1e-5 * float(np.abs(expected).max())
        np.testing.assert_allclose(got, expected, rtol=0, atol=bound + rounding + scale)
    assert strategy.recorder.ab_rounds[0][0] + strategy.recorder.ab_rounds[0][3] == (
        pytest.approx(6 * cfg.ab.interactions, abs=1e-2)
    )
    rows = expand_hosted(dict(reply.content["metrics"]))
    assert [int(r["partition_id"]) for r in rows] == [3, 4, 5]
    assert all("personal_loss" in r and "local_only_loss" in r for r in rows)


def test_canary_clients_ride_in_the_sum_along_their_directions(tmp_path) -> None:
    # Prepare: 4 users on one simulation node, 4 canary clients on another, every client in
    # the round (q = 1), no noise: the released sum moves by C along each canary that took
    # part, and the round's training loss is the users' alone.
    from client.client_app import evaluate as client_evaluate
    from common import audit
    from common.serialization import to_arrayrecord
    from server.recorder import expand_hosted
    from tests.conftest import make_context, make_message

    raw = tiny_run_config(
        **{
            "data.num-users": 8,
            "audit.canary-clients": 4,
            "simulation.users-per-node": 4,
            "sampling": "poisson",
            "fraction-train": 1.0,
            "dp.noise-mode": "none",
            "dp.min-clients": 3,
            "train.local-steps": 1,
            "ab.interactions": 0,
            "simulation.device-root": str(tmp_path / "hosted"),
        }
    )
    cfg = parse_run_config(raw)
    rt = get_runtime(cfg)
    names = rt.shared_names
    nodes = {nid: {"partition-id": nid - 1, "num-partitions": 2} for nid in (1, 2)}
    params = derive_secagg_params(
        Privatize(cfg.dp.clip_norm, 0.0),
        num_clients=2,
        num_params=sum(int(np.prod(rt.shapes[n])) for n in names),
        num_shares=1.0,
        reconstruction_threshold=0.6,
        max_weight=4.0,
    )
    strategy = SecAggDPStrategy(
        RoundOptions(recorder=RoundRecorder(None), min_updates=3),
        shared_names=names,
        initial=[rt.init[n].numpy() for n in names],
        min_nodes=2,
    )
    grid = InProcessGrid(fedpersona_app, nodes, run_config=raw)

    # Execute: one round; each node's evaluation.
    _run_round(grid, strategy, params, min_masked=2)
    replies = [
        client_evaluate(
            make_message(to_arrayrecord({n: rt.init[n] for n in names}), "evaluate"),
            make_context(raw, nodes[nid]),
        )
        for nid in (1, 2)
    ]

    # Assert: the canaries that took part moved the sum by C along their directions, the
    # others not at all (beyond the users' chance projections); the loss is the users' (a
    # random tiny model: about ln of its vocabulary); only the four users are evaluated.
    record = strategy.recorder._train[1]
    included = audit.clients_included(cfg)
    m = record["updates"]
    assert m == 4 + sum(included) and 0 < sum(included) < 4
    assert record["train_loss"] > 10.0
    mean = {n: strategy.current[i] - rt.init[n].numpy() for i, n in enumerate(names)}
    scores = audit.client_scores(cfg, {1: (m, mean)})
    c = cfg.dp.clip_norm
    for took_part, score in zip(included, scores, strict=True):
        assert abs(score - (c if took_part else 0.0)) < 0.5 * c
    rows = [r for reply in replies for r in expand_hosted(dict(reply.content["metrics"]))]
    assert sorted(int(r["partition_id"]) for r in rows) == [0, 1, 2, 3]
