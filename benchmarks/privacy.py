"""Benchmark: what privacy costs in time, measured in one run.

1. Round time of (SecAgg+ + distributed DP) vs plain FedAvg: the same federation (preset,
   users, seed) run both ways; rounds after the first (Ray start-up, model loading) averaged.
2. One Opacus DP-SGD step vs one plain step on the same model, batch and LoRA tensors.

``python -m benchmarks.privacy --preset tiny --model smollm2`` prints JSON and writes
``bench_privacy.json`` / ``bench_privacy.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from simulations.simulate import simulate

PLAIN = {"secagg.enabled": False, "dp.noise-mode": "none", "dp.clip-norm": 0.0}
# The cap is lifted so that every round runs: at the default σ a device's ledger (cap 1.0)
# declines from round 4 on, and a declined round is not a round-time measurement.
PRIVATE = {"secagg.enabled": True, "dp.noise-mode": "distributed", "privacy.epsilon-cap": 100.0}


def round_times(preset: str, out: Path, rounds: int) -> dict:
    """Mean seconds per round (after round 1) with and without SecAgg+ + DP."""
    result = {}
    for name, overrides in (("plain", PLAIN), ("secagg_dp", PRIVATE)):
        run_dir = simulate(
            preset, {**overrides, "num-server-rounds": rounds}, out, run_name=f"bench-{name}"
        )
        summary = json.loads((run_dir / "summary.json").read_text())
        rounds_ = summary["rounds"]
        if any(r.get("declined") or not r.get("released", True) for r in rounds_):
            raise RuntimeError(f"{name}: a round was declined or discarded; not a timing")
        result[name] = statistics.fmean(r["seconds"] for r in rounds_[1:])
    result["ratio"] = result["secagg_dp"] / result["plain"]
    return result


def step_times(model_name: str, steps: int) -> dict:
    """Seconds per plain AdamW step vs per Opacus DP-SGD step (same model and batch size)."""
    from client.federation.device import Device
    from client.store import LocalStore
    from common.config import parse_run_config
    from common.crypto import Secret, create_key_file
    from common.train import train_steps, train_steps_dp

    cfg = parse_run_config({"model.name": model_name, "data.num-users": 8})
    tmp = Path(tempfile.mkdtemp())
    store = LocalStore.create(tmp / "dev", Secret(key_file=create_key_file(tmp / "dev.key")))
    device = Device.simulated(cfg, store=store, partition_id=0, num_partitions=8)
    rt = device.rt
    common = dict(batch_size=4, learning_rate=1e-3, seed=0, pad_id=device.pad_id)
    # Warm-up both paths once, then time.
    train_steps(rt.model, rt.trainable_names, device.train_set, steps=1, **common)
    train_steps_dp(
        rt.model,
        rt.trainable_names,
        device.train_set,
        steps=1,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        **common,
    )
    t0 = time.perf_counter()
    train_steps(rt.model, rt.trainable_names, device.train_set, steps=steps, **common)
    plain = (time.perf_counter() - t0) / steps
    t0 = time.perf_counter()
    train_steps_dp(
        rt.model,
        rt.trainable_names,
        device.train_set,
        steps=steps,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        **common,
    )
    dp = (time.perf_counter() - t0) / steps
    store.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "model": model_name,
        "plain_step_s": plain,
        "opacus_step_s": dp,
        "ratio": dp / plain,
        "note": "DP steps use Poisson batches of expected size 4; plain steps fixed size 4",
    }


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "round_time": round_times(args.preset, out, args.rounds),
        "dp_sgd_step": step_times(args.model, args.steps),
    }
    (out / "bench_privacy.json").write_text(json.dumps(result, indent=2))
    rt, st = result["round_time"], result["dp_sgd_step"]
    (out / "bench_privacy.md").write_text(
        "| measure | private | plain | ratio |\n|---|---|---|---|\n"
        f"| round time, {args.preset} preset (s) | {rt['secagg_dp']:.2f} (SecAgg+ + DP) | "
        f"{rt['plain']:.2f} (FedAvg) | {rt['ratio']:.2f} |\n"
        f"| train step, {st['model']} (s) | {st['opacus_step_s']:.3f} (Opacus) | "
        f"{st['plain_step_s']:.3f} | {st['ratio']:.2f} |\n"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
