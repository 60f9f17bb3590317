"""``fedpersona device join``: this device in a federation, as one supervised service.

Three processes make a device's side of a federation (docs/deploy.md): the **device worker**
(the only one that unlocks the store; keeps the model loaded), the **SuperNode** (pulls the
federation's messages over TLS, authenticated by the device's own key) and its **ClientApp
executor** (runs each message's ClientApp, which relays to the worker).
:func:`join` runs them as one :class:`common.supervise.Supervisor` service:

* before anything starts, the address is reached and its TLS certificate checked against the
  federation's CA, so an unreachable server or a wrong CA is one clear line;
* the device's SuperNode key pair is made on the device the first time
  (``<data-dir>/node.key``, 0600, never printed; the public key ``node.key.pub`` is what the
  operator registers);
* a lock (``<data-dir>/join.lock``) keeps a second ``join`` off the same store;
* a child that dies is restarted with back-off; a SuperNode turned away for its key or
  certificate stops the service with the fix;
* one log, ``<data-dir>/join.log``; the service's state in ``<data-dir>/federation.json``
  (the federation's address, each process's pid and restarts) for ``device status``;
* the passphrase is handed to each worker start through a pipe (never the environment a
  process listing shows); the worker's socket lives in a private temporary folder (a Unix
  socket path is capped at 107 bytes), removed at the end with everything else.

A deployment that isolates the three (docker-compose.yml: the worker without a network, the
executor without the store) runs the same command once per part, ``--part worker|supernode|
clientapp-executor``, with a shared ``--run-dir`` for the worker's socket and a fixed
``--runtime-port`` between the SuperNode and its executor. A part keeps its own lock, log and
state file (``join-<part>.*``; the worker's are the device's own), and checks only what it
uses: the worker the store (it needs no network), the SuperNode the server and the key.

While it runs, a service with a SuperNode checks every :data:`PROBE_S` that the server still
answers (TLS with the federation's CA): ``device status`` says "connected" on a recent check.

(One file on purpose, over the usual length: the plan, the checks before anything starts and
the service they guard are one command, read top to bottom.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import ssl
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.federation.sandbox import problem as sandbox_problem
from client.federation.sandbox import sandboxed
from client.store import FEDERATION_FILES
from common.atomic import atomic_write_bytes
from common.crypto import PASSPHRASE_ENV, PASSPHRASE_FILE_ENV
from common.flower_env import BIN, flower_env
from common.keys import write_node_keys
from common.supervise import Child, Supervisor, free_port, pid_alive, port_open

NODE_KEY, _, JOIN_LOG, JOIN_LOCK, STATE_FILE = FEDERATION_FILES  # forgotten with the store
PARTS = ("worker", "supernode", "clientapp-executor")
CONNECT_TIMEOUT_S = 10.0
# How often a running service checks that the federation's server answers (TLS, its CA):
# `device status` says "connected" only on a check younger than three of these.
PROBE_S = 30.0
# The model loads in the worker before it answers (minutes on a slow disk).
WORKER_READY_S = 600.0
# What Flower's SuperNode prints when the SuperLink turns it away, and what that means here.
REFUSALS = (
    (
        "Failed to activate SuperNode",
        "the federation at {address} does not know this device's key: send {pub} to its "
        "operator (`fedpersona server devices add`), then run `fedpersona device join` again",
    ),
    (
        "All SuperNodes must be registered",
        "the federation at {address} admits registered devices only: send {pub} to its "
        "operator (`fedpersona server devices add`), then run `fedpersona device join` again",
    ),
    (
        "CERTIFICATE_VERIFY_FAILED",
        "the server at {address} is not certified by {ca}: get the federation's ca.crt from "
        "its operator and pass it with --ca",
    ),
)


class JoinError(RuntimeError):
    """The device cannot join (the message says why and what to do)."""


@dataclass(frozen=True)
class JoinPlan:
    """What ``fedpersona device join`` was asked.

    Attributes:
        address: The federation's SuperLink, ``host:port``.
        ca: The federation's CA certificate.
        data_dir: The device's store (``device init`` made it).
        key_file: The store's key file, if it has one (else the passphrase is piped).
        retention_days: The store's retention.
        num_partitions: The federation's size, if the operator said (the noise share).
        local_only_baseline: Let the worker train the local-only baseline when asked.
        part: Run only this one of :data:`PARTS` (``None``: all three).
        run_dir: The worker's socket folder (shared by the parts; default: a private
            temporary folder).
        runtime_port: The SuperNode's port for its executor (default: a free one).
    """

    address: str
    ca: Path | None
    data_dir: Path
    key_file: Path | None = None
    retention_days: float = 28.0
    num_partitions: int | None = None
    local_only_baseline: bool = False
    part: str | None = None
    run_dir: Path | None = None
    runtime_port: int | None = None

    def __post_init__(self) -> None:
        if self.part is not None and self.part not in PARTS:
            raise JoinError(f"--part {self.part!r}: choose one of {', '.join(PARTS)}")
        if self.runs("supernode") and self.ca is None:
            raise JoinError("--ca is needed: the federation's CA certificate, from its operator")
        if self.runtime_port is not None and not 0 < self.runtime_port < 65536:
            raise JoinError(f"--runtime-port {self.runtime_port}: a port is 1..65535")

    def runs(self, name: str) -> bool:
        """Whether this service runs the part ``name``."""
        return self.part in (None, name)

    def file(self, name: str) -> Path:
        """The service's lock, log or state file (see :func:`service_file`)."""
        return service_file(self.data_dir, name, self.part)

    @property
    def node_key(self) -> Path:
        """The device's SuperNode private key (its public key beside it, ``.pub``)."""
        return node_key_paths(self.data_dir)[0]

    @property
    def node_pub(self) -> Path:
        return node_key_paths(self.data_dir)[1]


def node_key_paths(data_dir: Path) -> tuple[Path, Path]:
    """The device's SuperNode key pair in ``data_dir``: private key, public key."""
    return data_dir / NODE_KEY, data_dir / f"{NODE_KEY}.pub"


def service_file(data_dir: Path, name: str, part: str | None) -> Path:
    """The lock, log or state file (``join.lock``, ``join.log``, ``federation.json``) of the
    service running ``part`` on ``data_dir``: a part other than the worker names its own."""
    if part in (None, "worker"):
        return data_dir / name
    stem, _, suffix = name.partition(".")
    return data_dir / f"{stem}-{part}.{suffix}"


# ---- before anything starts -------------------------------------------------------------


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as its parts.

    Raises:
        JoinError: If it is not ``host:port`` with a port in 1..65535.
    """
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise JoinError(f"{address!r} is not HOST:PORT (e.g. fl.example.org:8000)")
    return host, int(port)


def check_server(address: str, ca: Path, *, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Reach ``address`` and check its TLS certificate against ``ca`` (and its name).

    Raises:
        JoinError: No CA file, the server unreachable, or not certified by ``ca``.
    """
    if not ca.is_file():
        raise JoinError(f"no CA certificate at {ca}: get the federation's ca.crt from its operator")
    host, port = split_address(address)
    try:
        context = ssl.create_default_context(cafile=str(ca))
    except ssl.SSLError as err:
        raise JoinError(f"{ca} is not a PEM CA certificate ({err.reason})") from None
    context.set_alpn_protocols(["h2"])  # gRPC's
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            pass
    except ssl.SSLCertVerificationError as err:
        raise JoinError(
            f"the server at {address} is not certified by {ca} ({err.verify_message}): get "
            "the federation's ca.crt from its operator and pass it with --ca"
        ) from None
    except (OSError, ssl.SSLError) as err:
        why = getattr(err, "strerror", None) or str(err) or type(err).__name__
        raise JoinError(
            f"cannot reach the federation at {address} ({why}): is its server running, and "
            "is the address right?"
        ) from None


def ensure_node_key(data_dir: Path) -> tuple[bytes, bool]:
    """The device's SuperNode public key (``<data-dir>/node.key.pub``), made with its private
    key (0600) the first time; and whether it was made now.

    Raises:
        JoinError: If only one half of the pair is there.
    """
    key, pub = node_key_paths(data_dir)
    have = (key.exists(), pub.exists())
    if have == (True, True):
        return pub.read_bytes(), False
    if any(have):
        raise JoinError(
            f"{key} or {pub} is missing: restore the pair the operator registered, or remove "
            "both to make a new one (the operator must then register it)"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    return write_node_keys(key, pub), True


@contextlib.contextmanager
def join_lock(data_dir: Path, path: Path | None = None) -> Iterator[None]:
    """Hold ``<data-dir>/join.lock`` (or ``path``) for the service's life.

    Raises:
        JoinError: If another ``join`` holds it.
    """
    path = data_dir / JOIN_LOCK if path is None else path
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise JoinError(
                f"another `fedpersona device join` (pid {holder}) runs on {data_dir}; stop it "
                "first (one device, one federation service)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


# ---- the service ------------------------------------------------------------------------


def diagnose_supernode(plan: JoinPlan, code: int, tail: list[str]) -> str | None:
    """Why the SuperNode can never run (it is then not restarted), or ``None``."""
    text = "\n".join(tail)
    for marker, reason in REFUSALS:
        if marker in text:
            return reason.format(address=plan.address, pub=plan.node_pub, ca=plan.ca)
    return None


def _sandboxed_executor(
    plan: JoinPlan, run_dir: Path, executor: list[str]
) -> tuple[list[str], dict[str, str]]:
    """The executor's command under bubblewrap, and its environment: its own Flower home
    (the app bundles it installs) in the run folder, never the store's."""
    exec_home = run_dir / "clientapp-home"
    exec_home.mkdir(mode=0o700, exist_ok=True)
    passphrase_file = os.environ.get(PASSPHRASE_FILE_ENV)
    hidden = [plan.data_dir, *([plan.key_file] if plan.key_file is not None else [])]
    if passphrase_file:
        hidden.append(Path(passphrase_file))
    command = sandboxed(
        executor, readable=[run_dir], writable=[exec_home], hidden=hidden, home=exec_home
    )
    return command, flower_env(exec_home, drop=(PASSPHRASE_ENV, PASSPHRASE_FILE_ENV))


def children(
    plan: JoinPlan, run_dir: Path, passphrase: str | None, *, sandbox: bool = False
) -> list[Child]:
    """The worker, the SuperNode and its ClientApp executor, in start order; with
    ``sandbox``, the executor under bubblewrap (:mod:`client.federation.sandbox`)."""
    from client.federation.worker import SOCKET_KEY, ping

    env = flower_env(plan.data_dir / "flwr", drop=(PASSPHRASE_ENV, PASSPHRASE_FILE_ENV))
    sock = run_dir / "worker.sock"
    # One service: the SuperNode and its executor prove themselves to each other with a
    # secret (Flower's SuperExec authentication), so another local user cannot act as the
    # executor on the runtime API. Parts (--part) share a network namespace of their own
    # instead (docker-compose.yml: the executor in its SuperNode's).
    auth = (
        []
        if plan.part is not None
        else ["--superexec-auth-secret-file", str(superexec_secret(run_dir))]
    )
    runtime = plan.runtime_port or free_port()
    node_health, exec_health = free_port(), free_port()
    worker = [
        str(BIN / "fedpersona"), "device", "worker", "--socket", str(sock),
        "--data-dir", str(plan.data_dir), "--retention-days", str(plan.retention_days),
    ]  # fmt: skip
    if plan.key_file is not None:
        worker += ["--key-file", str(plan.key_file)]
    if plan.num_partitions is not None:
        worker += ["--num-partitions", str(plan.num_partitions)]
    if plan.local_only_baseline:
        worker.append("--local-only-baseline")

    def piped_passphrase() -> dict[str, Any]:
        """A fresh pipe holding the passphrase for this start of the worker."""
        if passphrase is None:
            return {}
        read, write = os.pipe()
        os.write(write, passphrase.encode())
        os.close(write)
        return {"pass_fds": (read,), "env": {PASSPHRASE_FILE_ENV: f"/dev/fd/{read}"}}

    def remove_socket() -> None:
        for path in (sock, sock.with_name(sock.name + ".key")):
            path.unlink(missing_ok=True)

    supernode = [
        str(BIN / "flower-supernode"), "--superlink", plan.address,
        "--root-certificates", str(plan.ca),
        "--auth-supernode-private-key", str(plan.node_key),
        "--isolation", "process", "--host", "127.0.0.1", "--port", str(runtime),
        "--health-server-address", f"127.0.0.1:{node_health}",
        "--node-config", f'{SOCKET_KEY}="{sock}"', *auth,
    ]  # fmt: skip
    executor = [
        str(BIN / "flower-superexec"), "--runtime-api-address", f"127.0.0.1:{runtime}",
        "--insecure", "--health-server-address", f"127.0.0.1:{exec_health}", *auth,
    ]  # fmt: skip
    exec_env = env
    if sandbox:
        executor, exec_env = _sandboxed_executor(plan, run_dir, executor)
    every = [
        Child(
            "worker",
            worker,
            env=env,
            ready=lambda: ping(sock),
            ready_timeout_s=WORKER_READY_S,
            prepare=piped_passphrase,
            cleanup=remove_socket,
        ),
        Child(
            "supernode",
            supernode,
            env=env,
            ready=lambda: port_open(runtime),
            diagnose=lambda code, tail: diagnose_supernode(plan, code, tail),
        ),
        Child("clientapp-executor", executor, env=exec_env, ready=lambda: port_open(exec_health)),
    ]
    return [c for c in every if plan.runs(c.name)]


def superexec_secret(run_dir: Path) -> Path:
    """``<run_dir>/superexec.secret``: 32 random bytes (0600), made once per run folder
    (written aside, then linked into place)."""
    path = run_dir / "superexec.secret"
    if path.exists():
        return path
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".secret-")  # 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(os.urandom(32))
        with contextlib.suppress(FileExistsError):  # another part made it meanwhile
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    return path


SANDBOXED = "bubblewrap"


def isolation(plan: JoinPlan, logger: logging.Logger) -> str:
    """How the ClientApp executor (the server's code) runs: :data:`SANDBOXED`, in a part of
    its own (``--part``: its container isolates it), or ``none: <why>`` — said at start, in
    the log, and kept in the service's state (``device status``)."""
    if not plan.runs("clientapp-executor"):
        return "no executor in this part"
    if plan.part is not None:
        return "its own part (--part clientapp-executor: its container isolates it)"
    why = sandbox_problem()
    if why is None:
        return SANDBOXED
    logger.warning(
        "the ClientApp executor runs WITHOUT a sandbox: %s. The server's ClientApp code then "
        "runs as your user and could read what your user can — this device's store files "
        "(encrypted), its key file, node key and passphrase file — and write the software it "
        "runs from (docs/deploy.md, 'Who may run code on a device').",
        why,
    )
    return f"none: {why}"


def write_state(
    plan: JoinPlan,
    processes: dict[str, Any],
    *,
    joined_at: float,
    server: dict[str, Any] | None = None,
    isolated: str = "",
) -> None:
    """``<data-dir>/federation.json``: the federation, the service's processes and the last
    check of the server (``server``: ``reachable``, ``checked_at``, ``error``)."""
    state = {
        "address": plan.address,
        "ca": None if plan.ca is None else str(plan.ca),
        "node_public_key": str(plan.node_pub),
        "pid": os.getpid(),
        "joined_at": joined_at,
        "updated_at": time.time(),
        "processes": processes,
        "server": server,
        # How the server's ClientApp code runs here: in a sandbox, or not (and why).
        "isolation": isolated,
    }
    if plan.part is not None:
        state["part"] = plan.part
    atomic_write_bytes(plan.file(STATE_FILE), json.dumps(state, indent=1).encode())


def read_state(data_dir: Path, part: str | None = None) -> dict[str, Any] | None:
    """What the running (or last) ``join`` (of ``part``, if given) wrote, with ``running``
    (its process and every child alive now), ``connected`` and ``server_error`` (the last
    check of the server). ``None`` if this device never joined."""
    path = service_file(Path(data_dir), STATE_FILE, part)
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict):
        return None

    procs = state.get("processes") if isinstance(state.get("processes"), dict) else {}
    service = pid_alive(state.get("pid"))
    state["running"] = bool(
        service
        and procs
        and all(pid_alive(p.get("pid")) for p in procs.values() if isinstance(p, dict))
    )
    probe = state.get("server") if isinstance(state.get("server"), dict) else None
    # Connected: running, and the server answered a check that is recent (None: not checked,
    # e.g. a worker-only part in its own container).
    state["connected"] = (
        None
        if probe is None
        else bool(
            state["running"]
            and probe.get("reachable")
            and time.time() - float(probe.get("checked_at") or 0) < 3 * PROBE_S
        )
    )
    state["server_error"] = None if probe is None else probe.get("error")
    return state


def join(
    plan: JoinPlan,
    passphrase: str | None,
    logger: logging.Logger,
    *,
    on_start: Callable[[Supervisor], None] | None = None,
) -> None:
    """Run the device's federation service until its supervisor is stopped (``on_start``
    gets it before anything starts: the command's SIGTERM/Ctrl-C handler stops it) — see the
    module docstring.

    Raises:
        JoinError: The device cannot join (the message says why).
        common.supervise.ServiceFailed: A process cannot run (its reason).
    """
    private = plan.run_dir is None
    if private:  # 0700; short enough for a socket path
        run_dir = Path(tempfile.mkdtemp(prefix="fpj-"))
    else:
        run_dir = plan.run_dir
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    joined_at = time.time()
    server: dict[str, Any] | None = None
    processes: dict[str, Any] = {}
    isolated = isolation(plan, logger)

    def record(now: dict[str, Any] | None = None) -> None:
        processes.update(now or {})
        write_state(plan, processes, joined_at=joined_at, server=server, isolated=isolated)

    def probe() -> None:
        """Check the server answers (TLS with the federation's CA); record it."""
        nonlocal server
        try:
            check_server(plan.address, plan.ca)  # type: ignore[arg-type]
            error = None
        except JoinError as err:
            error = str(err)
        if server is not None and (error is None) != server["reachable"]:
            logger.warning("server %s", "reachable again" if error is None else error)
        server = {"reachable": error is None, "checked_at": time.time(), "error": error}
        record()

    try:
        sup = Supervisor(
            children(plan, run_dir, passphrase, sandbox=isolated == SANDBOXED),
            logger=logger,
            on_change=record,
            tick=(PROBE_S, probe) if plan.runs("supernode") else None,
        )
        if on_start is not None:
            on_start(sup)
        sup.run()
    finally:
        if private:
            shutil.rmtree(run_dir, ignore_errors=True)
