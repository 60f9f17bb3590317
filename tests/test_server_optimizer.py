"""The server's optimizer along the released means, its checkpointed state, and the benchmark
that replays a run's released rounds through other optimizers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from benchmarks import server_step as bench_server_step
from client.client_app import app as fedpersona_app
from client.federation.runtime import get_runtime
from common.config import ServerConfig, parse_run_config
from server import checkpoint
from server.optimizer import ServerStep
from server.server_app import main as server_main
from tests.conftest import device_node_config, tiny_run_config
from tests.flower_harness import InProcessGrid

DELTAS = [np.array([0.5, -1.0]), np.array([0.25, 2.0]), np.array([-0.5, 0.0])]


def _run(step: ServerStep, deltas=DELTAS) -> np.ndarray:  # type: ignore[no-untyped-def]
    x = {"w": np.zeros(2, np.float32)}
    for d in deltas:
        x = step.step(x, {"w": d})
    return x["w"]


def test_sgd_is_fedavg_with_a_server_learning_rate() -> None:
    np.testing.assert_allclose(_run(ServerStep("sgd", learning_rate=3.0)), 3.0 * sum(DELTAS))


def test_momentum_accumulates_the_released_means() -> None:
    beta, lr = 0.9, 2.0
    v, x = np.zeros(2), np.zeros(2)
    for d in DELTAS:
        v = beta * v + d
        x = x + lr * v
    got = _run(ServerStep("momentum", learning_rate=lr, momentum=beta))
    np.testing.assert_allclose(got, x, rtol=1e-6)


@pytest.mark.parametrize("kind", ["adam", "yogi"])
def test_adaptive_steps_follow_reddi_et_al(kind: str) -> None:
    b1, b2, tau, lr = 0.9, 0.99, 1e-3, 0.1
    m, u, x = np.zeros(2), np.zeros(2), np.zeros(2)
    for d in DELTAS:
        m = b1 * m + (1 - b1) * d
        if kind == "adam":
            u = b2 * u + (1 - b2) * d**2
        else:
            u = u - (1 - b2) * d**2 * np.sign(u - d**2)
        x = x + lr * m / (np.sqrt(u) + tau)
    got = _run(ServerStep(kind, learning_rate=lr, momentum=b1, beta2=b2, tau=tau))
    np.testing.assert_allclose(got, x, rtol=1e-6)
    # Normalised: once the means are well above τ, their scale no longer matters.
    large = _run(ServerStep(kind, learning_rate=lr), [1000 * d for d in DELTAS])
    larger = _run(ServerStep(kind, learning_rate=lr), [10000 * d for d in DELTAS])
    np.testing.assert_allclose(large, larger, rtol=1e-3)


@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam", "yogi"])
def test_a_restored_optimizer_takes_the_steps_an_uninterrupted_one_would(kind: str) -> None:
    whole = _run(ServerStep(kind, learning_rate=0.5))
    first = ServerStep(kind, learning_rate=0.5)
    x = {"w": np.zeros(2, np.float32)}
    x = first.step(x, {"w": DELTAS[0]})
    second = ServerStep(kind, learning_rate=0.5)
    second.load_state_dict(first.state_dict())
    for d in DELTAS[1:]:
        x = second.step(x, {"w": d})
    np.testing.assert_allclose(x["w"], whole, rtol=1e-6)


def test_state_of_another_optimizer_is_refused() -> None:
    with pytest.raises(ValueError, match="'adam'.*'momentum'"):
        ServerStep("momentum").load_state_dict(ServerStep("adam").state_dict())


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("server.optimizer", "lamb"),
        ("server.momentum", 1.0),
        ("server.beta2", -0.1),
        ("server.tau", 0.0),
        ("server.learning-rate", 0.0),
    ],
)
def test_bad_server_settings_are_refused_naming_the_key(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=key):
        parse_run_config(tiny_run_config(**{key: value}))


def test_checkpoint_keeps_the_optimizer_state(tmp_path) -> None:
    step = ServerStep("adam", learning_rate=0.1)
    step.step({"a": np.zeros(3, np.float32)}, {"a": np.array([1.0, -2.0, 3.0])})
    state = checkpoint.ServerState(
        round=1,
        shared_names=["a"],
        shared=[np.zeros(3, np.float32)],
        config={},
        optimizer=step.state_dict(),
    )
    checkpoint.save(tmp_path, state)
    loaded = checkpoint.load(tmp_path)
    assert loaded is not None and loaded.optimizer is not None
    restored = ServerStep("adam", learning_rate=0.1)
    restored.load_state_dict(loaded.optimizer)
    for part in ("first", "second"):
        np.testing.assert_array_equal(
            restored.state_dict()[part]["a"], step.state_dict()[part]["a"]
        )


def _federation(tmp_path, **overrides):  # type: ignore[no-untyped-def]
    """A tiny 3-user blend run in process, its devices under the run dir as a simulation
    keeps them; returns (raw run config, node configs)."""
    raw = tiny_run_config(
        **{
            "data.num-users": 3,
            "num-server-rounds": 3,
            "train.local-steps": 1,
            "personalization.strategy": "blend",
            "eval.local-only": True,
            "output.dir": str(tmp_path),
            "output.run-name": "run",
            **overrides,
        }
    )
    devices = tmp_path / "run" / "devices"
    nodes = {
        nid: {**device_node_config(devices / f"d{nid}", nid - 1, 3), "local-only-baseline": "true"}
        for nid in (1, 2, 3)
    }
    return raw, nodes


def _serve(raw, nodes, run_id: int = 1) -> None:  # type: ignore[no-untyped-def]
    ctx = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=raw)
    server_main(InProcessGrid(fedpersona_app, nodes, run_config=raw), ctx)


def test_the_released_means_replayed_give_the_run_s_global_tensors(tmp_path) -> None:
    # Prepare / Execute: three rounds with server momentum.
    raw, nodes = _federation(
        tmp_path, **{"server.optimizer": "momentum", "server.learning-rate": 2.0}
    )
    _serve(raw, nodes)

    # Assert: one file per released round, holding the shared tensors' shapes; the final
    # tensors are the initial ones moved by the same optimizer along them.
    run = tmp_path / "run"
    files = sorted((run / checkpoint.RELEASED).glob("round-*.npz"))
    assert [f.name for f in files] == ["round-0001.npz", "round-0002.npz", "round-0003.npz"]
    means = bench_server_step.released_means(run)
    final = checkpoint.load(run)
    assert final is not None and final.optimizer is not None
    assert final.optimizer["kind"] == "momentum"
    assert {n: a.shape for n, a in means[0].items()} == dict(
        zip(final.shared_names, (a.shape for a in final.shared), strict=True)
    )
    init = get_runtime(parse_run_config(raw)).init
    moved = bench_server_step.displacement(
        ServerConfig(optimizer="momentum", learning_rate=2.0), means
    )
    for name, array in zip(final.shared_names, final.shared, strict=True):
        assert np.abs(moved[name]).max() > 0  # the run moved the global adapter
        np.testing.assert_allclose(array, init[name].numpy() + moved[name], atol=1e-6)


def test_the_benchmark_reproduces_the_run_and_ranks_other_optimizers(tmp_path) -> None:
    # Prepare: a finished blend run with its devices.
    raw, nodes = _federation(tmp_path, **{"server.learning-rate": 2.0})
    _serve(raw, nodes)
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    specs = {
        "x4": {"optimizer": "sgd", "learning_rate": "x4"},
        "adam": {"optimizer": "adam"},
        "prior 0": {"mix_prior": 0.0},
    }

    # Execute
    result = bench_server_step.measure(run, newcomers=2, specs=specs)

    # Assert: the run's own row is what its devices reported; the others differ.
    own, x4, adam, prior0 = result["candidates"]
    assert own["candidate"] == "run: sgd lr 2"
    assert x4["server"]["learning_rate"] == 8.0 and x4["candidate"] == "sgd lr 8"
    assert adam["candidate"].startswith("adam lr 2")
    reported = summary["versus_local"]
    assert own["trained"] == reported["users"] == 3
    # Exact: the devices evaluated the global tensors as their stores keep them.
    assert own["mean_gain_nats"] == pytest.approx(reported["mean_gain_nats"], abs=1e-9)
    assert own["better_than_local"] == pytest.approx(reported["win_vs_local"])
    served_own = [r["personal_loss"] for r in result["rows"][own["candidate"]]]
    served_x4 = [r["personal_loss"] for r in result["rows"][x4["candidate"]]]
    global_own = [r["global_loss"] for r in result["rows"][own["candidate"]]]
    global_x4 = [r["global_loss"] for r in result["rows"][x4["candidate"]]]
    assert global_own != global_x4
    assert all(math.isfinite(v) for v in served_own + served_x4)
    assert 0.0 <= x4["newcomers_below_base"] <= 1.0
    assert "| run: sgd lr 2 |" in bench_server_step.table(result)
    # A candidate prior changes the devices' weights, not the global adapter.
    assert prior0["candidate"] == "sgd lr 2, prior 0" and prior0["mix_prior"] == 0.0
    global_prior0 = [r["global_loss"] for r in result["rows"][prior0["candidate"]]]
    assert global_prior0 == global_own


def test_the_benchmark_refuses_a_run_it_cannot_replay(tmp_path) -> None:
    raw, nodes = _federation(tmp_path, **{"num-server-rounds": 1})
    _serve(raw, nodes)
    run = tmp_path / "run"
    for f in (run / checkpoint.RELEASED).glob("*.npz"):
        f.unlink()
    with pytest.raises(bench_server_step.ReplayError, match="no released round"):
        bench_server_step.measure(run, newcomers=0)
