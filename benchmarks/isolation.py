"""Round time of a real deployment: per-message ClientApps vs the long-lived device worker.

    python -m benchmarks.isolation [--rounds 3] [--nodes 2] [--modes subprocess worker]

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
(:mod:`client.federation.handlers`: torch, transformers, peft), which per-message ClientApps pay
for every training and evaluation message and the worker once. Writes ``bench_isolation_cpu.json``
and ``.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
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

from simulations.deployment import LocalDeployment, processes_mentioning, tiny_run_config
from simulations.simulate import PROJECT_DIR

MODES = ("subprocess", "process", "worker")
CLIENTAPP_STARTED = "Start `flwr-clientapp` process"


def run_mode(mode: str, root: Path, *, rounds: int, nodes: int) -> dict[str, Any]:
    """One deployment with ClientApps under ``mode``, in ``root``; its per-round seconds and
    counts.

    Raises:
        ValueError: On an unknown mode.
        RuntimeError: If the run fails (the message has the end of its log).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    root.mkdir(parents=True)
    d = LocalDeployment(root, federation="bench")
    config = tiny_run_config(root, "run", **{"num-server-rounds": rounds, "data.num-users": nodes})
    load_before = os.getloadavg()[0]
    try:
        d.start_superlink()
        for i in range(nodes):
            d.start_device(
                i,
                nodes,
                isolation="subprocess" if mode == "subprocess" else "process",
                worker=mode == "worker",
            )
        d.wait_online(nodes)
        run_args = ["run", PROJECT_DIR, d.federation, "--stream"]
        t0 = time.perf_counter()
        res = d.flwr(*run_args, "--run-config", d.write_run_config(config), timeout=1800)
        wall = time.perf_counter() - t0
    finally:
        left = d.stop()
    left += processes_mentioning(str(root))
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
        f"(`client.federation.handlers`: torch, transformers, peft) "
        f"{result['cold_import_s']['client.federation.handlers']:.1f} s — per "
        "training/evaluation message without a worker, once per device with one.",
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
        "cold_import_s": {
            m: cold_import_s(m) for m in ("client.client_app", "client.federation.handlers")
        },
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
