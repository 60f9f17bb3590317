"""Faults and bad input on the federation path: malformed server messages and device replies,
non-finite or misshapen aggregates, a killed ServerApp that resumes from its checkpoint.

Each test asserts the error (or the logged rejection) and that nothing stored was lost.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig

from client.client_app import DeviceError
from client.client_app import app as fedpersona_app
from client.client_app import train as client_train
from client.federation.runtime import get_runtime
from common.config import parse_run_config
from common.dp.privatize import Privatize
from common.secagg import derive_secagg_params
from common.serialization import to_arrayrecord
from server import checkpoint
from server.accountant import FederationAccountant
from server.recorder import RoundRecorder
from server.release import RoundOptions
from server.secagg import SecAggDPStrategy, secagg_workflow
from server.server_app import main as server_main
from server.strategy import PersonaFedAvg
from tests.conftest import (
    device_node_config,
    initial_shared,
    make_context,
    make_message,
    open_test_store,
    stored_device_state,
    tiny_run_config,
)
from tests.flower_harness import InProcessGrid

# ---- the device refuses malformed server messages ------------------------------------------


def _bad_message(kind: str, tensors: dict[str, torch.Tensor]) -> Message:
    """A train message broken in one way (``kind``)."""
    if kind == "no-arrays":
        return _with_content(RecordDict({"config": ConfigRecord({"server-round": 2})}))
    record = to_arrayrecord(tensors)
    name = next(iter(tensors))
    if kind == "extra-tensor":
        record["base_model.lm_head.weight"] = Array(np.zeros((4, 4), np.float32))
    elif kind == "missing-tensor":
        del record[name]
    elif kind == "wrong-shape":
        record[name] = Array(np.zeros((3, 3), np.float32))
    elif kind == "oversized":
        record[name] = Array(np.zeros((4096, 4096), np.float32))
    elif kind == "int-dtype":
        record[name] = Array(tensors[name].numpy().astype(np.int64))
    elif kind == "nan":
        bad = tensors[name].numpy().copy()
        bad.flat[0] = np.nan
        record[name] = Array(bad)
    elif kind == "huge":  # finite, and it would overflow every forward pass
        bad = tensors[name].numpy().copy()
        bad.flat[0] = 3e38
        record[name] = Array(bad)
    elif kind == "padded-payload":  # the right declared shape over 64 MiB of bytes
        good = record[name]
        record[name] = Array(
            dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data + bytes(1 << 26)
        )
    if kind == "no-round":
        return _with_content(RecordDict({"arrays": record, "config": ConfigRecord({})}))
    if kind == "round-zero":
        return _with_content(
            RecordDict({"arrays": record, "config": ConfigRecord({"server-round": 0})})
        )
    return make_message(record, "train", server_round=2)


def _with_content(content: RecordDict) -> Message:
    msg = make_message(ArrayRecord(), "train")
    msg.content = content
    return msg


BAD_SERVER_MESSAGES = {
    "no-arrays": "no `arrays` array record",
    "extra-tensor": "does not match the model",
    "missing-tensor": "does not match the model",
    "wrong-shape": "shape mismatch",
    "oversized": "shape mismatch",
    "int-dtype": "expected floating point",
    "nan": "non-finite",
    "huge": "beyond 10000",
    "padded-payload": "more than its shape can hold",
    "no-round": "server-round",
    "round-zero": "server-round",
}


@pytest.mark.parametrize("kind", sorted(BAD_SERVER_MESSAGES))
def test_device_rejects_malformed_server_message_and_keeps_its_state(tmp_path, kind, caplog):
    # Prepare: one good round, so the device has personal state and a ledger entry.
    raw = tiny_run_config()
    cfg = parse_run_config(raw)
    ctx = make_context(raw, device_node_config(tmp_path / "dev", 0, 4))
    client_train(make_message(to_arrayrecord(initial_shared(cfg)), "train"), ctx)
    before = stored_device_state(tmp_path / "dev")
    assert before["personal"] is not None and len(before["ledger"]["events"]) == 1

    # Execute
    with pytest.raises(DeviceError, match="rejected-message") as err:
        client_train(_bad_message(kind, initial_shared(cfg)), ctx)

    # Assert: the server gets a code; the reason stays in the device's log.
    assert str(err.value) == "device error: rejected-message (the reason is in the device's log)"
    logged = [r.getMessage() for r in caplog.records]
    assert any("rejecting the server's" in m and BAD_SERVER_MESSAGES[kind] in m for m in logged)
    assert stored_device_state(tmp_path / "dev") == before


@pytest.mark.parametrize(
    "kind", ["huge", "padded-payload", "too-many-arrays"], ids=lambda k: f"secagg-{k}"
)
def test_device_rejects_huge_or_oversized_arrays_on_the_secagg_path_before_decoding(
    tmp_path, caplog, monkeypatch, kind
) -> None:
    from flwr.common import FitIns

    # Prepare: the legacy record a SecAgg+ round delivers, bent; decoding is watched.
    raw = tiny_run_config()
    cfg = parse_run_config(raw)
    rt = get_runtime(cfg)
    arrays = [rt.init[n].numpy().copy() for n in rt.shared_names]
    if kind == "huge":
        arrays[0].flat[0] = 3e38
    if kind == "too-many-arrays":
        arrays.append(np.zeros((2048, 2048), np.float32))
    content = compat.fitins_to_recorddict(
        FitIns(ndarrays_to_parameters(arrays), {"server-round": 1}), keep_input=True
    )
    if kind == "padded-payload":
        record = content.array_records["fitins.parameters"]
        key = next(iter(record))
        good = record[key]
        record[key] = Array(
            dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data + bytes(1 << 26)
        )
    decoded = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: decoded.append(1) or real_load(*a, **k))
    ctx = make_context(raw, device_node_config(tmp_path / "dev", 0, 4))

    # Execute
    with pytest.raises(DeviceError, match="rejected-message") as err:
        client_train(_with_content(content), ctx)

    # Assert: a code only; the reason logged; nothing stored; oversized payloads undecoded.
    assert str(err.value) == "device error: rejected-message (the reason is in the device's log)"
    reason = {"huge": "beyond 10000", "padded-payload": "more than its shape can hold",
              "too-many-arrays": "arrays, got"}[kind]  # fmt: skip
    assert reason in caplog.text
    if kind != "huge":
        assert decoded == []
    assert stored_device_state(tmp_path / "dev")["ledger"] is None


def test_device_rejects_integer_arrays_on_the_secagg_path(tmp_path, caplog) -> None:
    raw = tiny_run_config()
    cfg = parse_run_config(raw)
    rt = get_runtime(cfg)
    arrays = [rt.init[n].numpy().astype(np.int32) for n in rt.shared_names]
    from flwr.common import FitIns

    content = compat.fitins_to_recorddict(
        FitIns(ndarrays_to_parameters(arrays), {"server-round": 1}), keep_input=True
    )
    ctx = make_context(raw, device_node_config(tmp_path / "dev", 0, 4))
    with pytest.raises(DeviceError, match="rejected-message"):
        client_train(_with_content(content), ctx)
    assert "expected floating point" in caplog.text
    assert stored_device_state(tmp_path / "dev")["ledger"] is None


# ---- the server refuses malformed replies (Message API) -------------------------------------

SHAPES = {"a": (3, 2), "b": (4,)}
UPDATES = {
    nid: {n: np.full(s, float(nid), np.float32) for n, s in SHAPES.items()} for nid in (1, 2, 3)
}


def _corrupt(kind: str, content: RecordDict) -> None:
    arrays, metrics = content["arrays"], content["metrics"]
    if kind == "wrong-shape":
        arrays["a"] = Array(np.zeros((2, 3), np.float32))
    elif kind == "float64":
        arrays["a"] = Array(np.zeros((3, 2), np.float64))
    elif kind == "nan":
        arrays["b"] = Array(np.array([np.nan, 0, 0, 0], np.float32))
    elif kind == "inf-metric":
        metrics["train_loss"] = math.inf
    elif kind == "extra-tensor":
        arrays["personal_secret"] = Array(np.zeros(2, np.float32))
    elif kind == "extra-metric":
        metrics["email_count"] = 3
    elif kind == "no-weight":
        del metrics["weight"]
    elif kind == "extra-record":
        content["extra"] = MetricRecord({"x": 1})


def _message_api_app(corrupt_node: int, kind: str) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        nid = context.node_id
        arrays = ArrayRecord({n: Array(a) for n, a in UPDATES[nid].items()})
        metrics = MetricRecord({"weight": 1, "train_loss": 1.0, "declined": 0, "partition_id": nid})
        content = RecordDict({"arrays": arrays, "metrics": metrics})
        if nid == corrupt_node:
            _corrupt(kind, content)
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        metrics = {"partition_id": context.node_id, "personal_loss": 1.0, "global_loss": 1.0}
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def _run_from_zeros(strategy: PersonaFedAvg, grid: InProcessGrid, num_rounds: int = 1):  # type: ignore[no-untyped-def]
    """``strategy.start`` from all-zero shared tensors; returns Flower's result."""
    initial = ArrayRecord({n: Array(np.zeros(s, np.float32)) for n, s in SHAPES.items()})
    return strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=num_rounds,
        timeout=30,
        train_config=ConfigRecord({}),
        evaluate_config=ConfigRecord({}),
    )


def _fedavg_of_three() -> PersonaFedAvg:
    """The Message-API strategy over three nodes, m_min 2, checking replies against SHAPES."""
    return PersonaFedAvg(
        RoundOptions(recorder=RoundRecorder(None), min_updates=2),
        shapes=SHAPES,
        min_train_nodes=3,
        min_evaluate_nodes=3,
        min_available_nodes=3,
        weighted_by_key="weight",
    )


@pytest.mark.parametrize(
    "kind",
    [
        "wrong-shape",
        "float64",
        "nan",
        "inf-metric",
        "extra-tensor",
        "extra-metric",
        "no-weight",
        "extra-record",
    ],
)
def test_server_rejects_a_malformed_reply_and_averages_the_rest(kind, caplog) -> None:
    # Prepare
    grid = InProcessGrid(_message_api_app(3, kind), {1: {}, 2: {}, 3: {}})
    strategy = _fedavg_of_three()

    # Execute
    result = _run_from_zeros(strategy, grid)

    # Assert
    (record,) = strategy.recorder.rounds
    assert record["released"] and record["updates"] == 2 and record["failures"] == 1
    for name in SHAPES:
        np.testing.assert_allclose(result.arrays[name].numpy(), 1.5)  # mean of nodes 1, 2
    assert any("rejecting node 3's train reply" in r.getMessage() for r in caplog.records)


def test_replies_that_never_come_count_as_failures() -> None:
    grid = InProcessGrid(_message_api_app(0, ""), {1: {}, 2: {}, 3: {}}, drop={"train": {2}})
    strategy = _fedavg_of_three()
    _run_from_zeros(strategy, grid)
    (record,) = strategy.recorder.rounds
    assert record["updates"] == 2 and record["failures"] == 1 and record["released"]


class _ShrinkingGrid(InProcessGrid):
    """Node 3 goes offline (unlisted, never answers) once round 1's training was delivered."""

    def get_node_ids(self):  # type: ignore[no-untyped-def]  # noqa: D102
        return [n for n in self.contexts if n != 3 or not self.delivered]

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]  # noqa: D102
        gone = bool(self.delivered)
        alive = [m for m in messages if not (gone and m.metadata.dst_node_id == 3)]
        return super().send_and_receive(alive, timeout=timeout)


@pytest.mark.timeout(120)
def test_a_node_lost_after_round_one_does_not_stall_the_message_api_path(caplog) -> None:
    # Prepare: every round wants all three nodes; node 3 is gone after round 1's training.
    grid = _ShrinkingGrid(_message_api_app(0, ""), {1: {}, 2: {}, 3: {}})
    strategy = _fedavg_of_three()
    strategy.rejoin_wait = 0.5

    # Execute (a stall is caught by the timeout)
    _run_from_zeros(strategy, grid, num_rounds=3)

    # Assert: rounds 2 and 3 ran with the two nodes online and were released (m_min 2).
    assert [r["updates"] for r in strategy.recorder.rounds] == [3, 2, 2]
    assert all(r["released"] for r in strategy.recorder.rounds)
    assert strategy.sampled == {1: 3, 2: 2, 3: 2}
    assert any("2 of 3 nodes online" in r.getMessage() for r in caplog.records)


class _DyingAfterTheCheckGrid(InProcessGrid):
    """Node 3 dies right after the strategy's first look at the nodes of each phase: every
    later ``get_node_ids`` misses it, and it never answers."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.looks = 0

    def get_node_ids(self):  # type: ignore[no-untyped-def]  # noqa: D102
        self.looks += 1
        return list(self.contexts) if self.looks == 1 else [1, 2]

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]  # noqa: D102
        self.looks = 0  # the next phase looks afresh
        alive = [m for m in messages if m.metadata.dst_node_id != 3]
        return super().send_and_receive(alive, timeout=timeout)


def test_a_node_lost_between_the_check_and_the_sampling_is_a_failure_not_a_wait(monkeypatch):
    # Prepare: Flower's sampler sleeps while too few nodes are listed; make that an error.
    import flwr.serverapp.strategy.strategy_utils as flower_sampling

    def no_waiting(seconds: float) -> None:
        raise AssertionError("Flower's sampler waited for a node that is gone")

    monkeypatch.setattr(flower_sampling, "sleep", no_waiting)
    grid = _DyingAfterTheCheckGrid(_message_api_app(0, ""), {1: {}, 2: {}, 3: {}})
    strategy = _fedavg_of_three()

    # Execute
    _run_from_zeros(strategy, grid)

    # Assert: node 3 was sampled (it was online when looked at) and counted as a failure.
    (record,) = strategy.recorder.rounds
    assert strategy.sampled == {1: 3}
    assert record["updates"] == 2 and record["failures"] == 1 and record["released"]


def test_secagg_sampling_never_waits_for_a_node_lost_after_the_look() -> None:
    # Prepare: 3 nodes; the moment the strategy has looked at them, node "c" disconnects.
    # (Flower's ClientManager.sample would then wait up to a day for a third node.)
    from flwr.server.client_manager import SimpleClientManager

    class Manager(SimpleClientManager):
        def all(self):  # type: ignore[no-untyped-def]  # noqa: D102
            seen = dict(self.clients)
            self.clients.pop("c", None)
            return seen

        def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:  # noqa: D102
            assert timeout <= 60, f"waited {timeout} s for {num_clients} nodes"
            return len(self.clients) >= num_clients

    manager = Manager()
    manager.clients = {c: SimpleNamespace(cid=c) for c in "abc"}  # type: ignore[misc]
    strategy = SecAggDPStrategy(
        RoundOptions(recorder=RoundRecorder(None), min_updates=2),
        shared_names=["t"],
        initial=[np.zeros(2, np.float32)],
        min_nodes=3,
    )
    strategy._assembled = True  # after round 1: lost nodes get at most rejoin_wait
    strategy.rejoin_wait = 0.1

    # Execute
    sampled = strategy._sample(manager, 1.0)

    # Assert: all three it saw are sampled (the lost one then fails to answer) without waiting.
    assert sorted(p.cid for p in sampled) == ["a", "b", "c"]


# ---- SecAgg+: malformed masked vectors, non-finite or misshapen sums ------------------------


def _vector_app(updates: dict[int, list[np.ndarray]], corrupt: Callable | None) -> ClientApp:
    """Node i returns ``updates[i]`` (weight 1); ``corrupt`` rewrites node 2's masked vector."""

    def break_node_2(msg: Message, ctxt: Context, call_next):  # type: ignore[no-untyped-def]
        reply = secaggplus_mod(msg, ctxt, call_next)
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if ctxt.node_id == 2 and corrupt and configs and Key.MASKED_PARAMETERS in configs:
            configs[Key.MASKED_PARAMETERS] = corrupt(list(configs[Key.MASKED_PARAMETERS]))
        return reply

    app = ClientApp(mods=[break_node_2])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        params = ndarrays_to_parameters(updates[context.node_id])
        res = FitRes(Status(Code.OK, "ok"), params, 1, {})
        return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)

    return app


def _to_bytes(arr: np.ndarray) -> bytes:
    from flwr.common import ndarray_to_bytes

    return ndarray_to_bytes(arr)


MASK_CORRUPTIONS = {
    "one-array-short": lambda vec: vec[:-1],
    "wrong-shape": lambda vec: [vec[0], _to_bytes(np.zeros(7, np.int64)), *vec[2:]],
    "float-dtype": lambda vec: [vec[0], _to_bytes(np.zeros(5, np.float32)), *vec[2:]],
    "garbage-bytes": lambda vec: [vec[0], b"\x00not-an-array", *vec[2:]],
}


@pytest.mark.parametrize("kind", sorted(MASK_CORRUPTIONS))
def test_malformed_masked_vector_counts_as_a_dropout(kind, caplog) -> None:
    # Prepare: five nodes, two tensors; node 2's masked vector is malformed.
    rng = np.random.default_rng(3)
    shapes = [(5,), (2, 3)]
    updates = {
        nid: [rng.uniform(-0.1, 0.1, size=s).astype(np.float32) for s in shapes]
        for nid in range(1, 6)
    }
    params = derive_secagg_params(
        Privatize(1.0, 0.0),
        num_clients=5,
        num_params=11,
        num_shares=1.0,
        reconstruction_threshold=0.6,
    )
    grid = InProcessGrid(_vector_app(updates, MASK_CORRUPTIONS[kind]), {n: {} for n in updates})
    strategy = SecAggDPStrategy(
        RoundOptions(recorder=RoundRecorder(None), min_updates=3),
        shared_names=["t0", "t1"],
        initial=[np.zeros(s, np.float32) for s in shapes],
        min_nodes=5,
    )
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    workflow = secagg_workflow(params, timeout=30, min_masked=3, evaluate=False, shapes=shapes)

    # Execute
    workflow(grid, LegacyContext(context=ctx, config=ServerConfig(num_rounds=1), strategy=strategy))

    # Assert: node 2 is dropped (its masks removed through the others' shares); exact mean.
    record = strategy.recorder._train[1]
    assert record["released"] and record["updates"] == 4 and record["failures"] >= 1
    for i in range(len(shapes)):
        expected = sum(updates[n][i] for n in (1, 3, 4, 5)) / 4
        np.testing.assert_allclose(
            strategy.current[i], expected, atol=3 * params.quantization_step + 1e-6
        )
    assert any("rejecting node" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("problem", ["nan", "inf", "wrong-shape", "too-few-arrays"])
def test_non_finite_or_misshapen_sum_keeps_the_previous_model(problem) -> None:
    # Prepare: the unmasked mean as SecAgg+ would hand it to the strategy.
    initial = [np.ones((2, 2), np.float32), np.ones(3, np.float32)]
    mean = [np.full((2, 2), 0.1, np.float32), np.full(3, 0.1, np.float32)]
    if problem == "nan":
        mean[0][0, 0] = np.nan
    elif problem == "inf":
        mean[1][2] = np.inf
    elif problem == "wrong-shape":
        mean[1] = np.zeros(4, np.float32)
    else:
        mean = mean[:1]
    acc = FederationAccountant(noise_multiplier=1.0, sample_rate=1.0, delta=1e-5)
    strategy = SecAggDPStrategy(
        RoundOptions(recorder=RoundRecorder(acc), min_updates=1),
        shared_names=["a", "b"],
        initial=initial,
        min_nodes=2,
    )
    res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(mean), 2, {"declined": 0})

    # Execute
    params, _ = strategy.aggregate_fit(1, [(None, res), (None, res)], [])  # type: ignore[list-item]

    # Assert
    assert params is None
    assert strategy.recorder._train[1]["released"] is False
    assert "discarded" in strategy.recorder._train[1]["note"]
    for kept, first in zip(strategy.current, initial, strict=True):
        np.testing.assert_array_equal(kept, first)
    assert acc.history == []  # nothing released, nothing charged


# ---- the server's checkpoint ----------------------------------------------------------------


def _state(round_: int = 2) -> checkpoint.ServerState:
    return checkpoint.ServerState(
        round=round_,
        shared_names=["a", "b"],
        shared=[np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, np.float32)],
        config={"num-server-rounds": 3, "dp.noise-multiplier": 1.5, "seed": 1},
        accountant={"noise_multiplier": 1.5, "sample_rate": 1.0, "delta": 1e-5, "history": []},
        rounds=[{"round": 1, "released": True}],
        clients={0: {"personal_loss": 1.0}},
        ab_rounds=[[1.0] * 6],
        pending_train={2: {"updates": 3}},
        rng=checkpoint.capture_rng(),
    )


def test_checkpoint_round_trip(tmp_path) -> None:
    path = checkpoint.save(tmp_path, _state())
    loaded = checkpoint.load(tmp_path)
    assert path.exists() and loaded is not None
    assert loaded.round == 2 and loaded.shared_names == ["a", "b"]
    for got, want in zip(loaded.shared, _state().shared, strict=True):
        np.testing.assert_array_equal(got, want)
    assert loaded.clients == {0: {"personal_loss": 1.0}}
    assert loaded.pending_train == {2: {"updates": 3}}
    assert checkpoint.load(tmp_path / "elsewhere") is None


@pytest.mark.parametrize("offset", [0, 100, -50])
def test_corrupted_checkpoint_is_a_clear_error_and_is_kept(tmp_path, offset) -> None:
    path = checkpoint.save(tmp_path, _state())
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))
    try:
        checkpoint.load(tmp_path)
    except checkpoint.CheckpointError as err:
        assert "checkpoint" in str(err)
    else:  # a flip inside stored array bytes still decodes; the values then differ
        loaded = checkpoint.load(tmp_path)
        assert loaded is not None
    assert path.read_bytes() == bytes(data)  # never rewritten or deleted


def test_checkpoint_from_another_config_names_the_keys() -> None:
    state = _state()
    new_config = {**state.config, "num-server-rounds": 5}
    checkpoint.check_compatible(state, new_config, {"a": (2, 3), "b": (4,)})  # rounds may grow
    with pytest.raises(checkpoint.CheckpointError, match="dp.noise-multiplier"):
        checkpoint.check_compatible(
            state, {**state.config, "dp.noise-multiplier": 2.0}, {"a": (2, 3), "b": (4,)}
        )
    with pytest.raises(checkpoint.CheckpointError, match="do not match the model"):
        checkpoint.check_compatible(state, state.config, {"a": (2, 3), "b": (5,)})


# ---- a killed ServerApp resumes with the same accounting ------------------------------------


class _Killed(BaseException):
    """The ServerApp process dies (not an Exception: nothing in Flower catches it)."""


class _DyingGrid(InProcessGrid):
    """Dies when the first message of Flower round ``die_at`` is sent."""

    def __init__(self, *args, die_at: int, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.die_at = die_at

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        if any(m.metadata.group_id == str(self.die_at) for m in messages):
            raise _Killed
        return super().send_and_receive(messages, timeout=timeout)


def test_killed_server_app_resumes_at_the_next_round_with_the_same_epsilon(tmp_path) -> None:
    # Prepare: 3 devices, 3 rounds, SecAgg+ and distributed DP.
    raw = tiny_run_config(
        **{
            "data.num-users": 3,
            "num-server-rounds": 3,
            "train.local-steps": 1,
            "output.dir": str(tmp_path),
            "output.run-name": "resumed",
        }
    )
    cfg = parse_run_config(raw)
    nodes = {nid: device_node_config(tmp_path / f"d{nid}", nid - 1, 3) for nid in (1, 2, 3)}
    server_ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=raw)

    # Execute: the ServerApp dies as round 2 starts, then a new one starts on the same run dir.
    with pytest.raises(_Killed):
        server_main(_DyingGrid(fedpersona_app, nodes, run_config=raw, die_at=2), server_ctx)
    saved = checkpoint.load(tmp_path / "resumed")
    server_ctx2 = Context(run_id=2, node_id=0, node_config={}, state=RecordDict(), run_config=raw)
    server_main(InProcessGrid(fedpersona_app, nodes, run_config=raw), server_ctx2)

    # Assert
    assert saved is not None and saved.round == 1
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert all(r["released"] for r in summary["rounds"])
    uninterrupted = FederationAccountant(
        noise_multiplier=cfg.dp.noise_multiplier, sample_rate=1.0, delta=cfg.privacy.delta
    )
    for _ in range(3):
        uninterrupted.release()
    user = summary["privacy"]["user_level"]
    assert user["rounds_released"] == 3
    assert user["epsilon_rdp"] == pytest.approx(uninterrupted.epsilon("rdp"), rel=1e-9)
    assert summary["rounds"][-1]["user_epsilon"] == pytest.approx(user["epsilon_rdp"])
    assert summary["timings"]["resumed_after_round"] == 1
    for nid in (1, 2, 3):  # devices saw the run's round numbers, not Flower's restarted count
        with open_test_store(tmp_path / f"d{nid}") as store:
            assert [e["round"] for e in store.get_json("ledger")["events"]] == [1, 2, 3]
    final = checkpoint.load(tmp_path / "resumed")
    assert final is not None and final.round == 3


def test_resume_refuses_a_changed_privacy_config(tmp_path) -> None:
    raw = tiny_run_config(
        **{"data.num-users": 2, "output.dir": str(tmp_path), "output.run-name": "r"}
    )
    checkpoint.save(
        tmp_path / "r",
        checkpoint.ServerState(
            round=1,
            shared_names=[],
            shared=[],
            config={**parse_run_config(raw).to_flat(), "dp.noise-multiplier": 99.0},
        ),
    )
    nodes = {
        1: device_node_config(tmp_path / "d1", 0, 2),
        2: device_node_config(tmp_path / "d2", 1, 2),
    }
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=raw)
    with pytest.raises(checkpoint.CheckpointError, match="dp.noise-multiplier"):
        server_main(InProcessGrid(fedpersona_app, nodes, run_config=raw), ctx)


# ---- a device killed mid-round restarts from its last committed state -----------------------

_DEVICE_CHILD = """
import os, signal, sys
from pathlib import Path
import client.federation.device as device_mod
import client.store.state as state_mod
from client.client_app import train
from client.federation.runtime import get_runtime
from common.config import parse_run_config
from common.serialization import to_arrayrecord
from tests.conftest import device_node_config, make_context, make_message, tiny_run_config

data_dir, mode, server_round = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
raw = tiny_run_config()
cfg = parse_run_config(raw)
rt = get_runtime(cfg)

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "kill-in-training":
    device_mod.train_steps = die
elif mode == "kill-in-commit":  # personal tensors and ledger queued, record not yet
    state_mod.DeviceState.save_meta = die
ctx = make_context(raw, device_node_config(data_dir, 0, 4))
global_shared = {n: rt.init[n] for n in rt.shared_names}
train(make_message(to_arrayrecord(global_shared), "train", server_round=server_round), ctx)
"""


def _device_child(data_dir, mode: str, server_round: int) -> int:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    from simulations.simulate import PROJECT_DIR

    proc = subprocess.run(
        [sys.executable, "-c", _DEVICE_CHILD, str(data_dir), mode, str(server_round)],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode in (0, -9), proc.stderr[-2000:]
    return proc.returncode


def test_device_killed_mid_round_restarts_from_its_last_committed_round(tmp_path) -> None:
    # Prepare: a device that completed round 1.
    data_dir = tmp_path / "dev"
    assert _device_child(data_dir, "normal", 1) == 0
    committed = stored_device_state(data_dir)

    # Execute: SIGKILL during round 2's training, then inside its commit (personal tensors and
    # ledger queued, device record not yet); then round 2 again after the restart.
    after_crash = {}
    for mode in ("kill-in-training", "kill-in-commit"):
        assert _device_child(data_dir, mode, 2) == -9
        after_crash[mode] = stored_device_state(data_dir)
    assert _device_child(data_dir, "normal", 2) == 0

    # Assert
    for mode, stored in after_crash.items():
        assert stored == committed, mode  # nothing of the killed round landed
    final = stored_device_state(data_dir)
    assert [e["round"] for e in final["ledger"]["events"]] == [1, 2]
    assert final["device"]["rounds_trained"] == 2 and final["personal"] != committed["personal"]
