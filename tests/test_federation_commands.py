"""A real federation from the two one-command services, on 127.0.0.1: ``fedpersona server
init`` + ``server start`` and three ``fedpersona device join`` process groups, TLS and device
authentication on, each device with its owner's imported writing.

* A device whose key the server does not know, or that trusts another CA, gets one line
  naming the fix.
* ``server run`` releases three SecAgg+ rounds; one device's worker is SIGKILLed in round 1,
  its ``join`` restarts it and the device takes part again by the last round (its ledger and
  store intact).
* Each device's ``device status`` shows the federation: running, rounds, ε, what left.
* SIGTERM stops each service and leaves nothing running.

Tiny model; part of the test command (a few minutes on 2 cores; alone: pytest -m deployment).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.keys import make_certs
from common.supervise import free_port
from simulations.deployment import (
    LocalDeployment,
    device_key,
    processes_mentioning,
    tiny_run_config,
)
from tests.conftest import open_test_store

pytestmark = [pytest.mark.integration, pytest.mark.deployment, pytest.mark.slow]
FEDPERSONA = str(Path(sys.executable).parent / "fedpersona")
DEVICES = 3
ROUNDS = 3


class Services:
    """The command-line services this test starts, each in its own session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "COLUMNS": "300", "FLWR_TELEMETRY_ENABLED": "0"}

    def cli(self, *args: str | Path, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(
            [FEDPERSONA, *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
        )

    def start(self, name: str, *args: str | Path) -> subprocess.Popen:
        log = open(self.root / f"{name}.out", "w")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            [FEDPERSONA, *map(str, args)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def out(self, name: str) -> str:
        return (self.root / f"{name}.out").read_text(errors="replace")

    def stop(self, name: str, timeout: float = 60) -> int:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=timeout)

    def kill_all(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)


def _until(cond, what: str, timeout: float, proc: subprocess.Popen | None = None) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout:.0f} s")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Iterator[tuple[Services, Path, int, list[Path]]]:
    """``server init`` + ``server start``; three devices with their owners' writing."""
    root = tmp_path_factory.mktemp("fed")
    s = Services(root)
    fed, port = root / "federation", free_port()
    devices = []
    try:
        done = s.cli("server", "init", "--dir", fed, "--host", "localhost")
        assert done.returncode == 0, done.stdout + done.stderr
        server = s.start("server", "server", "start", "--dir", fed, "--port", str(port))
        owners = LocalDeployment(root / "owners")  # imports each owner's writing as a user would
        for i in range(DEVICES):
            devices.append(owners.import_writing(root / f"device{i}", i, DEVICES))
        _until(
            lambda: s.cli("server", "devices", "list", "--dir", fed).returncode == 0,
            "the server answers",
            120,
            server,
        )
        yield s, fed, port, devices
    finally:
        s.kill_all()


def _join(s: Services, name: str, port: int, ca: Path, data_dir: Path) -> subprocess.Popen:
    return s.start(name, "device", "join", f"127.0.0.1:{port}", "--ca", ca,
                   "--data-dir", data_dir, "--key-file", device_key(data_dir))  # fmt: skip


def _online(s: Services, fed: Path) -> int:
    done = s.cli("server", "devices", "list", "--dir", fed, "--json")
    if done.returncode != 0:
        return 0
    return sum(n.get("status") == "online" for n in json.loads(done.stdout))


def _state(data_dir: Path) -> dict:
    return json.loads((data_dir / "federation.json").read_text())


def test_devices_join_a_run_survives_a_killed_worker_and_everything_stops(federation) -> None:
    s, fed, port, devices = federation
    ca = fed / "certs" / "ca.crt"

    # A device the server does not know yet: one line naming the fix; nothing left running.
    first = _join(s, "join-unregistered", port, ca, devices[0])
    assert first.wait(timeout=300) == 1, s.out("join-unregistered")
    refused = s.out("join-unregistered")
    assert "does not know this device's key" in refused and "server devices add" in refused
    assert processes_mentioning(str(devices[0])) == []

    # A device that trusts another CA: turned away before anything starts.
    other = fed.parent / "other-ca"
    make_certs(other, nodes=0)
    wrong = s.cli("device", "join", f"127.0.0.1:{port}", "--ca", other / "ca.crt", "--data-dir",
                  devices[1], "--key-file", device_key(devices[1]))  # fmt: skip
    assert wrong.returncode == 1 and "is not certified by" in wrong.stdout, wrong.stdout

    # Register every device (each makes its key pair on the device), then join all three.
    for d in devices:
        assert s.cli("device", "key", "--data-dir", d).stdout.startswith("ecdsa-sha2-nistp384")
        added = s.cli("server", "devices", "add", d / "node.key.pub", "--dir", fed)
        assert added.returncode == 0, added.stdout + added.stderr
    joins = [_join(s, f"join{i}", port, ca, d) for i, d in enumerate(devices)]
    _until(lambda: _online(s, fed) == DEVICES, "three devices online", 300)

    # Execute: a three-round run; device 1's worker is SIGKILLed once round 1 reaches it.
    config = fed.parent / "run.toml"
    keys = tiny_run_config(fed / "runs", "fed", **{"data.num-users": 0, "dp.min-clients": 2,
                                                   "secagg.timeout": 120.0,
                                                   "num-server-rounds": ROUNDS})  # fmt: skip
    config.write_text("".join(f'"{k}" = {json.dumps(v)}\n' for k, v in keys.items()))
    run = s.start("run", "server", "run", "--dir", fed, "--run-config", config)
    victim = devices[1]
    _until(
        lambda: "Receiving: train message" in (victim / "join.log").read_text(),
        "round 1 reaches device 1",
        300,
        run,
    )
    worker_pid = _state(victim)["processes"]["worker"]["pid"]
    os.kill(worker_pid, signal.SIGKILL)
    assert run.wait(timeout=900) == 0, s.out("run")[-3000:]

    # Assert: every round released; the victim, restarted by its join, was back by the last.
    summary = json.loads((fed / "runs" / "fed" / "summary.json").read_text())
    rounds = summary["rounds"]
    assert [r["released"] for r in rounds] == [True] * ROUNDS, rounds
    assert rounds[0]["updates"] >= 2 and rounds[-1]["updates"] == DEVICES, rounds
    assert _state(victim)["processes"]["worker"]["restarts"] >= 1
    assert "restarting worker" in (victim / "join.log").read_text()
    for i, d in enumerate(devices):
        status = s.cli("device", "status", "--json", "--data-dir", d, "--key-file", device_key(d))
        assert status.returncode == 0, status.stdout + status.stderr
        f = json.loads(status.stdout)["federation"]
        assert f["joined"] and f["running"] and f["address"] == f"127.0.0.1:{port}"
        assert f["connected"] is True and f["server_error"] is None  # its server answers
        # The victim lost round 1 (or 2) if the kill came before its update was committed.
        assert f["rounds_joined"] in ((ROUNDS - 2, ROUNDS - 1, ROUNDS) if i == 1 else (ROUNDS,))
        assert 0 < f["user_epsilon"] <= f["epsilon_cap"]
        last = f["sent"][-1]["sent"]
        assert last["masked"] is True and last["bytes"] > 0
        assert all(set(t) == {"name", "shape", "bytes"} for t in last["tensors"])
        with open_test_store(d) as store:  # the ledger agrees with the rounds trained
            trained = store.get_json("device")["rounds_trained"]
            assert len(store.get_json("ledger")["events"]) == trained == f["rounds_joined"]
    server_status = s.cli("server", "status", "--dir", fed, "--json")
    (row,) = json.loads(server_status.stdout)["runs"]
    assert row["finished"] and row["released"] == ROUNDS and row["discarded"] == 0
    assert row["cohorts"][-1] == DEVICES and row["user_epsilon"] > 0

    # SIGTERM stops each service and everything it ran.
    for i in range(DEVICES):
        assert s.stop(f"join{i}") == 0, s.out(f"join{i}")[-2000:]
        assert processes_mentioning(str(devices[i])) == []
        assert not _state(devices[i])["processes"]["worker"]["running"]
    assert all(j.poll() is not None for j in joins)
    assert s.stop("server") == 0, s.out("server")[-2000:]
    assert processes_mentioning(str(fed)) == []
