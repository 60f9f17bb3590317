"""Per-user, per-weight held-out losses of a finished ``blend`` run, and what each weight rule
would have served.

``python -m simulations.mix_weights RUN_DIR [--users N]`` opens each simulated device's store
in ``RUN_DIR/devices/``, composes its personal + w·global model for every w in
``MIX_WEIGHTS`` and writes ``RUN_DIR/mix_weights.json`` (each user's per-example losses on the
selection and test halves, the base model's and the global adapter's alone, and each
example's reply tokens); it prints,
for fixed weights and for :func:`~common.personalization.blend.pick_mix_weight` at the run's
prior, the share of users whose served model is no worse than the local-only one (within
0.5 %) and strictly better on the test half. About 9 s per user on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from client.federation.device import Device
from client.store import open_beside_key
from common.config import RunConfig
from common.lora import load_lora_tensors
from common.personalization.blend import MIX_WEIGHTS, pick_mix_weight
from server.outputs import versus_local


def run_config(run_dir: Path, max_test_samples: int | None = None) -> RunConfig:
    """The run config a finished run recorded in its ``summary.json`` (with up to
    ``max_test_samples`` examples in each held-out half, if given)."""
    config = json.loads((run_dir / "summary.json").read_text())["config"]
    if max_test_samples is not None:
        config["data"]["max_test_samples"] = max_test_samples
    return RunConfig.from_dict(config)


def measure(run_dir: Path, cfg: RunConfig, users: int | None = None) -> list[dict]:
    """Each device's per-example losses, per weight and half (see the module docstring)."""
    rows = []
    dirs = sorted(p for p in (run_dir / "devices").iterdir() if p.is_dir())
    for d in dirs[:users]:
        store = open_beside_key(d)
        try:
            device = Device(cfg, store=store, num_partitions=len(dirs))
            g, p = device.state.load_global(), device.state.load_personal()
            if g is None or p is None:
                continue
            row: dict = {"user": d.name}
            for half, examples in (("select", device.select_set), ("test", device.test_set)):
                held_out = device._held_out(examples)
                with device.rt.model.disable_adapter():
                    losses = {"base": held_out.per_example()}
                # Reply tokens per example: a run's summary weights each loss by them.
                losses["tokens"] = [c for batch in held_out.counts for c in batch]
                load_lora_tensors(device.rt.model, device.global_model(g))
                losses["global"] = held_out.per_example()
                for w in MIX_WEIGHTS:
                    load_lora_tensors(device.rt.model, device.served(g, p, mix_weight=w))
                    losses[str(w)] = held_out.per_example()
                row[half] = losses
            rows.append(row)
        finally:
            store.close()
    return rows


def mean_loss(half: dict, weight: float | str) -> float:
    """The loss a run's summary reports on ``half`` at ``weight``: per reply token (files
    written before the token counts were kept: per example)."""
    losses = half[str(weight)]
    tokens = half.get("tokens")
    if tokens is None:
        return statistics.fmean(losses)
    return sum(x * n for x, n in zip(losses, tokens, strict=True)) / sum(tokens)


def shares(rows: list[dict], picks: list[float]) -> tuple[float, float]:
    """(no worse than local-only, better than local-only) on the test half for ``picks``, as
    the run's summary counts them (:func:`server.outputs.versus_local`; token-weighted, so a
    replay of the run's own picks reproduces its summary)."""
    served = [
        {
            "personal_loss": mean_loss(row["test"], w),
            "local_only_loss": mean_loss(row["test"], "0.0"),
        }
        for row, w in zip(rows, picks, strict=True)
    ]
    result = versus_local(served)
    if result is None:
        raise ValueError("no user to compare")
    return result["no_worse_than_local"], result["win_vs_local"]


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--users", type=int, default=None, help="only the first N devices")
    parser.add_argument(
        "--max-test-samples",
        type=int,
        default=None,
        help="examples per held-out half (default: the run's data.max-test-samples); the "
        "held-out slice never trained, so a larger one only measures more precisely",
    )
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/mix_weights.json")
    args = parser.parse_args()
    cfg = run_config(args.run_dir, args.max_test_samples)
    rows = measure(args.run_dir, cfg, args.users)
    if not rows:
        raise SystemExit(f"no device in {args.run_dir / 'devices'} holds global and personal state")
    (args.out or args.run_dir / "mix_weights.json").write_text(json.dumps(rows))
    prior = cfg.personalization.mix_prior
    print(f"{len(rows)} users; no worse / better than local-only on the test half")
    for w in MIX_WEIGHTS:
        print(f"  fixed w = {w:g}: {shares(rows, [w] * len(rows))}")
    picks = [
        pick_mix_weight(
            lambda w, r=r: r["select"][str(w)],
            prior=prior,
            base=r["select"]["base"],
            global_alone=r["select"]["global"],
        )
        for r in rows
    ]
    print(f"  pick_mix_weight (prior {prior:g}): {shares(rows, picks)}")


if __name__ == "__main__":
    main()
