"""The simulation on an existing Ray cluster (simulations/cluster.py, simulations/engine.py).

The real thing: a head and a worker node brought up with Ray's own ``ray start`` on this
machine (each with 1 CPU and a custom ``fedpersona`` resource), the tiny federation run on them
through ``fedpersona simulate``'s own code, and compared with the same run on the simulation's
own single-node Ray. Bad input: an address nothing answers on, a node without the project,
resources no node has, a node lost mid-run. Every process is stopped by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.config import parse_resources, parse_run_config
from common.secagg import neighbourhood_failure, neighbourhood_size
from common.supervise import free_port
from simulations.cluster import (
    ClientResources,
    ClusterError,
    code_fingerprint,
    problems,
    resolve_address,
)
from simulations.simulate import simulate, stop_process_tree

# --- resources, addresses, fingerprints: plain functions -------------------------------------


def test_client_resources_from_the_run_config_and_what_a_node_fits():
    cfg = parse_run_config(
        {
            "simulation.client-cpus": 0.5,
            "simulation.client-memory-mb": 512,
            "simulation.client-resources": "fedpersona=1",
        }
    )
    res = ClientResources.of(cfg)
    assert res.ray_options() == {
        "num_cpus": 0.5,
        "num_gpus": 0.0,
        "memory": 512 * 2**20,
        "resources": {"fedpersona": 1.0},
    }
    node = {"CPU": 4.0, "memory": 1.5 * 2**30, "fedpersona": 2.0}
    assert res.fits(node) == 2  # the custom resource binds first
    assert res.fits({"CPU": 4.0, "memory": 2**30}) == 0  # a node without it hosts none
    assert ClientResources(cpus=1.0, gpus=1.0).fits({"CPU": 8.0}) == 0
    assert ClientResources.from_json(res.to_json()) == res


@pytest.mark.parametrize(
    "text", ["fedpersona", "CPU=2", "memory=1", "a=0", "a=-1", "a=inf", "a=1,a=1", "=2"]
)
def test_bad_custom_resources_are_refused_by_key(text):
    with pytest.raises(ValueError, match="simulation.client-resources"):
        parse_run_config({"simulation.client-resources": text})
    assert parse_resources(" a = 1 , b=0.5 ") == {"a": 1.0, "b": 0.5}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("simulation.client-cpus", 0.0),
        ("simulation.client-gpus", -1.0),
        ("simulation.client-memory-mb", -5),
    ],
)
def test_bad_client_resources_are_refused(key, value):
    with pytest.raises(ValueError, match=key):
        parse_run_config({key: value})


def test_the_address_comes_from_the_flag_then_ray_address():
    assert resolve_address(None, {}) is None
    assert resolve_address(None, {"RAY_ADDRESS": "10.0.0.1:6379"}) == "10.0.0.1:6379"
    assert resolve_address("127.0.0.1:7000", {"RAY_ADDRESS": "x:1"}) == "127.0.0.1:7000"
    assert resolve_address(None, {"RAY_ADDRESS": "local"}) is None


def test_problems_name_each_node_and_why():
    here = {"fedpersona": "abc", "packages": {"flwr": "1.42.0", "ray": "2.55.1"}}
    good = {"fedpersona": "abc", "packages": dict(here["packages"])}
    good |= {"sees_run_dir": True, "writes_run_dir": True}
    nodes = [
        {"node_id": "a" * 20, "ip": "10.0.0.1", "facts": good},
        {"node_id": "b" * 20, "ip": "10.0.0.2", "facts": {**good, "fedpersona": "old"}},
        {"node_id": "c" * 20, "ip": "10.0.0.3", "facts": {**good, "sees_run_dir": False}},
        {"node_id": "d" * 20, "ip": "10.0.0.4", "error": "GetTimeoutError: 60 s"},
        {
            "node_id": "e" * 20,
            "ip": "10.0.0.5",
            "facts": {**good, "packages": {"flwr": "1.41.0", "ray": "2.55.1"}},
        },
    ]
    found = problems(nodes, here)
    assert len(found) == 4
    assert "bbbbbbbbbbbb (10.0.0.2)" in found[0] and "other fedpersona code" in found[0]
    assert "shared" in found[1]
    assert "did not answer" in found[2]
    assert "flwr 1.41.0 (here 1.42.0)" in found[3]
    assert len(code_fingerprint()) == 16


# --- SecAgg+'s neighbourhoods from the cohort --------------------------------------------------


def test_neighbourhoods_grow_as_log_of_the_cohort_and_meet_their_bounds():
    rule = {"threshold": 0.67, "dropout": 0.1, "corrupt": 0.1}
    sizes = {n: neighbourhood_size(n, **rule) for n in (16, 100, 1000, 10_000)}
    assert sizes[16] == 16  # a small cohort: everyone
    assert sizes[100] < 100 and sizes[1000] < 150 and sizes[10_000] < 150
    assert sizes[100] <= sizes[1000] <= sizes[10_000]
    for n, k in sizes.items():
        assert k % 2 == 1 or k == n
        if k < n:
            security, correctness = neighbourhood_failure(n, k, **rule)
            assert security <= -40 and correctness <= -20
            smaller = neighbourhood_failure(n, k - 2, **rule)
            assert smaller[0] > -40 or smaller[1] > -20  # the fewest that meet them
    # never fewer than the m_min a device checks its cohort by
    assert neighbourhood_size(10_000, **rule, at_least=301) == 301
    # more dropouts need more neighbours
    assert neighbourhood_size(10_000, threshold=0.67, dropout=0.2, corrupt=0.1) > sizes[10_000]


def test_derived_neighbourhoods_need_a_threshold_fraction():
    with pytest.raises(ValueError, match="secagg.reconstruction-threshold"):
        parse_run_config({"secagg.num-shares": 0.0, "secagg.reconstruction-threshold": 5.0})
    assert parse_run_config({"secagg.num-shares": 11.0, "secagg.reconstruction-threshold": 7.0})
    with pytest.raises(ValueError, match="secagg.dropout-rate"):
        parse_run_config({"secagg.dropout-rate": 0.5})


# --- a real two-node Ray cluster on this machine ----------------------------------------------

_RAY_MAIN = "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"
# Each node: 1 CPU and the custom resource the ClientApps ask for below.
_NODE = ["--node-ip-address=127.0.0.1", "--num-cpus=1", '--resources={"fedpersona": 1}']


def _ray_start(args: list[str], log: Path, python: str = sys.executable) -> subprocess.Popen:
    """``ray start --block …`` (it stays in the foreground, the node's processes its children:
    stopping its tree by PID stops the node)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [python, "-c", _RAY_MAIN, "start", "--block", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=log.parent,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
            start_new_session=True,
        )
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process_tree(proc)
            pytest.fail(f"ray start did not come up:\n{log.read_text()[-2000:]}")
        time.sleep(0.5)
    return proc


@contextlib.contextmanager
def ray_cluster(tmp: Path) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """A head and one worker node on 127.0.0.1; yields the address and the nodes' processes
    (head first; a test may append more), all stopped by PID at the end."""
    temp = Path(tempfile.mkdtemp(prefix="fpc-", dir="/tmp"))  # short: Ray's socket paths
    port = free_port()
    procs: list[subprocess.Popen] = []
    try:
        head = [f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}"]
        procs.append(_ray_start(["--head", *head, *_NODE], tmp / "head.log"))
        address = f"127.0.0.1:{port}"
        procs.append(_ray_start([f"--address={address}", *_NODE], tmp / "worker.log"))
        yield address, procs
    finally:
        for proc in reversed(procs):
            stop_process_tree(proc, timeout=20)

        shutil.rmtree(temp, ignore_errors=True)


# The tiny federation, without noise: the devices' DP noise is drawn fresh from the OS on
# every run (a seeded draw could be subtracted by anyone who knows the seed), so only a run
# without it can be compared number for number.
EXACT = {"dp.noise-mode": "none"}
ON_CLUSTER = {"simulation.client-resources": "fedpersona=1"}


def _losses(run_dir: Path) -> list[tuple]:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [(r["train_loss"], r["global_loss"], r["personal_loss"]) for r in summary["rounds"]]
    return rows + [(c["user"], c["personal_loss"]) for c in summary["clients"]]


@pytest.mark.timeout(900)
def test_a_run_on_a_two_node_cluster_equals_the_single_node_run(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local = simulate("tiny", EXACT, tmp_path / "runs", run_name="local")
    lines: list[str] = []
    with ray_cluster(tmp_path) as (address, _):
        monkeypatch.setenv("RAY_ADDRESS", address)  # as a Ray user would
        remote = simulate(
            "tiny",
            {**EXACT, **ON_CLUSTER},
            tmp_path / "runs",
            run_name="cluster",
            on_line=lines.append,
        )
    assert _losses(remote) == _losses(local)
    summary = json.loads((remote / "summary.json").read_text())
    nodes = summary["ray"]["nodes"]
    assert summary["ray"]["address"] == address
    assert len(nodes) == 2 and all(row["calls"] > 0 for row in nodes.values())
    assert any("2 node(s) can host ClientApps" in line for line in lines)
    local_summary = json.loads((local / "summary.json").read_text())
    assert summary["privacy"] == local_summary["privacy"]
    assert len(local_summary["ray"]["nodes"]) == 1


@pytest.mark.timeout(600)
def test_a_cluster_that_cannot_run_it_is_refused_before_the_run(tmp_path):
    # nothing listens there: refused at once, not after Ray's minutes of retries
    start = time.monotonic()
    with pytest.raises(ClusterError, match="nothing answers"):
        simulate(
            "tiny", {}, tmp_path / "runs", run_name="none", ray_address=f"127.0.0.1:{free_port()}"
        )
    assert time.monotonic() - start < 30
    bare = tmp_path / "bare"  # Ray and every dependency, but not fedpersona
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    site = next(bare.glob("lib/python*/site-packages"))
    (site / "deps.pth").write_text(next(p for p in sys.path if p.endswith("site-packages")))
    with ray_cluster(tmp_path) as (address, procs):
        with pytest.raises(ClusterError, match="has what a ClientApp asks for"):
            simulate(
                "tiny",
                {"simulation.client-resources": "gpu-node=1"},
                tmp_path / "runs",
                run_name="nogpu",
                ray_address=address,
            )
        join = [f"--address={address}", *_NODE]
        procs.append(_ray_start(join, tmp_path / "bare.log", python=str(bare / "bin/python")))
        with pytest.raises(ClusterError, match="cannot import fedpersona's ClientApp") as err:
            simulate("tiny", ON_CLUSTER, tmp_path / "runs", run_name="bare", ray_address=address)
    assert "No module named 'client'" in str(err.value)
    assert not (tmp_path / "runs" / "bare" / "summary.json").exists()


@pytest.mark.timeout(900)
def test_a_node_lost_mid_run_is_a_dropout_not_a_hang(tmp_path):
    with ray_cluster(tmp_path) as (address, procs):
        worker = procs[1]

        def on_round(current: int, total: int) -> None:
            if current == 2 and worker.poll() is None:
                stop_process_tree(worker)  # the worker node goes, its actor with it

        run = simulate(
            "tiny",
            {**ON_CLUSTER, "num-server-rounds": 3},
            tmp_path / "runs",
            run_name="lost",
            on_round=on_round,
            ray_address=address,
        )
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["rounds"]) == 3
    assert summary["ray"]["lost_actors"] >= 1
    assert summary["rounds"][-1]["updates"] > 0  # the last round ran on the head alone
