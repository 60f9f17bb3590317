"""Round time of a real deployment: per-message ClientApps vs the long-lived device worker.

    python -m simulations.bench_isolation [--rounds 3] [--nodes 2] [--modes subprocess worker]

Starts, side by side in one run and one after the other (``--repeats`` times per mode, in
ABBA order so that a drift in machine load weighs on both alike), the same deployment on
127.0.0.1 — a ``flower-superlink`` and two ``flower-supernode`` processes, the tiny model,
SecAgg+ on, ``flwr run`` with the integration tests' run config — and reads each round's wall
time from ``summary.json``:

* ``subprocess``: each SuperNode starts its own ``flower-superexec``, which starts a fresh
  ``flwr-clientapp`` for every message;
* ``process``: each SuperNode runs with ``--isolation process`` beside a ``flower-superexec``
  started on its own and kept running;
* ``worker``: as ``process``, plus one ``fedpersona device worker`` per device named in the
  SuperNode's ``worker-socket`` node config (what docker-compose.yml runs): the ClientApps
  forward training and evaluation to it, and it keeps torch and the model loaded.

In Flower 1.42 a ``flwr-clientapp`` takes one task token and exits, whichever the mode; the
long-lived process in ``process`` mode is the executor, not the ClientApp. The benchmark also
counts the ClientApp processes started and times cold imports in a fresh interpreter: the
ClientApp module (every message pays it; Flower only) and the model half
(:mod:`client.handlers`: torch, transformers, peft), which per-message ClientApps pay for every
training and evaluation message and the worker once. Writes ``bench_isolation_cpu.json`` and
``.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import flwr
import psutil

from common.crypto import create_key_file
from simulations.simulate import PROJECT_DIR, _free_port, _wait_port, stop_process_tree

BIN = Path(sys.executable).parent
MODES = ("subprocess", "process", "worker")
CLIENTAPP_STARTED = "Start `flwr-clientapp` process"


def run_config(out: Path, name: str, rounds: int, nodes: int) -> dict[str, Any]:
    """The integration tests' tiny run config (SecAgg+ on, the default), ``rounds`` rounds."""
    return {
        "model.name": "tiny",
        "num-server-rounds": rounds,
        "data.num-users": nodes,
        "data.max-seq-len": 48,
        "data.max-test-samples": 4,
        "train.local-steps": 4,
        "train.batch-size": 2,
        "train.learning-rate": 0.05,
        "dp.clip-norm": 0.005,
        "round-timeout": 300,
        "output.dir": str(out),
        "output.run-name": name,
    }


def _toml(config: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        return repr(v) if isinstance(v, (int, float)) else json.dumps(str(v))

    return "".join(f"{json.dumps(k)} = {value(v)}\n" for k, v in config.items())


class _Processes:
    """Processes of one deployment: each logs to ``<root>/<name>.log``, all stopped by PID."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.procs: list[subprocess.Popen] = []
        self._logs = contextlib.ExitStack()

    def start(self, name: str, cmd: list[str | Path]) -> subprocess.Popen:
        log = self._logs.enter_context(open(self.root / f"{name}.log", "w"))  # noqa: SIM115
        proc = subprocess.Popen(
            [str(c) for c in cmd],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.root,
        )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_process_tree(proc)
        self._logs.close()


def _wait_online(env: dict[str, str], cwd: Path, count: int, timeout: float = 120) -> None:
    """Wait until the SuperLink lists ``count`` online SuperNodes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = subprocess.run(
            [str(BIN / "flwr"), "supernode", "list", "bench", "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=cwd,
        )
        if res.returncode == 0 and "{" in res.stdout:
            text = res.stdout[res.stdout.index("{") : res.stdout.rindex("}") + 1]
            nodes = json.loads(text)["nodes"]
            if sum(n["status"] == "online" for n in nodes) >= count:
                return
        time.sleep(1)
    raise TimeoutError(f"fewer than {count} SuperNodes online after {timeout:.0f} s")


def run_mode(mode: str, root: Path, *, rounds: int, nodes: int) -> dict[str, Any]:
    """One deployment with ClientApps under ``mode``, in ``root``; its per-round seconds and
    counts.

    Raises:
        ValueError: On an unknown mode.
        RuntimeError: If the run fails (the message has the end of its log).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    (root / "flwr-home").mkdir(parents=True)
    port = _free_port()
    (root / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    (root / "run-config.toml").write_text(_toml(run_config(root, "run", rounds, nodes)))
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
        "FLWR_HOME": str(root / "flwr-home"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    procs = _Processes(root, env)
    load_before = os.getloadavg()[0]
    try:
        superlink = procs.start(
            "superlink",
            [BIN / "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
             "--database", root / "superlink.db", "--disable-runtime-dependency-installation"],
        )  # fmt: skip
        _wait_port(port, superlink)
        isolation = "subprocess" if mode == "subprocess" else "process"
        for i in range(nodes):
            runtime = _free_port()
            data_dir = root / f"device{i}"
            node_config = (
                f'partition-id={i} num-partitions={nodes} data-dir="{data_dir}" '
                f'key-file="{_key_file(data_dir)}"'
            )
            if mode == "worker":
                sock = root / f"worker{i}.sock"
                node_config += f' worker-socket="{sock}"'
                worker = [BIN / "fedpersona", "device", "worker", "--socket", sock]
                _wait_socket(sock, procs.start(f"worker{i}", worker))
            procs.start(
                f"supernode{i}",
                [BIN / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                 "--host", "127.0.0.1", "--port", str(runtime), "--isolation", isolation,
                 "--node-config", node_config],
            )  # fmt: skip
            if mode != "subprocess":
                procs.start(
                    f"clientapp{i}",
                    [BIN / "flower-superexec", "--runtime-api-address", f"127.0.0.1:{runtime}",
                     "--insecure"],
                )  # fmt: skip
        _wait_online(env, root, nodes)
        t0 = time.perf_counter()
        res = subprocess.run(
            [str(BIN / "flwr"), "run", str(PROJECT_DIR), "bench", "--stream",
             "--run-config", str(root / "run-config.toml")],
            env=env, capture_output=True, text=True, timeout=1800, cwd=PROJECT_DIR,
        )  # fmt: skip
        wall = time.perf_counter() - t0
    finally:
        procs.stop()
    left = _processes_mentioning(str(root))
    if res.returncode != 0 or left:
        raise RuntimeError(
            f"{mode}: flwr run exited {res.returncode}, left running: {left}\n"
            f"{(res.stdout + res.stderr)[-3000:]}"
        )
    summary = json.loads((root / "run" / "summary.json").read_text())
    seconds = [float(r["seconds"]) for r in summary["rounds"]]
    launches = sum(
        p.read_text(errors="replace").count(CLIENTAPP_STARTED) for p in root.glob("*.log")
    )
    return {
        "mode": mode,
        "round_seconds": seconds,
        "mean_round_s_after_first": statistics.fmean(seconds[1:]) if len(seconds) > 1 else None,
        "flwr_run_wall_s": wall,
        "clientapp_processes": launches,
        "clientapp_processes_per_round_per_node": launches / (rounds * nodes),
        "updates_per_round": [r.get("updates") for r in summary["rounds"]],
        # Other work on the machine skews the timings: the 1-minute load before and after.
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def _wait_socket(sock: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until a device worker listens on ``sock``."""
    from client.worker import key_path

    deadline = time.monotonic() + timeout
    while not (sock.is_socket() and key_path(sock).exists()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the device worker for {sock} did not start (exit {proc.poll()})")
        time.sleep(0.2)


def _key_file(data_dir: Path) -> Path:
    """A 0600 device key file beside ``data_dir`` (created once)."""
    key = data_dir.with_name(data_dir.name + ".key")
    if not key.exists():
        create_key_file(key)
    return key


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if text in cmd and proc.pid != os.getpid():
            found.append(cmd[:200])
    return found


def cold_import_s(module: str) -> float:
    """Seconds a fresh interpreter takes to import ``module``."""
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PROJECT_DIR,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    if res.returncode != 0:
        raise RuntimeError(f"importing {module} failed:\n{res.stderr[-2000:]}")
    return float(res.stdout.strip().splitlines()[-1])


def abba(modes: list[str], repeats: int) -> list[str]:
    """Run order A B B A A B ...: a drift in machine load weighs on every mode alike."""
    order: list[str] = []
    for r in range(repeats):
        order += modes if r % 2 == 0 else modes[::-1]
    return order


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mode: the mean seconds per round over rounds 2..N of all its runs."""
    out: dict[str, Any] = {}
    for mode in dict.fromkeys(r["mode"] for r in runs):
        seconds = [s for r in runs if r["mode"] == mode for s in r["round_seconds"][1:]]
        out[mode] = {
            "mean_round_s_after_first": statistics.fmean(seconds),
            "runs": sum(r["mode"] == mode for r in runs),
        }
    return out


def to_markdown(result: dict[str, Any]) -> str:
    """Seconds per round (rounds 2..N) per run and mode, and the ratio."""
    lines = [
        f"Real deployment on {result['device']}: superlink + {result['nodes']} supernodes, tiny "
        f"model, SecAgg+, {result['rounds']} rounds, Flower {result['flwr']}; runs in ABBA order.",
        "",
        "| run | ClientApp isolation | s/round (rounds 2..N) | every round (s) | ClientApp "
        "processes per round per node | 1-min load before/after |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(result["runs"], 1):
        lines.append(
            f"| {i} | `{r['mode']}` | {r['mean_round_s_after_first']:.1f} | "
            f"{', '.join(f'{s:.1f}' for s in r['round_seconds'])} | "
            f"{r['clientapp_processes_per_round_per_node']:.1f} | "
            f"{r['loadavg_1min'][0]:.1f} / {r['loadavg_1min'][1]:.1f} |"
        )
    for mode, m in result["modes"].items():
        lines.append(f"| all | `{mode}` | **{m['mean_round_s_after_first']:.1f}** | | | |")
    for mode, ratio in result["ratio_over_subprocess"].items():
        lines.append(f"| | ratio {mode} / subprocess | **{ratio:.2f}** | | | |")
    lines += [
        "",
        "Cold imports in a fresh interpreter: the ClientApp module (Flower only; every message) "
        f"{result['cold_import_s']['client.client_app']:.1f} s; the model half "
        f"(`client.handlers`: torch, transformers, peft) "
        f"{result['cold_import_s']['client.handlers']:.1f} s — per training/evaluation message "
        "without a worker, once per device with one.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["subprocess", "worker"], choices=MODES)
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode, in ABBA order")
    parser.add_argument("--out", type=Path, default=PROJECT_DIR / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here")
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.nodes < 2 or args.repeats < 1:
        parser.error("--rounds and --nodes must be >= 2 (round 1 carries the start-up)")

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-isolation-"))
    runs = [
        run_mode(mode, work / f"{i:02d}-{mode}", rounds=args.rounds, nodes=args.nodes)
        for i, mode in enumerate(abba(args.modes, args.repeats))
    ]
    modes = summarize(runs)
    result: dict[str, Any] = {
        "device": f"cpu ({psutil.cpu_count()} cores, {platform.machine()})",
        "flwr": flwr.__version__,
        "rounds": args.rounds,
        "nodes": args.nodes,
        "runs": runs,
        "modes": modes,
        "ratio_over_subprocess": {
            mode: m["mean_round_s_after_first"] / modes["subprocess"]["mean_round_s_after_first"]
            for mode, m in modes.items()
            if mode != "subprocess" and "subprocess" in modes
        },
        "cold_import_s": {m: cold_import_s(m) for m in ("client.client_app", "client.handlers")},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_isolation_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    table = to_markdown(result)
    (args.out / "bench_isolation_cpu.md").write_text(table)
    print(json.dumps(result, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
