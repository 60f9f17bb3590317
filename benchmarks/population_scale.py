"""Benchmark: a federation of 10,000 simulated users on this machine, memory flat in users.

Each population (default 1,000 and 10,000 users) runs the same federation with the tiny
model: about ``--per-round`` users sampled per round (one Flower node each, SecAgg+ and
distributed DP as always), a few rounds. Its users come through ``--corpus`` like any
per-user corpus: a JSONL written here of pseudo-users, each a run of consecutive speeches cut
from the Shakespeare text (real text, made-up users: this measures scale, not quality — the
quality results are docs/results.md's). A simulated device keeps its state in its encrypted
store on disk (``<run>/devices/<user>``) and is opened only when sampled, so what a run holds
in memory should not grow with the users who are not in the round.

    python -m benchmarks.population_scale [--users 1000,10000] [--per-round 100] [--rounds 3]
                                          [--out benchmarks/results]

prints, per population, the seconds per round, the peak RSS of all of the run's processes
(Ray workers included) and of the server's own, and the ratios of the largest population's
to the smallest's, measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.coordinator import ServerMeter
from benchmarks.scaling import PeakRSS
from common.data import load_users
from simulations.simulate import simulate

PAIRS_PER_USER = 12  # 9 to train on, 3 held out (data.test-fraction 0.2): above min-examples


def write_pseudo_users(path: Path, count: int) -> None:
    """``count`` users of ``PAIRS_PER_USER`` (prompt, reply) chat pairs each, as one JSONL of
    ``{"user", "messages"}`` records; user ``i`` takes the pairs from ``i·stride`` on, around
    the Shakespeare roles' training pairs (wrapping where the text runs out)."""
    pairs = [s for u in load_users(1) for s in u.train]
    stride = max(1, (len(pairs) - PAIRS_PER_USER) // count)
    with open(path, "w") as out:
        for i in range(count):
            for j in range(PAIRS_PER_USER):
                sample = pairs[(i * stride + j) % len(pairs)]
                messages = [
                    {"role": "user", "content": sample.prompt or "…"},
                    {"role": "assistant", "content": sample.reply},
                ]
                out.write(json.dumps({"user": f"u{i:05d}", "messages": messages}) + "\n")


def overrides(corpus: Path, users: int, per_round: int, rounds: int) -> dict:
    return {
        "data.corpus": str(corpus),
        "data.num-users": users,
        "data.max-test-samples": 2,
        "data.max-select-samples": 2,
        "train.local-steps": 2,
        "sampling": "poisson",
        "fraction-train": per_round / users,
        "fraction-evaluate": per_round / users,
        "evaluate-every": 0,
        "num-server-rounds": rounds,
        "privacy.epsilon-cap": 100.0,
        "dp.min-clients": per_round // 2,
    }


def measure(users: int, per_round: int, rounds: int, work: Path) -> dict:
    corpus = work / f"users-{users}.jsonl"
    write_pseudo_users(corpus, users)
    start = time.perf_counter()
    with PeakRSS() as everything, ServerMeter() as server:
        run = simulate(
            "tiny",
            overrides(corpus, users, per_round, rounds),
            work / "runs",
            run_name=f"population-{users}",
        )
    summary = json.loads((run / "summary.json").read_text())
    later = summary["rounds"][1:] or summary["rounds"]
    return {
        "users": users,
        "per_round": [r.get("updates") for r in summary["rounds"]],
        "seconds_per_round": statistics.fmean(r["seconds"] for r in later),
        "peak_rss_mib": everything.peak / 2**20,
        "server_peak_rss_mib": server.peak / 2**20,
        "wall_s": time.perf_counter() - start,
        "device_dirs": sum(1 for _ in (run / "devices").iterdir()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", default="1000,10000")
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="population-scale-"))
    rows = []
    for users in (int(u) for u in args.users.split(",")):
        rows.append(measure(users, args.per_round, args.rounds, work))
        print(json.dumps(rows[-1]), flush=True)
    small, large = rows[0], rows[-1]
    ratios = {
        "users": large["users"] / small["users"],
        "seconds_per_round": large["seconds_per_round"] / small["seconds_per_round"],
        "peak_rss": large["peak_rss_mib"] / small["peak_rss_mib"],
        "server_peak_rss": large["server_peak_rss_mib"] / small["server_peak_rss_mib"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"rows": rows, "ratios": ratios, "per_round": args.per_round, "rounds": args.rounds}
    (args.out / "bench_population_scale.json").write_text(json.dumps(result, indent=1))
    for row in rows:
        print(
            f"{row['users']:>6} users: {row['seconds_per_round']:.1f} s per round, peak RSS "
            f"{row['peak_rss_mib']:.0f} MiB (server {row['server_peak_rss_mib']:.0f} MiB), "
            f"{row['device_dirs']} device stores on disk, {row['wall_s'] / 60:.1f} min"
        )
    print(
        f"×{ratios['users']:.0f} users: ×{ratios['seconds_per_round']:.2f} seconds per round, "
        f"×{ratios['peak_rss']:.2f} peak RSS (server ×{ratios['server_peak_rss']:.2f})"
    )


if __name__ == "__main__":
    main()
