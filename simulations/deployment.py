"""A Flower deployment on this machine, as real processes on 127.0.0.1.

One SuperLink, SuperNodes each with its own encrypted device store, optionally their ClientApp
executors (``--isolation process``) and device workers, TLS + SuperNode authentication when
given ``scripts/make_certs.py`` output, and ``flwr`` runs against it. The integration and
deployment tests and ``benchmarks/isolation.py`` share it::

    with LocalDeployment(root) as d:
        d.start_superlink()
        for i in range(2):
            d.start_device(i, 2)
        d.wait_online(2)
        d.flwr("run", PROJECT_DIR, d.federation, "--stream", "--run-config",
               d.write_run_config(tiny_run_config(root, "run")))

Every process gets its own session (its children share its process group), a log file
``<root>/<name>.log`` and a tag in its environment; :meth:`LocalDeployment.stop` ends them by
PID and kills (and reports) any tagged process left behind, e.g. the children of a node
killed with SIGKILL.

(One file on purpose, over the usual length: one class drives real processes of every kind
(SuperLink, SuperNodes, ClientApp executors, workers, `flwr`) under one PID and process-group
discipline; splitting it would split that cleanup.)
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from client.store import key_beside
from common.flower_env import flower_env
from common.supervise import free_port
from simulations.simulate import (
    PROJECT_DIR,
    _toml_value,
    _wait_port,
    stop_process_tree,
)

BIN = Path(sys.executable).parent
TAG_ENV = "FEDPERSONA_LOCAL_DEPLOYMENT"


def device_key(data_dir: Path) -> Path:
    """A 0600 key file beside ``data_dir`` (created once), as a real device keeps one."""
    return key_beside(data_dir, create=True)


# What the test devices' owners accept beyond the defaults: a federation of 2 or 3 devices,
# and their per-device held-out losses sent to the server (the tests read them).
TEST_POLICY = ("--min-cohort", "2", "--share-losses")


def tiny_run_config(out: Path, name: str, **overrides: Any) -> dict[str, Any]:
    """The tiny-model run config of the deployment tests and benchmark, writing to
    ``out/name`` (2 rounds, SecAgg+ on as by default)."""
    return {
        "model.name": "tiny",
        "num-server-rounds": 2,
        "data.max-seq-len": 48,
        "data.max-test-samples": 4,
        "train.local-steps": 4,
        "train.batch-size": 2,
        "train.learning-rate": 0.05,
        "dp.clip-norm": 0.005,
        # What real devices accept by default: at most half of a cohort honest (with 2
        # devices, each share is then the whole of σC).
        "dp.honest-fraction": 0.5,
        "round-timeout": 300,
        "output.dir": str(out),
        "output.run-name": name,
        **overrides,
    }


def processes_mentioning(text: str) -> list[str]:
    """Command lines of the processes (other than this one) that mention ``text``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if text in cmd and proc.pid != os.getpid():
            found.append(cmd[:200])
    return found


class LocalDeployment:
    """The processes of one deployment under ``root``, with a ``flwr`` connection to it.

    Args:
        root: Folder for logs, the SuperLink database, device stores and run outputs.
        ca: The CA certificate (TLS); ``None`` for an insecure deployment.
        federation: The federation's name in the ``flwr`` configuration written here.
    """

    def __init__(self, root: Path, *, ca: Path | None = None, federation: str = "local") -> None:
        self.root = Path(root)
        self.ca = ca
        self.federation = federation
        self.port = free_port()
        self.tag = uuid.uuid4().hex
        self.procs: dict[str, subprocess.Popen] = {}
        self.workers: dict[Path, subprocess.Popen] = {}  # socket -> device worker
        self._logs = contextlib.ExitStack()
        flwr_home = self.root / "flwr-home"
        flwr_home.mkdir(parents=True)
        tls = f'root-certificates = "{ca}"\n' if ca else "insecure = true\n"
        (flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{federation}"\n\n[superlink.{federation}]\n'
            f'address = "127.0.0.1:{self.port}"\n{tls}'
        )
        self.env = {**flower_env(flwr_home), TAG_ENV: self.tag}

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- processes ------------------------------------------------------------------------

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

    def start_superlink(
        self, *, certs: Path | None = None, isolation: str = "subprocess"
    ) -> subprocess.Popen:
        """The SuperLink (TLS + SuperNode auth with ``certs``), once its port is open."""
        cmd: list[str | Path] = [
            BIN / "flower-superlink",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--database", self.root / "superlink.db",
            "--isolation", isolation,
            "--disable-runtime-dependency-installation",
        ]  # fmt: skip
        if certs is None:
            cmd.append("--insecure")
        else:
            cmd += [
                "--ssl-ca-certfile", certs / "ca.crt",
                "--ssl-certfile", certs / "server.pem",
                "--ssl-keyfile", certs / "server.key",
                "--enable-supernode-auth",
                "--superexec-auth-secret-file", certs / "superexec.secret",
            ]  # fmt: skip
        proc = self.start("superlink", cmd)
        _wait_port(self.port, proc)
        return proc

    def start_device(
        self,
        partition: int,
        partitions: int,
        *,
        name: str | None = None,
        isolation: str = "subprocess",
        key: Path | None = None,
        worker: bool = False,
        label: bool = True,
        policy: Sequence[str] = TEST_POLICY,
    ) -> Path:
        """A device: SuperNode ``supernode<i>`` with its store in ``<root>/device<i>``, plus its
        ClientApp executor ``clientapp<i>`` (``isolation="process"``) and its device worker
        ``worker<i>`` (``worker=True``; :meth:`wait_online` waits until it answers). With a
        worker, only the worker is told the store and its key; the SuperNode's node config
        (what its ClientApps see) names the worker's socket only. Its owner's
        writing is imported first (:meth:`import_writing`). ``label`` puts ``partition-id`` in
        the node config, for the server's summary rows (a real device has none). ``name``
        replaces ``supernode<i>`` and ``device<i>`` and skips the import (an intruder's).
        ``policy``: the owner's ``fedpersona device privacy set`` options. Returns the store."""
        if name is None:
            name, data_dir = f"supernode{partition}", self.root / f"device{partition}"
            worker_name, executor_name = f"worker{partition}", f"clientapp{partition}"
            self.import_writing(data_dir, partition, partitions, policy=policy)
        else:
            data_dir, worker_name, executor_name = self.root / name, f"{name}-worker", f"{name}-app"
        unlock: list[str | Path] = ["--data-dir", data_dir, "--key-file", device_key(data_dir)]
        if worker:  # the worker alone unlocks the store; the ClientApps get its socket only
            from client.federation.worker import SOCKET_KEY

            sock = self.root / f"{worker_name}.sock"
            worker_cmd = [BIN / "fedpersona", "device", "worker", "--socket", sock, *unlock]
            self.workers[sock] = self.start(worker_name, worker_cmd)
            node_config = f'{SOCKET_KEY}="{sock}"'
        else:  # the ClientApp process opens the store itself
            node_config = f'data-dir="{data_dir}" key-file="{device_key(data_dir)}"'
        if label:
            node_config = f"partition-id={partition} num-partitions={partitions} " + node_config
        runtime_port = free_port()
        cmd: list[str | Path] = [
            BIN / "flower-supernode",
            "--superlink", f"127.0.0.1:{self.port}",
            "--host", "127.0.0.1",
            "--port", str(runtime_port),
            "--isolation", isolation,
            "--node-config", node_config,
        ]  # fmt: skip
        cmd += ["--root-certificates", self.ca] if self.ca else ["--insecure"]
        if key is not None:
            cmd += ["--auth-supernode-private-key", key]
        self.start(name, cmd)
        if isolation == "process":
            self.start(
                executor_name,
                [BIN / "flower-superexec", "--runtime-api-address", f"127.0.0.1:{runtime_port}",
                 "--insecure"],
            )  # fmt: skip
        return data_dir

    def import_writing(
        self,
        data_dir: Path,
        partition: int,
        partitions: int,
        *,
        policy: Sequence[str] = TEST_POLICY,
    ) -> Path:
        """What a device's owner does first: ``fedpersona device init``, then ``fedpersona
        device import`` of their writing — here the turns of the Shakespeare role ``partition``
        picks (default data settings), as a chat JSONL file, removed once imported — and
        ``fedpersona device privacy set`` with ``policy``. Skipped if the store exists already
        (a restarted device)."""
        from client.federation.simulated import simulated_user
        from client.store import LocalStore
        from common.config import parse_run_config

        if LocalStore.exists(data_dir):
            return data_dir
        user = simulated_user(parse_run_config({}), partition, partitions)
        writing = self.root / f"{data_dir.name}-writing.jsonl"
        writing.write_text(
            "".join(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": s.prompt},
                            {"role": "assistant", "content": s.reply},
                        ]
                    }
                )
                + "\n"
                for s in (*user.train, *user.test)
            )
        )
        unlock = ["--data-dir", str(data_dir), "--key-file", str(device_key(data_dir))]
        try:
            steps = (
                ["init", "--model", "tiny"],
                ["import", str(writing)],
                ["privacy", "set", *policy],
            )
            for args in steps:
                done = subprocess.run(
                    [str(BIN / "fedpersona"), "device", *args, *unlock],
                    env=self.env,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                if done.returncode != 0:
                    raise RuntimeError(f"fedpersona device {args[0]}: {done.stdout}{done.stderr}")
        finally:
            writing.unlink(missing_ok=True)
        return data_dir

    @staticmethod
    def wait_worker(sock: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
        """Wait until the device worker ``proc`` answers a ping on ``sock``."""
        from client.federation.worker import ping

        deadline = time.monotonic() + timeout
        while not ping(sock):
            if proc.poll() is not None:
                raise RuntimeError(f"the device worker for {sock} exited {proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no device worker answers on {sock} after {timeout:.0f} s")
            time.sleep(0.5)

    def log(self, name: str) -> str:
        """What process ``name`` printed so far."""
        return (self.root / f"{name}.log").read_text(errors="replace")

    def stop(self) -> list[str]:
        """Stop every process by PID (newest first); return the command lines still alive."""
        for proc in reversed(list(self.procs.values())):
            stop_process_tree(proc)
        self._logs.close()
        left = []
        for proc in self._tagged():  # reparented strays, e.g. a killed node's children
            with contextlib.suppress(psutil.Error):
                left.append(" ".join(proc.cmdline())[:200])
                proc.kill()
        return left

    def _tagged(self) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if proc.pid != os.getpid() and proc.environ().get(TAG_ENV) == self.tag:
                    found.append(proc)
        return found

    def children_running(self, program: str) -> dict[int, int]:
        """``{pid: parent pid}`` of this deployment's processes running ``program`` (a fork of
        one such process, not yet exec'd into something else, is not another one)."""
        found = {}
        for proc in self._tagged():
            with contextlib.suppress(psutil.Error):
                cmdline = proc.cmdline()
                if len(cmdline) > 1 and Path(cmdline[1]).name == program:
                    found[proc.pid] = proc.ppid()
        return {pid: parent for pid, parent in found.items() if parent not in found}

    # ---- the flwr CLI ---------------------------------------------------------------------

    def flwr(self, *args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this deployment (from the project folder)."""
        return subprocess.run(
            [str(BIN / "flwr"), *map(str, args)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=PROJECT_DIR,
        )

    def nodes(self) -> list[dict[str, Any]]:
        """``flwr supernode list``: the SuperLink's view of its SuperNodes."""
        res = self.flwr("supernode", "list", self.federation, "--format", "json", timeout=120)
        if res.returncode != 0 or "{" not in res.stdout:
            raise RuntimeError(f"flwr supernode list failed: {res.stdout + res.stderr}")
        return list(_json_out(res.stdout)["nodes"])

    def register(self, public_key: Path) -> str:
        """``flwr supernode register``: the new node's ID."""
        res = self.flwr(
            "supernode", "register", public_key, self.federation, "--format", "json", timeout=120
        )
        if res.returncode != 0:
            raise RuntimeError(f"flwr supernode register failed: {res.stdout + res.stderr}")
        return str(_json_out(res.stdout)["node-id"])

    def wait_online(self, count: int, timeout: float = 120) -> list[str]:
        """Wait until ``count`` SuperNodes are online and every device worker answers;
        return the SuperNodes' IDs."""
        for sock, proc in self.workers.items():
            self.wait_worker(sock, proc)
        deadline = time.monotonic() + timeout
        online: list[str] = []
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):  # the SuperLink may still be starting
                online = [n["node-id"] for n in self.nodes() if n["status"] == "online"]
            if len(online) >= count:
                return online
            time.sleep(1)
        raise TimeoutError(f"{len(online)} of {count} SuperNodes online after {timeout:.0f} s")

    def write_run_config(self, config: dict[str, Any], name: str = "run-config") -> Path:
        """``config`` as a TOML file under ``root`` (for ``flwr run --run-config``)."""
        path = self.root / f"{name}.toml"
        path.write_text("".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in config.items()))
        return path

    def run(self, config: dict[str, Any]) -> subprocess.Popen:
        """Start ``flwr run PROJECT_DIR <federation> --stream`` as process ``flwr-run``."""
        path = self.write_run_config(config)
        return self.start(
            "flwr-run",
            [BIN / "flwr", "run", PROJECT_DIR, self.federation, "--stream", "--run-config", path],
            cwd=PROJECT_DIR,
        )


def _json_out(text: str) -> dict[str, Any]:
    """The JSON object in a ``flwr … --format json`` output (which may have a banner)."""
    return json.loads(text[text.index("{") : text.rindex("}") + 1])
