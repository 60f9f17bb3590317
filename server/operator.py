"""The operator's side of a real federation, one folder and one command each.

``fedpersona server init|start|devices|run|status`` work on one federation folder
(``--dir``, default ``./federation``):

=====================  ==================================================================
``certs/``             ``ca.crt`` (hand it to every device), ``ca.key`` (keep it offline),
                       ``server.pem``/``server.key`` (the SuperLink's TLS certificate for the
                       host names given to ``init``), ``superexec.secret`` (the SuperLink
                       and its ServerApp executor only) — :mod:`common.keys`
``state/``             the SuperLink's database: runs, registered devices, messages
``flwr/config.toml``   the ``flwr`` CLI's connection (``FLWR_HOME``): the federation
                       ``fedpersona`` at ``127.0.0.1:<port>`` over TLS
``runs/``              each run's outputs (``summary.json``, checkpoint, released rounds)
``server.log``         everything ``start`` runs prints; ``server.json`` its port and pids
=====================  ==================================================================

``start`` runs the SuperLink (TLS, node authentication, the database, a health endpoint) and
its ServerApp executor (holding the shared secret) as one :class:`common.supervise.Supervisor`
service. The SuperLink serves the Fleet API (devices), the Control API (``flwr``: runs and
registrations) and the Runtime API (executors) on one port, and open-source Flower
authenticates nobody on the Control API: ``start`` binds 127.0.0.1 unless told otherwise, and
docs/deploy.md says how to publish only the Fleet API to devices.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import RUNS_DIR_ENV
from common.flower_env import BIN, flower_env
from common.keys import SUPEREXEC_SECRET, make_certs
from common.supervise import Child, free_port, port_open

PROJECT_DIR = Path(__file__).resolve().parents[1]  # the Flower app `flwr run` packs
FEDERATION = "fedpersona"
DEFAULT_PORT = 8000
STATE_FILE = "server.json"
LOG_FILE = "server.log"


class OperatorError(RuntimeError):
    """A server command cannot do what it was asked (the message says why and what to do)."""


@dataclass(frozen=True)
class FederationDir:
    """The paths of one federation folder (module docstring)."""

    root: Path

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def ca(self) -> Path:
        return self.certs / "ca.crt"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def env(self) -> dict[str, str]:
        """The environment every Flower process and ``flwr`` call here runs with."""
        return flower_env(self.flwr_home)

    def require_init(self) -> None:
        """Raises :class:`OperatorError` unless ``init`` wrote the key material here."""
        missing = [
            n
            for n in ("ca.crt", "server.pem", "server.key", SUPEREXEC_SECRET)
            if not (self.certs / n).is_file()
        ]
        if missing:
            raise OperatorError(
                f"{self.certs} lacks {', '.join(missing)}: run `fedpersona server init --dir "
                f"{self.root} --host YOUR.HOST.NAME` first"
            )


# ---- init -------------------------------------------------------------------------------


def init(fed: FederationDir, *, hosts: Sequence[str], days: int = 365) -> list[Path]:
    """The federation's key material (no device keys: devices make their own).

    Raises:
        OperatorError: If key material is there already (nothing is overwritten).
    """
    try:
        files = make_certs(fed.certs, nodes=0, hosts=hosts, days=days)
    except FileExistsError as err:
        raise OperatorError(str(err).replace("--force", "a new --dir")) from None
    for folder in (fed.root / "state", fed.runs):
        folder.mkdir(parents=True, exist_ok=True)
    return [files.ca_cert, files.server_cert, files.server_key, files.superexec_secret]


# ---- start ------------------------------------------------------------------------------


def port_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound now."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def write_flwr_config(fed: FederationDir, port: int) -> None:
    """``flwr``'s connection to this SuperLink, over TLS with the federation's CA."""
    fed.flwr_home.mkdir(parents=True, exist_ok=True)
    (fed.flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{fed.ca}"\n'
    )


def service(fed: FederationDir, *, host: str, port: int) -> list[Child]:
    """The SuperLink and its ServerApp executor, in start order.

    Raises:
        OperatorError: Not initialised, or the port is taken.
    """
    fed.require_init()
    if not port_free(host, port):
        raise OperatorError(
            f"port {port} on {host} is in use: is a server already running here? choose "
            "another with --port"
        )
    (fed.root / "state").mkdir(parents=True, exist_ok=True)
    fed.runs.mkdir(parents=True, exist_ok=True)
    env, health = fed.env(), free_port()
    superlink = [
        str(BIN / "flower-superlink"),
        "--ssl-ca-certfile", str(fed.ca),
        "--ssl-certfile", str(fed.certs / "server.pem"),
        "--ssl-keyfile", str(fed.certs / "server.key"),
        "--enable-supernode-auth",
        "--isolation", "process",
        "--superexec-auth-secret-file", str(fed.certs / SUPEREXEC_SECRET),
        "--host", host, "--port", str(port),
        "--database", str(fed.root / "state" / "superlink.db"),
        "--health-server-address", f"127.0.0.1:{health}",
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    executor = [
        str(BIN / "flower-superexec"),
        "--runtime-api-address", f"127.0.0.1:{port}",
        "--root-certificates", str(fed.ca),
        "--superexec-auth-secret-file", str(fed.certs / SUPEREXEC_SECRET),
    ]  # fmt: skip
    return [
        Child("superlink", superlink, env=env, ready=lambda: port_open(port, host)),
        # Its ServerApps put their runs here unless a run config names another output.dir.
        Child("serverapp-executor", executor, env={**env, RUNS_DIR_ENV: str(fed.runs)}),
    ]


def write_state(fed: FederationDir, host: str, port: int, processes: dict[str, Any]) -> None:
    """``server.json``: the address and the service's processes."""
    state = {"host": host, "port": port, "pid": os.getpid(), "processes": processes}
    (fed.root / STATE_FILE).write_text(json.dumps(state, indent=1))


# ---- devices and runs (the flwr CLI against the running SuperLink) ------------------------


def connect(fed: FederationDir) -> dict[str, str]:
    """The environment for ``flwr`` against the server ``start`` runs on this folder: its
    connection written afresh (the port from ``server.json``, the CA's path as seen from here:
    the folder may be a container's, mounted elsewhere).

    Raises:
        OperatorError: Not initialised, or no server was started here.
    """
    fed.require_init()
    try:
        port = int(json.loads((fed.root / STATE_FILE).read_text())["port"])
    except (OSError, ValueError, KeyError, TypeError):
        raise OperatorError(
            f"no server was started in {fed.root}: run `fedpersona server start`"
        ) from None
    write_flwr_config(fed, port)
    return fed.env()


def flwr(fed: FederationDir, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``flwr ARGS`` against this federation (from the project folder).

    Raises:
        OperatorError: The server is not running here, or ``flwr`` failed (its message).
    """
    env = connect(fed)
    try:
        done = subprocess.run(
            [str(BIN / "flwr"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=PROJECT_DIR,
        )
    except subprocess.TimeoutExpired:
        raise OperatorError(f"`flwr {args[0]}` did not answer in {timeout:.0f} s") from None
    if done.returncode != 0:
        text = (done.stdout + done.stderr).strip().splitlines()
        raise OperatorError(
            f"`flwr {' '.join(args[:2])}` failed: {text[-1] if text else done.returncode} "
            "(is `fedpersona server start` running?)"
        )
    return done


def _json_out(text: str) -> dict[str, Any]:
    """The JSON object ``flwr --format json`` printed (after any log lines)."""
    start = text.index("{")
    return dict(json.loads(text[start:]))


def add_device(fed: FederationDir, public_key: Path) -> str:
    """Register a device's public key; return its node id.

    Raises:
        OperatorError: No such file, or ``flwr`` refused it.
    """
    if not public_key.is_file():
        raise OperatorError(f"no public key at {public_key} (the device's node.key.pub)")
    done = flwr(fed, "supernode", "register", str(public_key), FEDERATION, "--format", "json")
    return str(_json_out(done.stdout)["node-id"])


def list_devices(fed: FederationDir) -> list[dict[str, Any]]:
    """The registered devices: node id, status (online / offline / registered), times."""
    done = flwr(fed, "supernode", "list", FEDERATION, "--format", "json")
    return list(_json_out(done.stdout).get("nodes", []))


def remove_device(fed: FederationDir, node_id: str) -> None:
    """Revoke a device: its key no longer connects."""
    flwr(fed, "supernode", "unregister", node_id, FEDERATION)


def run_config_file(fed: FederationDir, run_config: Path | None) -> Path:
    """A run config for ``flwr run``: ``run_config``'s keys (a file in the federation folder;
    the caller's is not changed). Without ``output.dir``, the server's ServerApps write to
    its ``<dir>/runs``.

    Raises:
        OperatorError: The file is missing or not TOML.
    """
    import tomllib

    keys: dict[str, Any] = {}
    if run_config is not None:
        try:
            keys = tomllib.loads(run_config.read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise OperatorError(f"cannot read the run config {run_config}: {err}") from None
    fd, name = tempfile.mkstemp(prefix="run-config-", suffix=".toml", dir=fed.root)
    with os.fdopen(fd, "w") as handle:
        for key, value in keys.items():
            handle.write(f'"{key}" = {json.dumps(value)}\n')
    return Path(name)


# ---- status -----------------------------------------------------------------------------


def run_status(run_dir: Path) -> dict[str, Any] | None:
    """One run's rounds released and discarded, cohort sizes and ε so far: from its summary
    when it finished, else from its checkpoint. ``None`` if it has neither yet."""
    from server import checkpoint

    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        rounds, finished = summary.get("rounds", []), True
    else:
        try:
            state = checkpoint.load(run_dir)
        except checkpoint.CheckpointError as err:
            return {"run": run_dir.name, "error": str(err)}
        if state is None:
            return None
        rounds, finished = state.rounds, False
    released = [r for r in rounds if r.get("released")]
    return {
        "run": run_dir.name,
        "finished": finished,
        "rounds": len(rounds),
        "released": len(released),
        "discarded": len(rounds) - len(released),
        "cohorts": [int(r.get("updates", 0)) for r in rounds],
        "user_epsilon": max((float(r.get("user_epsilon", 0.0)) for r in rounds), default=0.0),
    }


def status(fed: FederationDir) -> dict[str, Any]:
    """The service (running or not), and every run's status under ``<dir>/runs``."""
    state: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        state = json.loads((fed.root / STATE_FILE).read_text())
    # Running: the SuperLink answers where `start` bound it (a pid alone would not do: the
    # folder may be a container's, whose pids are not this host's).
    port = state.get("port")
    running = isinstance(port, int) and port_open(port, str(state.get("host", "127.0.0.1")))
    runs = []
    if fed.runs.is_dir():
        for run_dir in sorted(p for p in fed.runs.iterdir() if p.is_dir()):
            row = run_status(run_dir)
            if row is not None:
                runs.append(row)
    return {"running": running, "port": state.get("port"), "runs": runs}
