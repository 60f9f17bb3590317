"""Benchmark: the coordinator's cost per round against the cohort — SuperLink + ServerApp with
SecAgg+ and distributed DP, one simulated device per Flower node (each a SecAgg+ participant).

For each cohort (every device takes part), a federation of the tiny model runs one round,
measured from its start to its release on the server's own processes only — the SuperLink and the
simulation process, which holds the ServerApp, the message routing and the dispatch to Ray —
never the Ray workers that run the devices: CPU seconds (user + system), wall seconds, and
the peak RSS of those two processes over the run; and, within them, the CPU the ServerApp's
own thread spent on each SecAgg+ stage (setup, share keys, collect masked vectors, unmask),
from the workflow's log line. Both SecAgg+ neighbourhoods are measured:
derived from the cohort (``secagg.num-shares = 0``, the default: Bell et al.'s
logarithmic neighbourhoods) and everyone (``1.0``: Flower's default, quadratic).

Each series is fitted as ``a + c·g(n)`` for g in n, n log n and n² (least squares; the best by
relative error) and extrapolated to 10,000 devices with the best fit.

    python -m benchmarks.coordinator [--cohorts 100,300,1000] [--all-cohorts 100,300]
                                     [--out benchmarks/results]

Devices' noise shares are sized for m_min = 50 (``dp.min-clients``): the derived
neighbourhood is never smaller than the m_min a device checks its cohort by, so the m_min a
federation picks bounds how sparse its SecAgg+ can be (docs/cluster.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.scaling import PeakRSS
from simulations.simulate import simulate

MODELS = {
    "n": lambda n: n,
    "n log n": lambda n: n * math.log(n),
    "n²": lambda n: n * n,
}
TARGET = 10_000


def overrides(cohort: int, num_shares: float) -> dict:
    """One round, every device in it, as little client work as a round allows."""
    return {
        "data.num-users": cohort,
        "data.min-lines": 5,
        "data.min-examples": 2,  # every role of 5+ lines trains: all devices take part
        "data.max-test-samples": 2,
        "data.max-select-samples": 2,
        "train.local-steps": 1,
        "fraction-train": 1.0,
        "fraction-evaluate": 2 / cohort,
        "evaluate-every": 0,
        "num-server-rounds": 1,
        "ab.interactions": 0,
        "privacy.epsilon-cap": 100.0,
        "dp.min-clients": 50,
        "secagg.num-shares": num_shares,
        "secagg.timeout": 3600.0,
    }


class ServerMeter(PeakRSS):
    """The server's processes among this one's descendants: their peak RSS, and their CPU at
    marks."""

    def __init__(self) -> None:
        super().__init__()
        self.marks: dict[str, tuple[float, float]] = {}

    def processes(self) -> list[psutil.Process]:
        out = []
        for proc in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                line = " ".join(proc.cmdline())
                if "flower-superlink" in line or "simulations.engine" in line:
                    out.append(proc)
        return out

    def cpu(self) -> float:
        total = 0.0
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def mark(self, name: str) -> None:
        self.marks[name] = (self.cpu(), time.perf_counter())


def measure(cohort: int, num_shares: float, out: Path) -> dict:
    """One round of ``cohort`` devices, on the server's processes."""
    meter = ServerMeter()
    neighbours: list[str] = []
    stages: dict[str, float] = {}

    def on_round(current: int, total: int) -> None:
        if current == 1:
            meter.mark("start")

    def on_line(line: str) -> None:
        if "fedpersona round 1:" in line and "end" not in meter.marks:
            meter.mark("end")
        if "neighbours each" in line:
            neighbours.append(line.split("SecAgg+:")[-1].strip())
        if "SecAgg+ server compute (s):" in line:
            parts = line.split("(s):")[-1].split(",")
            stages.update({p.split()[0]: float(p.split()[1]) for p in parts if p.strip()})

    label = "derived" if num_shares == 0 else "all"
    start = time.perf_counter()
    with meter:
        simulate(
            "tiny",
            overrides(cohort, num_shares),
            out,
            run_name=f"coordinator-{label}-{cohort}",
            on_line=on_line,
            on_round=on_round,
        )
    (cpu0, t0), (cpu1, t1) = meter.marks["start"], meter.marks["end"]
    return {
        "cohort": cohort,
        "neighbours": label,
        "neighbourhood": neighbours[-1] if neighbours else None,
        "server_cpu_s": cpu1 - cpu0,
        # the CPU of the ServerApp's workflow thread per SecAgg+ stage
        "serverapp_stages_s": stages,
        "serverapp_s": sum(stages.values()),
        "round_wall_s": t1 - t0,
        "server_peak_rss_mib": meter.peak / 2**20,
        "cpu_ms_per_device": 1000 * (cpu1 - cpu0) / cohort,
        "run_wall_s": time.perf_counter() - start,
    }


def fit(rows: list[dict], key: str) -> dict:
    """The best of ``a + c·g(n)`` (least squares; ``a``: what the server spends whatever the
    cohort) by relative error, and its extrapolation to 10,000 devices."""
    best: dict | None = None
    ys = [r[key] for r in rows]
    for name, g in MODELS.items():
        xs = [g(r["cohort"]) for r in rows]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        c = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
        a = my - c * mx
        err = math.sqrt(
            sum(((a + c * x) / y - 1) ** 2 for x, y in zip(xs, ys, strict=True)) / len(xs)
        )
        if best is None or err < best["relative_error"]:
            best = {"model": name, "a": a, "c": c, "relative_error": err}
            best[f"at_{TARGET}"] = a + c * g(TARGET)
    assert best is not None
    first, last = rows[0], rows[-1]
    best["log_log_slope"] = math.log(last[key] / first[key]) / math.log(
        last["cohort"] / first["cohort"]
    )
    return best


def markdown(rows: list[dict], fits: dict) -> str:
    lines = [
        "| neighbours | cohort | each device's | server CPU s | per device ms | ServerApp's "
        "SecAgg+ compute s (setup / share keys / collect / unmask) | round wall s "
        "| server peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        stages = " / ".join(f"{v:.2f}" for v in r["serverapp_stages_s"].values())
        lines.append(
            f"| {r['neighbours']} | {r['cohort']} | {r['neighbourhood']} | "
            f"{r['server_cpu_s']:.1f} | {r['cpu_ms_per_device']:.1f} | "
            f"{r['serverapp_s']:.2f} ({stages}) | {r['round_wall_s']:.1f} | "
            f"{r['server_peak_rss_mib']:.0f} |"
        )
    lines.append("")
    for label, f in fits.items():
        lines.append(
            f"- {label}: best fit a + c·{f['model']} (relative error {f['relative_error']:.1%}, "
            f"log-log slope {f['log_log_slope']:.2f}); at {TARGET:,} devices "
            f"≈ {f[f'at_{TARGET}']:.0f}"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohorts", default="100,300,1000")
    parser.add_argument("--all-cohorts", default="100,300")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    runs = Path(tempfile.mkdtemp(prefix="coordinator-"))
    rows = []
    for shares, cohorts in ((0.0, args.cohorts), (1.0, args.all_cohorts)):
        for cohort in (int(c) for c in cohorts.split(",") if c):
            rows.append(measure(cohort, shares, runs))
            print(json.dumps(rows[-1]), flush=True)
    fits = {}
    for label in ("derived", "all"):
        series = [r for r in rows if r["neighbours"] == label]
        if len(series) >= 2:
            fits[f"{label}: server CPU s"] = fit(series, "server_cpu_s")
            fits[f"{label}: ServerApp's SecAgg+ compute s"] = fit(series, "serverapp_s")
            for stage in series[-1]["serverapp_stages_s"]:
                for r in series:
                    r[f"stage_{stage}"] = max(r["serverapp_stages_s"].get(stage, 0.0), 1e-3)
                fits[f"{label}: {stage} s"] = fit(series, f"stage_{stage}")
            fits[f"{label}: server peak RSS MiB"] = fit(series, "server_peak_rss_mib")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_coordinator.json").write_text(
        json.dumps({"rows": rows, "fits": fits}, indent=1)
    )
    text = markdown(rows, fits)
    (args.out / "bench_coordinator.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
