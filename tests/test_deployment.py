"""The deployment of docker-compose.yml and deploy/k8s, on real processes on 127.0.0.1.

* TLS + SuperNode authentication + isolation ``process``: a SuperLink with
  ``--enable-supernode-auth`` and its ServerApp executor (``flower-superexec`` holding the
  shared SuperExec secret); three SuperNodes registered with ``flwr supernode register``, each
  with its own long-lived ClientApp executor; ``flwr run`` over TLS; two SecAgg+ rounds.
* Refusal: a SuperNode with an unregistered key and one with no key are turned away (Flower
  exit code 305, the SuperLink's reason in their log) and never counted by the federation.
* Dropout: with SecAgg+ on, one of three SuperNodes is SIGKILLed in the middle of round 1's
  training stage; round 1 completes with the two survivors and round 2 runs with them.

Every process is started in its own session, tagged through its environment, stopped by PID,
and the tests check that none is left. Tiny model; the module takes about four minutes on
two cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from simulations.simulate import (
    PROJECT_DIR,
    _free_port,
    _toml_value,
    _wait_port,
    stop_process_tree,
)
from tests.conftest import device_key, open_test_store
from tests.test_integration import BIN, _check_summary, _processes_mentioning

# Opt-in (minutes of real processes with a fresh ClientApp process per message):
#   pytest -m deployment tests/test_deployment.py
pytestmark = [pytest.mark.integration, pytest.mark.deployment]
MAKE_CERTS = PROJECT_DIR / "scripts" / "make_certs.py"
TAG_ENV = "FEDPERSONA_TEST_DEPLOYMENT"
REGISTERED = 3


# ---- a deployment on this machine -----------------------------------------------------------


def _tagged(tag: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``tag`` (every child inherits it)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error):
            if proc.pid != os.getpid() and proc.environ().get(TAG_ENV) == tag:
                found.append(proc)
    return found


def _json_out(text: str) -> dict[str, Any]:
    """The JSON object in a ``flwr ... --format json`` output."""
    return json.loads(text[text.index("{") : text.rindex("}") + 1])


class Deployment:
    """The processes of one deployment under ``root``, with a ``flwr`` connection to it.

    Each process gets a log file ``<root>/<name>.log``, its own session (so its children share
    its process group) and the environment tag; :meth:`stop` ends them all by PID and returns
    what was still alive afterwards.
    """

    def __init__(self, root: Path, port: int, *, ca: Path | None) -> None:
        self.root = root
        self.port = port
        self.tag = uuid.uuid4().hex
        self.procs: dict[str, subprocess.Popen] = {}
        self.registered: list[str] = []  # node IDs from `flwr supernode register`
        self._logs = contextlib.ExitStack()
        flwr_home = root / "flwr-home"
        flwr_home.mkdir(parents=True)
        tls = f'root-certificates = "{ca}"\n' if ca else "insecure = true\n"
        (flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n'
            f'address = "127.0.0.1:{port}"\n{tls}'
        )
        self.env = {
            **os.environ,
            # The SuperLink, SuperNodes and executors start Flower's CLIs by name.
            "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            TAG_ENV: self.tag,
        }

    def start(
        self, name: str, cmd: list[str | Path], *, cwd: Path | None = None
    ) -> subprocess.Popen:
        """Start ``cmd`` as process ``name``, its output in ``<root>/<name>.log``."""
        log = self._logs.enter_context(open(self.root / f"{name}.log", "w"))  # noqa: SIM115
        proc = subprocess.Popen(
            [str(c) for c in cmd],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=cwd or self.root,
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        """What process ``name`` printed so far."""
        return (self.root / f"{name}.log").read_text(errors="replace")

    def flwr(self, *args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this deployment."""
        return subprocess.run(
            [str(BIN / "flwr"), *map(str, args)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
        )

    def nodes(self) -> list[dict[str, Any]]:
        """``flwr supernode list``: the SuperLink's view of its SuperNodes."""
        res = self.flwr("supernode", "list", "deploy", "--format", "json")
        assert res.returncode == 0, res.stdout + res.stderr
        return list(_json_out(res.stdout)["nodes"])

    def wait_online(self, count: int, timeout: float = 120) -> list[str]:
        """Wait until ``count`` SuperNodes are online; return their node IDs."""
        deadline = time.monotonic() + timeout
        online: list[str] = []
        while time.monotonic() < deadline:
            online = [n["node-id"] for n in self.nodes() if n["status"] == "online"]
            if len(online) >= count:
                return online
            time.sleep(1)
        raise TimeoutError(f"{len(online)} of {count} SuperNodes online after {timeout:.0f} s")

    def run(self, run_config: dict[str, Any]) -> subprocess.Popen:
        """Start ``flwr run PROJECT_DIR deploy --stream`` with ``run_config``."""
        path = self.root / "run-config.toml"
        path.write_text(
            "".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in run_config.items())
        )
        return self.start(
            "flwr-run",
            [BIN / "flwr", "run", PROJECT_DIR, "deploy", "--stream", "--run-config", path],
            cwd=PROJECT_DIR,
        )

    def stop(self) -> list[str]:
        """Stop every process by PID (newest first); return the command lines still alive."""
        for proc in reversed(list(self.procs.values())):
            stop_process_tree(proc)
        self._logs.close()
        left = []
        for proc in _tagged(self.tag):  # reparented strays, e.g. a killed node's children
            with contextlib.suppress(psutil.Error):
                left.append(" ".join(proc.cmdline())[:200])
                proc.kill()
        return left


def _superlink(d: Deployment, *, certs: Path | None, isolation: str) -> list[str | Path]:
    cmd: list[str | Path] = [
        BIN / "flower-superlink",
        "--host", "127.0.0.1",
        "--port", str(d.port),
        "--database", d.root / "superlink.db",
        "--isolation", isolation,
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    if certs is None:
        return [*cmd, "--insecure"]
    return [
        *cmd,
        "--ssl-ca-certfile", certs / "ca.crt",
        "--ssl-certfile", certs / "server.pem",
        "--ssl-keyfile", certs / "server.key",
        "--enable-supernode-auth",
        "--superexec-auth-secret-file", certs / "superexec.secret",
    ]  # fmt: skip


def _supernode(
    d: Deployment,
    partition: int,
    partitions: int,
    *,
    runtime_port: int,
    isolation: str,
    ca: Path | None,
    key: Path | None,
    data_dir: Path,
) -> list[str | Path]:
    node_config = (
        f'partition-id={partition} num-partitions={partitions} data-dir="{data_dir}" '
        f'key-file="{device_key(data_dir)}"'
    )
    cmd: list[str | Path] = [
        BIN / "flower-supernode",
        "--superlink", f"127.0.0.1:{d.port}",
        "--host", "127.0.0.1",
        "--port", str(runtime_port),
        "--isolation", isolation,
        "--node-config", node_config,
    ]  # fmt: skip
    cmd += ["--root-certificates", ca] if ca else ["--insecure"]
    if key is not None:
        cmd += ["--auth-supernode-private-key", key]
    return cmd


def _run_config(root: Path, name: str, **overrides: Any) -> dict[str, Any]:
    """The tiny run config of the integration tests, writing to ``root/name``."""
    return {
        "model.name": "tiny",
        "num-server-rounds": 2,
        "data.max-seq-len": 48,
        "data.max-test-samples": 4,
        "train.local-steps": 4,
        "train.batch-size": 2,
        "train.learning-rate": 0.05,
        "dp.clip-norm": 0.005,
        "round-timeout": 300,
        "output.dir": str(root),
        "output.run-name": name,
        **overrides,
    }


def _finish(proc: subprocess.Popen, d: Deployment, timeout: float) -> int:
    """Wait for ``flwr run``; on a timeout, fail with the ends of the logs."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        tails = {n: d.log(n)[-1500:] for n in d.procs}
        pytest.fail(f"flwr run did not finish in {timeout:.0f} s:\n{json.dumps(tails, indent=1)}")


def _finish_watching_apps(
    proc: subprocess.Popen, d: Deployment, timeout: float
) -> tuple[int, dict[str, set[int]]]:
    """Wait for ``flwr run`` like :func:`_finish`, noting meanwhile which processes start
    ``flwr-serverapp`` and ``flwr-clientapp`` (their parents' PIDs)."""
    parents: dict[str, set[int]] = {"flwr-serverapp": set(), "flwr-clientapp": set()}
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        for child in _tagged(d.tag):
            with contextlib.suppress(psutil.Error):
                program = Path(child.cmdline()[1]).name if len(child.cmdline()) > 1 else ""
                if program in parents:
                    parents[program].add(child.ppid())
        time.sleep(0.5)
    return _finish(proc, d, timeout=max(1.0, deadline - time.monotonic())), parents


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
def tls_deployment(tmp_path_factory, certs) -> Iterator[Deployment]:
    """SuperLink (TLS, auth, process isolation) + ServerApp executor + 3 registered SuperNodes
    with their ClientApp executors + 2 intruders; yields once the 3 are online."""
    root = tmp_path_factory.mktemp("tls")
    d = Deployment(root, _free_port(), ca=certs / "ca.crt")
    try:
        _wait_port(d.port, d.start("superlink", _superlink(d, certs=certs, isolation="process")))
        d.start(
            "serverapp",
            [
                BIN / "flower-superexec",
                "--runtime-api-address", f"127.0.0.1:{d.port}",
                "--root-certificates", certs / "ca.crt",
                "--superexec-auth-secret-file", certs / "superexec.secret",
            ],
        )  # fmt: skip
        for i in range(REGISTERED):
            res = d.flwr("supernode", "register", certs / f"supernode-{i}.pub", "deploy",
                         "--format", "json")  # fmt: skip
            assert res.returncode == 0, res.stdout + res.stderr
            d.registered.append(str(_json_out(res.stdout)["node-id"]))
        for i in range(REGISTERED):
            runtime_port = _free_port()
            d.start(
                f"supernode{i}",
                _supernode(d, i, REGISTERED, runtime_port=runtime_port, isolation="process",
                           ca=certs / "ca.crt", key=certs / f"supernode-{i}.key",
                           data_dir=root / f"device{i}"),
            )  # fmt: skip
            d.start(
                f"clientapp{i}",
                [BIN / "flower-superexec", "--runtime-api-address",
                 f"127.0.0.1:{runtime_port}", "--insecure"],
            )  # fmt: skip
        # Intruders: a well-formed key the SuperLink was never told about, and no key at all.
        for name, key in (("intruder-unregistered", certs / f"supernode-{REGISTERED}.key"),
                          ("intruder-keyless", None)):  # fmt: skip
            d.start(
                name,
                _supernode(d, 0, REGISTERED, runtime_port=_free_port(), isolation="process",
                           ca=certs / "ca.crt", key=key, data_dir=root / name),
            )  # fmt: skip
        d.wait_online(REGISTERED)
        yield d
    finally:
        left = d.stop()
    assert left == []
    assert _processes_mentioning(str(root)) == []


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


def test_tls_authenticated_process_isolated_federation_runs_two_rounds(tls_deployment) -> None:
    # Prepare
    d = tls_deployment
    config = _run_config(d.root, "tls", **{"data.num-users": REGISTERED})

    # Execute
    code, parents = _finish_watching_apps(d.run(config), d, timeout=900)

    # Assert: both rounds aggregated all three registered devices, and only them.
    assert code == 0, d.log("flwr-run")[-3000:]
    summary = _check_summary(d.root / "tls", n_users=REGISTERED, n_rounds=2)
    assert all(row["released"] for row in summary["rounds"])
    for i in range(REGISTERED):
        with open_test_store(d.root / f"device{i}") as store:
            assert store.get_json("device")["rounds_trained"] == 2
            assert len(store.get_json("ledger")["events"]) == 2
    assert not (d.root / "intruder-unregistered").exists()
    assert not (d.root / "intruder-keyless").exists()
    # The apps ran under the executors started beside the SuperLink and the SuperNodes (not
    # under the SuperLink or a SuperNode), and the ServerApp's log streamed back over TLS.
    assert parents["flwr-serverapp"] == {d.procs["serverapp"].pid}
    assert parents["flwr-clientapp"] == {d.procs[f"clientapp{i}"].pid for i in range(REGISTERED)}
    assert "fedpersona: strategy=" in d.log("flwr-run")


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


def test_secagg_round_completes_without_a_supernode_killed_mid_round(tmp_path) -> None:
    # Prepare: 3 SuperNodes, SecAgg+ (the default), m_min = 2. A stage waits for a lost node
    # until `secagg.timeout` or until the SuperLink marks it offline (<= 2 heartbeats, 60 s),
    # whichever comes first; 120 s leaves slow (loaded) machines time for a healthy stage.
    d = Deployment(tmp_path, _free_port(), ca=None)
    victim = 1
    config = _run_config(
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
        _wait_port(d.port, d.start("superlink", _superlink(d, certs=None, isolation="subprocess")))
        for i in range(3):
            d.start(
                f"supernode{i}",
                _supernode(d, i, 3, runtime_port=_free_port(), isolation="subprocess", ca=None,
                           key=None, data_dir=tmp_path / f"device{i}"),
            )  # fmt: skip
        d.wait_online(3)
        run = d.run(config)

        # Execute: SIGKILL the victim once it has the round-1 masked-vector (training) message,
        # the 3rd SecAgg+ stage: setup and key sharing are done, its update is not sent.
        deadline = time.monotonic() + 300
        while d.log(f"supernode{victim}").count("Receiving: train message") < 3:
            assert run.poll() is None, d.log("flwr-run")[-3000:]
            assert time.monotonic() < deadline, d.log(f"supernode{victim}")[-3000:]
            time.sleep(0.2)
        killed = _kill_tree(d.procs[f"supernode{victim}"].pid)
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
    assert _processes_mentioning(str(tmp_path)) == []
