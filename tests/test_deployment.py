"""The deployment of docker-compose.yml and deploy/k8s, on real processes on 127.0.0.1.

* TLS + SuperNode authentication + isolation ``process``: a SuperLink with
  ``--enable-supernode-auth`` and its ServerApp executor (``flower-superexec`` holding the
  shared SuperExec secret); three SuperNodes registered with ``flwr supernode register``, each
  with its own long-lived ClientApp executor and device worker (the model stays loaded; the
  per-message ClientApps forward training and evaluation to it); ``flwr run`` over TLS; two
  SecAgg+ rounds.
* Refusal: a SuperNode with an unregistered key and one with no key are turned away (Flower
  exit code 305, the SuperLink's reason in their log) and never counted by the federation.
* Dropout: with SecAgg+ on, one of three SuperNodes is SIGKILLed in the middle of round 1's
  training stage; round 1 completes with the two survivors and round 2 runs with them.

The processes are :class:`simulations.deployment.LocalDeployment`'s: each in its own session,
tagged through its environment, stopped by PID, and the tests check that none is left. Tiny
model.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from simulations.deployment import (
    BIN,
    LocalDeployment,
    processes_mentioning,
    tiny_run_config,
)
from simulations.simulate import PROJECT_DIR
from tests.conftest import open_test_store
from tests.test_integration import _check_summary

# Part of the test command (about 6 minutes on 2 cores); alone: pytest -m deployment
pytestmark = [pytest.mark.integration, pytest.mark.deployment]
MAKE_CERTS = PROJECT_DIR / "scripts" / "make_certs.py"
REGISTERED = 3


def _finish(proc: subprocess.Popen, d: LocalDeployment, timeout: float) -> int:
    """Wait for ``flwr run``; on a timeout, fail with the ends of the logs."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        tails = {n: d.log(n)[-1500:] for n in d.procs}
        pytest.fail(f"flwr run did not finish in {timeout:.0f} s:\n{json.dumps(tails, indent=1)}")


def _finish_watching_apps(
    proc: subprocess.Popen, d: LocalDeployment, timeout: float
) -> tuple[int, dict[str, set[int]], dict[int, str]]:
    """Wait for ``flwr run`` like :func:`_finish`, noting meanwhile which processes start
    ``flwr-serverapp`` and ``flwr-clientapp`` (their parents' PIDs), and what each ClientApp
    process was given: its ``/proc/<pid>/environ`` and command line, as text."""
    parents: dict[str, set[int]] = {"flwr-serverapp": set(), "flwr-clientapp": set()}
    clientapps: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        for program, seen in parents.items():
            running = d.children_running(program)
            seen.update(running.values())
            if program == "flwr-clientapp":
                for pid in set(running) - set(clientapps):
                    with contextlib.suppress(OSError):  # it may have finished already
                        given = b"".join(
                            Path(f"/proc/{pid}/{part}").read_bytes()
                            for part in ("environ", "cmdline")
                        )
                        clientapps[pid] = given.replace(b"\0", b"\n").decode(errors="replace")
        time.sleep(0.2)
    code = _finish(proc, d, timeout=max(1.0, deadline - time.monotonic()))
    return code, parents, clientapps


# ---- TLS + SuperNode authentication + isolation process --------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """One CA, server certificate and four SuperNode key pairs for the module."""
    out = tmp_path_factory.mktemp("certs")
    res = subprocess.run(
        [sys.executable, str(MAKE_CERTS), "--out", str(out), "--nodes", str(REGISTERED + 1)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="module")
def tls_deployment(tmp_path_factory, certs) -> Iterator[LocalDeployment]:
    """SuperLink (TLS, auth, process isolation) + ServerApp executor + 3 registered SuperNodes
    with their ClientApp executors and device workers + 2 intruders; yields once the 3 are
    online."""
    root = tmp_path_factory.mktemp("tls")
    d = LocalDeployment(root, ca=certs / "ca.crt", federation="deploy")
    try:
        d.start_superlink(certs=certs, isolation="process")
        d.start(
            "serverapp",
            [
                BIN / "flower-superexec",
                "--runtime-api-address", f"127.0.0.1:{d.port}",
                "--root-certificates", certs / "ca.crt",
                "--superexec-auth-secret-file", certs / "superexec.secret",
            ],
        )  # fmt: skip
        d.registered = [d.register(certs / f"supernode-{i}.pub") for i in range(REGISTERED)]
        for i in range(REGISTERED):
            # Each device as docker-compose.yml runs it: SuperNode, ClientApp executor, and
            # the device worker that keeps the model loaded for the ClientApps; its store
            # holds what its owner imported (`device init`, `device import`), and its node
            # config names the store and key only, no partition.
            d.start_device(i, REGISTERED, isolation="process", key=certs / f"supernode-{i}.key",
                           worker=True, label=False)  # fmt: skip
        # Intruders: a well-formed key the SuperLink was never told about, and no key at all.
        for name, key in (("intruder-unregistered", certs / f"supernode-{REGISTERED}.key"),
                          ("intruder-keyless", None)):  # fmt: skip
            d.start_device(0, REGISTERED, name=name, key=key)  # refused before any task
        d.wait_online(REGISTERED)
        yield d
    finally:
        left = d.stop()
    assert left == []
    assert processes_mentioning(str(root)) == []


def test_unregistered_and_keyless_supernodes_are_refused(tls_deployment) -> None:
    # Prepare
    d = tls_deployment
    reasons = {
        "intruder-unregistered": "Failed to activate SuperNode",
        "intruder-keyless": "All SuperNodes must be registered via the CLI",
    }

    # Execute
    codes = {name: d.procs[name].wait(timeout=90) for name in reasons}
    nodes = d.nodes()

    # Assert: both exited with SUPERNODE_CONNECTION_ERROR (305) and the SuperLink's reason ...
    assert codes == dict.fromkeys(reasons, 1)
    for name, reason in reasons.items():
        log = d.log(name)
        assert "Exit Code: 305" in log, log[-2000:]
        assert "Failed to initialize the connection to the SuperLink" in log, log[-2000:]
        assert reason in log, log[-2000:]
    # ... and the federation knows exactly the registered nodes, all online.
    assert sorted(n["node-id"] for n in nodes) == sorted(d.registered)
    assert {n["status"] for n in nodes} == {"online"}


@pytest.mark.slow
def test_tls_authenticated_process_isolated_federation_runs_two_rounds(tls_deployment) -> None:
    # Prepare
    d = tls_deployment
    config = tiny_run_config(
        d.root, "tls", **{"data.num-users": REGISTERED, "eval.secure-sums": True}
    )

    # Execute
    code, parents, clientapps = _finish_watching_apps(d.run(config), d, timeout=900)

    # Assert: both rounds aggregated all three registered devices, and only them.
    assert code == 0, d.log("flwr-run")[-3000:]
    summary = _check_summary(d.root / "tls", n_users=REGISTERED, n_rounds=2)
    assert all(row["released"] for row in summary["rounds"])
    # Unlabelled devices: the summary knows them by node, and each trained on its own import.
    assert {row["user"] for row in summary["clients"]} == {f"node-{n}" for n in d.registered}
    # The devices' held-out losses also came as the cohort's SecAgg+ sums, every round.
    for row in summary["rounds"]:
        cohort = row["cohort_losses"]
        assert cohort["devices"] == REGISTERED
        assert 0 < cohort["base_loss"] < 16 and 0 < cohort["personal_loss"] < 16
    for i in range(REGISTERED):
        with open_test_store(d.root / f"device{i}") as store:
            assert store.get_json("device")["rounds_trained"] == 2
            assert len(store.get_json("ledger")["events"]) == 2
            assert set(store.example_counts()) == {"import:chat"}
    assert not (d.root / "intruder-unregistered").exists()
    assert not (d.root / "intruder-keyless").exists()
    # The apps ran under the executors started beside the SuperLink and the SuperNodes (not
    # under the SuperLink or a SuperNode), and the ServerApp's log streamed back over TLS.
    assert parents["flwr-serverapp"] == {d.procs["serverapp"].pid}
    assert parents["flwr-clientapp"] == {d.procs[f"clientapp{i}"].pid for i in range(REGISTERED)}
    assert "fedpersona: strategy=" in d.log("flwr-run")
    # Each device's worker ran its side of both rounds' four SecAgg+ stages (training within
    # the masked-vector stage) and answered both evaluations.
    for i in range(REGISTERED):
        log = d.log(f"worker{i}")
        assert log.count(": secagg answered in") == 2 * 4, log[-2000:]
        assert log.count(": evaluate answered in") == 2, log[-2000:]
    # The ClientApp processes (the server's code) were given no passphrase, key file or store:
    # not in their environment or command line, not in their SuperNode's node config.
    from common.crypto import PASSPHRASE_ENV

    assert clientapps, "no ClientApp process was seen running"
    secrets = [PASSPHRASE_ENV, *(str(d.root / f"device{i}") for i in range(REGISTERED))]
    for pid, given in clientapps.items():
        assert not [s for s in secrets if s in given], (pid, given)
    for i in range(REGISTERED):
        supernode = " ".join(psutil.Process(d.procs[f"supernode{i}"].pid).cmdline())
        assert str(d.root / f"device{i}") not in supernode and "data-dir" not in supernode


# ---- a SuperNode lost in the middle of a SecAgg+ round ---------------------------------------


def _kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid`` and its descendants at once (a device losing power); return the PIDs."""
    root = psutil.Process(pid)
    victims = [root, *root.children(recursive=True)]
    for proc in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=10)
    return [p.pid for p in victims]


@pytest.mark.slow
def test_secagg_round_completes_without_a_device_killed_mid_round(tmp_path) -> None:
    # Prepare: 3 SuperNodes, SecAgg+ (the default), m_min = 2. A stage waits for a lost node
    # until `secagg.timeout` or until the SuperLink marks it offline (<= 2 heartbeats, 60 s),
    # whichever comes first; 120 s leaves slow (loaded) machines time for a healthy stage.
    d = LocalDeployment(tmp_path, federation="deploy")
    victim = 1
    config = tiny_run_config(
        tmp_path,
        "dropout",
        **{
            # 0: the ServerApp sizes the round from the nodes online when it starts.
            "data.num-users": 0,
            "dp.min-clients": 2,
            "secagg.timeout": 120.0,
            "round-timeout": 120,
        },
    )
    try:
        d.start_superlink()
        for i in range(3):  # as deployed: executor beside the SuperNode, and a device worker
            d.start_device(i, 3, isolation="process", worker=True)
        d.wait_online(3)
        run = d.run(config)

        # Execute: SIGKILL the victim once it has the round-1 masked-vector (training) message,
        # the 3rd SecAgg+ stage: setup and key sharing are done, its update is not sent.
        deadline = time.monotonic() + 300
        while d.log(f"supernode{victim}").count("Receiving: train message") < 3:
            assert run.poll() is None, d.log("flwr-run")[-3000:]
            assert time.monotonic() < deadline, d.log(f"supernode{victim}")[-3000:]
            time.sleep(0.2)
        # The whole device goes: SuperNode, ClientApp executor (and its ClientApp), worker.
        killed = [
            pid
            for name in (f"supernode{victim}", f"clientapp{victim}", f"worker{victim}")
            for pid in _kill_tree(d.procs[name].pid)
        ]
        code = _finish(run, d, timeout=480)
    finally:
        left = d.stop()

    # Assert: both rounds released with the two survivors' updates.
    assert killed and all(not psutil.pid_exists(p) for p in killed)
    assert code == 0, d.log("flwr-run")[-3000:]
    summary = json.loads((tmp_path / "dropout" / "summary.json").read_text())
    rounds = summary["rounds"]
    assert [r["updates"] for r in rounds] == [2, 2], rounds
    assert [r["released"] for r in rounds] == [True, True], rounds
    assert [r["evaluated"] for r in rounds] == [2, 2], rounds
    assert len(summary["clients"]) == 2
    for i in (0, 2):
        with open_test_store(tmp_path / f"device{i}") as store:
            assert store.get_json("device")["rounds_trained"] == 2
            assert len(store.get_json("ledger")["events"]) == 2
    # The victim never completed a round.
    if (tmp_path / f"device{victim}").exists():
        with open_test_store(tmp_path / f"device{victim}") as store:
            assert (store.get_json("device") or {}).get("rounds_trained", 0) == 0
    assert left == []
    assert processes_mentioning(str(tmp_path)) == []
