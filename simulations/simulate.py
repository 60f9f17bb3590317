"""``fedpersona simulate``: a local multi-client federation on Flower's Simulation Engine.

It runs the real thing — ``flwr run`` against a ``flower-superlink --simulation`` (Ray) — in a
sandbox that leaves nothing behind:

* its own ``FLWR_HOME`` inside the run directory, holding a SuperLink connection to a
  superlink this driver starts on a free 127.0.0.1 port and stops by PID when done (with every
  process it spawned, Ray included);
* runtime dependency installation disabled (``uv sync`` would pull a multi-GB CUDA torch);
* the run config written to ``run-config.toml`` and passed with ``--run-config``;
* Flower's log streamed to ``flwr.log`` and summarised as a progress bar.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from common.config import RunConfig, parse_run_config
from common.flower_env import flower_env
from common.supervise import free_port
from simulations.cluster import (
    ClientResources,
    describe_cluster,
    engine_environment,
    probe,
    record_placement,
    resolve_address,
)
from simulations.corpora import corpus_federation, scaled_min_clients
from simulations.presets import Preset, get_preset

if TYPE_CHECKING:
    from common.corpus import Corpus

PROJECT_DIR = Path(__file__).resolve().parents[1]
_ROUND = re.compile(r"\[ROUND (\d+)(?:/(\d+))?\]")
# The ServerApp's own log records ("fedpersona: …", "fedpersona round N: …") in Flower's log.
_FEDPERSONA = re.compile(r"^\s*(?:(?:INFO|WARNING|ERROR)\s*:\s+)?fedpersona(?: round \d+)?:")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def is_fedpersona_line(line: str) -> bool:
    """Whether a line of Flower's log is one of the ServerApp's own records (not a line that
    merely mentions a path with "fedpersona" in it)."""
    return bool(_FEDPERSONA.match(_ANSI.sub("", line)))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"flower-superlink did not open 127.0.0.1:{port} in {timeout:.0f} s")


def stop_process_tree(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate ``proc`` and every descendant (Ray workers, ServerApp, SuperExec) by PID."""
    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=timeout)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)


# Ray puts its Unix sockets at <RAY_TMPDIR>/ray/session_<%Y-%m-%d_%H-%M-%S_%f>_<pid>/sockets/
# plasma_store (ray/_private/node.py), and Linux caps a socket path at 107 bytes.
_RAY_SESSION_TAIL = len("/ray/session_") + len("2026-01-01_00-00-00_000000") + len("_")
_MAX_PID_DIGITS = 7  # /proc/sys/kernel/pid_max is at most 2**22 = 4194304
_RAY_SOCKET_TAIL = len("/sockets/") + len("plasma_store")
# Room for Ray's ".<n>" suffixes on a reused socket name and a longer name in a later release.
_RAY_SOCKET_MARGIN = 8
AF_UNIX_MAX = 107
RAY_DIR_PREFIX = "fpr-"  # + the 8 random characters of tempfile.mkdtemp


def ray_socket_path_bound(ray_tmpdir: str) -> int:
    """The longest Unix socket path, in bytes, Ray can make under ``ray_tmpdir``."""
    return (
        len(os.fsencode(ray_tmpdir))
        + _RAY_SESSION_TAIL
        + _MAX_PID_DIGITS
        + _RAY_SOCKET_TAIL
        + _RAY_SOCKET_MARGIN
    )


def ray_temp_base(environ: dict[str, str] | None = None) -> Path:
    """Where this run's Ray directory goes: ``$RAY_TMPDIR``, else ``$TMPDIR``, else ``/tmp``.

    The same order Ray itself follows. The run's directory (``<base>/fpr-XXXXXXXX``) never
    depends on the run name or ``--out``, so only this base can make Ray's socket paths too
    long.

    Raises:
        ValueError: If Ray's socket paths under that base could pass the 107-byte limit.
    """
    environ = os.environ if environ is None else environ
    source = next((k for k in ("RAY_TMPDIR", "TMPDIR") if environ.get(k)), None)
    base = Path(environ[source]) if source else Path("/tmp")
    bound = ray_socket_path_bound(os.path.join(base, RAY_DIR_PREFIX + "X" * 8))
    if bound > AF_UNIX_MAX:
        limit = AF_UNIX_MAX - ray_socket_path_bound(f"/{RAY_DIR_PREFIX}XXXXXXXX")
        raise ValueError(
            f"${source}={base} is too long for Ray's Unix sockets: its paths under it could "
            f"reach {bound} bytes, over Linux's {AF_UNIX_MAX}. Point RAY_TMPDIR at a "
            f"directory of at most {limit} bytes, e.g. `RAY_TMPDIR=/tmp fedpersona simulate …`"
        )
    return base


def _exit_on_sigterm():  # type: ignore[no-untyped-def]
    """Turn SIGTERM into ``SystemExit`` (main thread only); return the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def _raise(signum, frame):  # type: ignore[no-untyped-def]
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, _raise)


def simulate(
    preset: str = "quick",
    overrides: dict[str, Any] | None = None,
    out: Path | str = "runs",
    *,
    run_name: str | None = None,
    on_line: Callable[[str], None] | None = None,
    on_round: Callable[[int, int], None] | None = None,
    ray_address: str | None = None,
) -> Path:
    """Run one simulated federation and return its run directory (with ``summary.json``).

    Args:
        preset: ``tiny``, ``quick`` or ``full``.
        overrides: Run-config overrides (``--set``), applied after the preset.
        out: Parent directory of the run directory.
        run_name: Run directory name; default ``<preset>-<strategy>-<timestamp>``.
        on_line: Called with every line Flower prints.
        on_round: Called with ``(round, total)`` when a round starts.
        ray_address: A Ray cluster to run the ClientApps on (else ``$RAY_ADDRESS``, else
            a Ray of the run's own on this machine; :mod:`simulations.cluster`).

    Raises:
        ValueError: On an invalid preset or config (before anything starts).
        RuntimeError: If the run fails or writes no summary (a
            :class:`~simulations.cluster.ClusterError` for a cluster that cannot run it).
    """
    spec = get_preset(preset)
    run_config, corpus, cold_start_users = _plan(spec, overrides or {}, on_line)
    cfg = parse_run_config(run_config)  # fail fast, before any process starts
    # One Flower node per simulated user, or nodes hosting several (simulation.users-per-node).
    num_supernodes = math.ceil(run_config["data.num-users"] / cfg.users_per_node)
    ray_base = ray_temp_base()
    out = Path(out).expanduser().resolve()
    name = run_name or f"{preset}-{cfg.strategy}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = out / name
    if run_dir.exists():
        raise ValueError(f"{run_dir} already exists; pick another --out or run name")
    run_config["output.dir"] = str(out)
    run_config["output.run-name"] = name
    run_dir.mkdir(parents=True)
    if corpus is not None:
        (run_dir / "corpus.json").write_text(json.dumps(corpus.to_json(), indent=1))
    address = resolve_address(ray_address)
    resources = ClientResources.of(cfg)
    if address is not None:
        line = describe_cluster(address, probe(address, run_dir, resources), resources)
        if on_line:
            on_line(f"fedpersona: {line}")
    port = free_port()
    config_file = _write_run_config(run_dir, run_config)
    # Ray's socket paths must stay short (see ray_temp_base): not under run_dir, not named
    # after the run; where it is goes into FLWR_HOME, for whoever looks for its processes.
    ray_tmp = Path(tempfile.mkdtemp(prefix=RAY_DIR_PREFIX, dir=ray_base))
    env = _environment(run_dir / ".flwr", port, ray_tmp)
    env.update(engine_environment(env, run_dir, address, resources))
    # SIGTERM must unwind through `finally` too, or the superlink and Ray outlive us.
    previous = _exit_on_sigterm()
    superlink = _start_superlink(run_dir, port, env)
    try:
        _wait_port(port, superlink)
        cmd = _flwr_run(config_file, num_supernodes, resources)
        _follow(cmd, env, run_dir, cfg.num_server_rounds, on_line=on_line, on_round=on_round)
    finally:
        stop_process_tree(superlink)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    summary = run_dir / "summary.json"
    if not summary.exists():
        raise RuntimeError(f"the run wrote no summary; see {run_dir / 'flwr.log'}")
    record_placement(run_dir, address, on_line)
    _after_run(run_dir, cfg, cold_start_users, on_line)
    return run_dir


def _flwr_run(config_file: Path, num_supernodes: int, resources: ClientResources) -> list[str]:
    """The ``flwr run`` command of a simulation."""
    return [
        str(BIN_DIR / "flwr"),
        "run",
        str(PROJECT_DIR),
        "fedpersona-sim",
        "--stream",
        "--run-config",
        str(config_file),
        "--federation-config",
        # Flower's record of it (whole CPUs); the engine asks Ray for what the run config
        # says ($FEDPERSONA_CLIENT_RESOURCES, simulations/engine.py)
        f"num-supernodes={num_supernodes} "
        f"client-resources-num-cpus={max(1, math.ceil(resources.cpus))} "
        f"client-resources-num-gpus={resources.gpus}",
    ]


def _after_run(
    run_dir: Path, cfg: RunConfig, cold_start_users: int, on_line: Callable[[str], None] | None
) -> None:
    """What the simulation measures once the federation is done: the users who never joined
    on the released model, and the user-level audit when the run has canary clients."""
    if cold_start_users:
        from simulations.cold_start import add_to_summary

        if on_line:
            on_line(f"fedpersona: evaluating {cold_start_users} users who never joined")
        add_to_summary(run_dir, cold_start_users)
    if cfg.audit.canary_clients:
        from simulations import client_audit

        result = client_audit.add_to_summary(run_dir)
        if on_line:
            on_line(f"fedpersona: {client_audit.describe(result)}")


# Where the Flower commands are: this interpreter's bin, even when the venv is not activated.
BIN_DIR = Path(sys.executable).parent


def _plan(
    spec: Preset, overrides: dict[str, Any], on_line: Callable[[str], None] | None
) -> tuple[dict[str, Any], Corpus | None, int]:
    """The run config (the preset's, the overrides, and the number of users), the per-user
    corpus it reads if any, and how many newcomers to measure."""
    run_config: dict[str, Any] = {**spec.run_config, **overrides}
    corpus, cold_start_users = None, spec.cold_start_users
    if run_config.get("data.corpus"):
        corpus, num_users, cold_start_users = corpus_federation(run_config, spec.cold_start_users)
        if "dp.min-clients" not in overrides:
            run_config["dp.min-clients"] = scaled_min_clients(
                run_config, spec.num_supernodes, num_users
            )
        for line in corpus.describe(joined=num_users):
            if on_line:
                on_line(f"fedpersona: {line}")
    else:
        num_users = int(run_config.get("data.num-users") or spec.num_supernodes)
    run_config["data.num-users"] = num_users
    return run_config, corpus, cold_start_users


def _write_run_config(run_dir: Path, run_config: dict[str, Any]) -> Path:
    """``run-config.toml`` in the run dir: what ``flwr run --run-config`` reads."""
    path = run_dir / "run-config.toml"
    path.write_text(
        "".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in sorted(run_config.items()))
    )
    return path


def _environment(flwr_home: Path, port: int, ray_tmp: Path) -> dict[str, str]:
    """The run's own ``FLWR_HOME`` (a federation at 127.0.0.1:``port``) and the environment of
    every process it starts: offline, no runtime installs, Ray under ``ray_tmp``."""
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "fedpersona-sim"\n\n'
        f'[superlink.fedpersona-sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    (flwr_home / "ray-tmpdir").write_text(str(ray_tmp))
    return {
        **flower_env(flwr_home),
        "RAY_TMPDIR": str(ray_tmp),
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def _start_superlink(run_dir: Path, port: int, env: dict[str, str]) -> subprocess.Popen:
    """A simulation SuperLink on 127.0.0.1:``port``, its state and log in the run dir."""
    return subprocess.Popen(
        [
            str(BIN_DIR / "flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--database",
            str(Path(env["FLWR_HOME"]) / "state.db"),
            "--disable-runtime-dependency-installation",
            "--log-file",
            str(run_dir / "superlink.log"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _follow(
    cmd: list[str],
    env: dict[str, str],
    run_dir: Path,
    num_rounds: int,
    *,
    on_line: Callable[[str], None] | None,
    on_round: Callable[[int, int], None] | None,
) -> None:
    """Run ``flwr run`` and follow its stream into ``flwr.log`` until the run's summary is
    written; ``flwr`` is stopped (with its process tree) however this ends."""
    with open(run_dir / "flwr.log", "w") as log:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=PROJECT_DIR,
            start_new_session=True,
        )
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if on_line:
                    on_line(line.rstrip("\n"))
                match = _ROUND.search(line)
                if match and on_round:
                    on_round(int(match.group(1)), int(match.group(2) or num_rounds))
                if (run_dir / "summary.json").exists() and "win_rate=" in line:
                    break
            # The stream ends when the run ends; give `flwr` a moment to exit.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        finally:
            stop_process_tree(proc)
