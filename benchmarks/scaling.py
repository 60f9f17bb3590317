"""The suite's scaling part: simulated federations of growing population and clients per
round (tiny model and SmolLM2), their peak memory over the whole process tree, seconds per
round, the simulation engine's per-client overhead, and the growth plot."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import threading
import time
from pathlib import Path

import psutil

from simulations.simulate import simulate


class PeakRSS:
    """Polls the summed RSS of this process and all its descendants (Ray workers included),
    or of the processes a subclass's :meth:`processes` names."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def processes(self) -> list[psutil.Process]:
        me = psutil.Process()
        return [me, *me.children(recursive=True)]

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for p in self.processes():
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def engine_overhead(run_dir: Path, *, actors: int) -> dict:
    """The simulation engine's per-client overhead in a finished run, rounds ≥ 2 (round 1
    loads the model into every worker process).

    Each simulated node logs, per train message, how long it answered (``node_s``: store open,
    device set-up, decoding and encoding) and how much of that the devices' own rounds took
    (``device_s``: :meth:`client.federation.device.Device.train`); the server records each training
    phase's wall time (every SecAgg+ stage included). With ``actors`` workers running in
    parallel the engine had ``wall × actors`` worker-seconds: **overhead** is the share of
    them not spent in ``Device.train`` (actor hops, Flower's messages, SecAgg+'s other stages,
    store opens, encoding, idle workers); **node** the part spent in the node around it.
    """
    from client.federation.simulated import ENGINE_TIMINGS

    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [r for r in summary["rounds"] if "train_seconds" in r]
    later = [r for r in rounds if r["round"] >= 2] or rounds
    keep = {r["round"] for r in later}
    path = run_dir / ENGINE_TIMINGS
    lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    lines = [x for x in lines if x["round"] in keep]
    device = sum(x["device_s"] for x in lines)
    node = sum(x["node_s"] for x in lines)
    worker_s = sum(r["train_seconds"] for r in later) * actors
    return {
        "client_rounds": sum(x["users"] for x in lines),
        "device_s_per_client": device / max(1, sum(x["users"] for x in lines)),
        "node_overhead": 1 - device / node if node else None,
        "engine_overhead": 1 - device / worker_s if worker_s else None,
        "actors": actors,
    }


def scaling(
    out: Path, grid: list[tuple[int, int]], *, rounds: int = 2, model: str = "tiny"
) -> list[dict]:
    """Seconds per round and peak memory for (population, clients per round) pairs."""
    rows = []
    for population, per_round in grid:
        shares = per_round if per_round <= 11 else 11
        overrides = {
            "data.num-users": population,
            "data.min-lines": 5,
            "data.max-test-samples": 2,
            "train.local-steps": 2,
            "fraction-train": per_round / population,
            "fraction-evaluate": min(10, per_round) / population,
            "num-server-rounds": rounds,
            "privacy.epsilon-cap": 100.0,
            "dp.min-clients": max(2, per_round // 2),
            # SecAgg+ as designed for large rounds: each client shares its keys with a
            # neighbourhood (Shamir reconstruction is quadratic in the share count).
            # (Flower's neighbourhoods need an odd share count.)
            "secagg.num-shares": float(shares),
            "secagg.reconstruction-threshold": float(shares // 2 + 1),
        }
        if model != "tiny":
            overrides["model.name"] = model
        start = time.perf_counter()
        with PeakRSS() as mem:
            run_dir = simulate(
                "tiny", overrides, out, run_name=f"scale-{model}-{population}-{per_round}"
            )
        summary = json.loads((run_dir / "summary.json").read_text())
        later = summary["rounds"][1:] or summary["rounds"]
        rows.append(
            {
                "model": model,
                "population": population,
                "clients_per_round": per_round,
                "updates_last_round": summary["rounds"][-1].get("updates"),
                "seconds_per_round": statistics.fmean(r["seconds"] for r in later),
                "peak_rss_mib": mem.peak / 2**20,
                "wall_s": time.perf_counter() - start,
                "engine": engine_overhead(run_dir, actors=simulation_actors()),
            }
        )
    return rows


def simulation_actors(cpus_per_client: int = 1) -> int:
    """How many ClientApps Flower's simulation runs at once here (its Ray backend gives every
    core to the run and each ClientApp ``cpus_per_client`` of them)."""
    return max(1, (os.cpu_count() or 1) // cpus_per_client)


def growth_plot(rows: list[dict], path: Path) -> None:
    """Seconds per round and peak memory against clients per round, one line per model and
    population, on one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, mem_ax) = plt.subplots(1, 2, figsize=(10, 4))
    series: dict[str, list[dict]] = {}
    for row in rows:
        series.setdefault(f"{row.get('model', 'tiny')}, {row['population']} users", []).append(row)
    for label, points in series.items():
        points.sort(key=lambda p: p["clients_per_round"])
        x = [p["clients_per_round"] for p in points]
        time_ax.plot(x, [p["seconds_per_round"] for p in points], marker="o", label=label)
        mem_ax.plot(x, [p["peak_rss_mib"] / 1024 for p in points], marker="o", label=label)
    time_ax.set(xlabel="clients per round", ylabel="seconds per round", title="round time")
    mem_ax.set(xlabel="clients per round", ylabel="peak RSS, all processes (GiB)", title="memory")
    mem_ax.set_ylim(bottom=0)
    for ax in (time_ax, mem_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
