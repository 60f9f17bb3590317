"""Benchmark: server optimizers side by side on the same released rounds of one finished run.

A ``blend`` device never reads the global adapter while it trains (its personal adapter is
its local-only model), so the run's sequence of released means — the clipped, noised mean
changes the server saw, kept under ``RUN_DIR/released/`` — is the same whatever the server
does with them. Each candidate server optimizer (``server/optimizer.py``) replays that
sequence from the run's initial shared tensors; then every device of the run reports, through
its own :meth:`client.federation.device.Device.held_out_report` (the same weight rule and local-only
baseline as in the run; a candidate may change the prior weight the rule starts from), what it
would serve with the candidate's global adapter, and the
run's newcomers (users who never joined) what they would get. No candidate costs privacy: all
of it is post-processing of the same released aggregates, at the run's ε.

    python -m benchmarks.server_step RUN_DIR [--users N] [--newcomers 20]

prints one row per candidate — among the users who trained: better than local-only, mean gain
over local-only (nats) and its ratio to the run's own optimizer, worse by more than 0.5 %;
newcomers below the base model — and the minutes it took, and writes ``bench_server_step.json``
and ``.md`` under ``--out`` (default: RUN_DIR).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.federation.device import Device
from client.store import open_beside_key
from common.config import RunConfig, ServerConfig
from server import checkpoint
from server.optimizer import ServerStep
from server.outputs import trained, versus_local
from simulations.cold_start import newcomer_devices

# Candidates beside the run's own settings: a smaller and a larger server step, the devices'
# prior weight, server momentum at the same long-run step (0.9: ten times the step, so a tenth
# of the rate), and the two adaptive optimizers of Reddi et al. (ICLR'21) on the noised mean
# (their rates are per-coordinate steps, the update being normalised: about the size of the
# run's global B entries over ten rounds). ``mix_prior`` is the weight the devices start from.
CANDIDATES: dict[str, dict[str, Any]] = {
    "sgd ×0.5": {"optimizer": "sgd", "learning_rate": "x0.5"},
    "sgd ×1.5": {"optimizer": "sgd", "learning_rate": "x1.5"},
    "prior 1": {"mix_prior": 1.0},
    "momentum 0.9": {"optimizer": "momentum", "momentum": 0.9, "learning_rate": "x0.1"},
    "adam 0.01": {"optimizer": "adam", "learning_rate": 0.01},
    "yogi 0.01": {"optimizer": "yogi", "learning_rate": 0.01},
}


class ReplayError(ValueError):
    """A run the benchmark cannot replay (not ``blend``, no released rounds, no devices)."""


def candidate_config(run: ServerConfig, spec: dict[str, Any]) -> ServerConfig:
    """A candidate's ``server.*`` settings; a learning rate ``"xK"`` is K times the run's
    (``mix_prior`` is the devices' side, not the server's: :func:`candidates_of` reads it)."""
    lr = spec.get("learning_rate", run.learning_rate)
    if isinstance(lr, str) and lr.startswith("x"):
        lr = run.learning_rate * float(lr[1:])
    server = {k: v for k, v in spec.items() if k != "mix_prior"}
    return replace(run, **{**server, "learning_rate": float(lr)})


def released_means(run_dir: Path) -> list[dict[str, np.ndarray]]:
    """The run's released mean changes, in round order.

    Raises:
        ReplayError: If the run kept none (a run from before ``released/`` was written).
    """
    files = sorted((Path(run_dir) / checkpoint.RELEASED).glob("round-*.npz"))
    if not files:
        raise ReplayError(f"{run_dir / checkpoint.RELEASED} holds no released round to replay")
    means = []
    for path in files:
        with np.load(path, allow_pickle=False) as data:
            means.append({n: np.array(data[n], np.float64) for n in data.files})
    return means


def displacement(cfg: ServerConfig, means: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Where ``cfg``'s optimizer moves the shared tensors over ``means``. Every optimizer
    here moves them by an amount that does not depend on where they start, so a candidate's
    tensors are the run's final ones minus the run's displacement plus the candidate's."""
    step = ServerStep.of(cfg)
    x = {n: np.zeros_like(a) for n, a in means[0].items()}
    for mean in means:
        x = {n: a.astype(np.float64) for n, a in step.step(x, mean).items()}
    return x


def candidates_of(
    run: ServerConfig, means: list[dict[str, np.ndarray]], specs: dict[str, dict[str, Any]]
) -> dict[str, tuple[ServerConfig, dict[str, np.ndarray], float | None]]:
    """Each candidate's settings, its shift of the run's final shared tensors and the prior
    weight its devices start from (``None``: the run's; the run's own optimizer first, with
    no shift)."""
    own = displacement(run, means)
    out = {f"run: {describe(run)}": (run, {n: np.zeros_like(a) for n, a in own.items()}, None)}
    for spec in specs.values():
        cfg = candidate_config(run, spec)
        moved = displacement(cfg, means)
        prior = spec.get("mix_prior")
        name = describe(cfg) + ("" if prior is None else f", prior {prior:g}")
        out[name] = (cfg, {n: moved[n] - own[n] for n in own}, prior)
    return out


def describe(cfg: ServerConfig) -> str:
    """``sgd lr 10``, ``momentum 0.9 lr 2.5``, ``adam lr 0.01``."""
    if cfg.optimizer == "sgd":
        return f"sgd lr {cfg.learning_rate:g}"
    if cfg.optimizer == "momentum":
        return f"momentum {cfg.momentum:g} lr {cfg.learning_rate:g}"
    return f"{cfg.optimizer} lr {cfg.learning_rate:g} (β₁ {cfg.momentum:g}, β₂ {cfg.beta2:g})"


def shifted(
    final: dict[str, torch.Tensor], shift: dict[str, np.ndarray]
) -> dict[str, torch.Tensor]:
    """The run's final global tensors moved by a candidate's shift (float32)."""
    out = dict(final)
    for name, delta in shift.items():
        out[name] = (final[name].double() + torch.from_numpy(delta)).float()
    return out


def run_devices(run_dir: Path, cfg: RunConfig, users: int | None) -> Iterator[Device]:
    """The run's simulated devices, opened one at a time (each store closed after use).

    Raises:
        ReplayError: If the run has no device.
    """
    dirs = sorted(p for p in (Path(run_dir) / "devices").iterdir() if p.is_dir())
    if not dirs:
        raise ReplayError(f"{run_dir / 'devices'} holds no device")
    for d in dirs[:users]:
        store = open_beside_key(d)
        try:
            yield Device(cfg, store=store, num_partitions=len(dirs))
        finally:
            store.close()


def measure(
    run_dir: Path,
    *,
    users: int | None = None,
    newcomers: int = 20,
    specs: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Every candidate's rows for the run's devices and newcomers, and its summary."""
    t0 = time.perf_counter()
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    cfg = RunConfig.from_dict(summary["config"])
    if cfg.strategy != "blend":
        raise ReplayError(
            f"the run's strategy is {cfg.strategy}: only blend's devices train without reading "
            "the global adapter, so only a blend run's released rounds replay exactly"
        )
    means = released_means(run_dir)
    cands = candidates_of(cfg.server, means, CANDIDATES if specs is None else specs)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in cands}
    for device in run_devices(run_dir, cfg, users):
        final = device.state.load_global()
        if final is None:
            continue
        for name, (_, shift, prior) in cands.items():
            report = device.held_out_report(shifted(final, shift), mix_prior=prior)
            rows[name].append(
                {
                    **report,
                    "rounds_trained": device.state.meta.rounds_trained,
                    "n_train": len(device.train_examples),
                }
            )
    cold: dict[str, list[dict[str, float]]] = {name: [] for name in cands}
    if newcomers:
        released = {
            n: torch.from_numpy(np.asarray(a))
            for n, a in zip(*_released_shared(run_dir), strict=True)
        }
        with newcomer_devices(cfg, newcomers) as devices:
            for device in devices:
                for name, (_, shift, _) in cands.items():
                    cold[name].append(device.newcomer_losses(shifted(released, shift)))
    results = [
        {
            "candidate": name,
            "server": asdict(server),
            "mix_prior": cfg.personalization.mix_prior if prior is None else prior,
            **_summarise(rows[name], cold[name]),
        }
        for name, (server, _, prior) in cands.items()
    ]
    reference = results[0]["mean_gain_nats"]
    for result in results:
        gain = result["mean_gain_nats"]
        result["gain_ratio_to_run"] = gain / reference if reference else None
    return {
        "run": str(run_dir),
        "rounds_replayed": len(means),
        "users": len(rows[next(iter(rows))]),
        "newcomers": newcomers,
        "minutes": (time.perf_counter() - t0) / 60,
        "candidates": results,
        "rows": rows,
    }


def _released_shared(run_dir: Path) -> tuple[list[str], list[np.ndarray]]:
    state = checkpoint.load(run_dir)
    if state is None:
        raise ReplayError(f"{run_dir} has no checkpoint of the released shared tensors")
    return state.shared_names, state.shared


def _summarise(rows: list[dict[str, Any]], cold: list[dict[str, float]]) -> dict[str, Any]:
    versus = versus_local(rows) or {}
    weights = [r["mix_weight"] for r in rows if trained(r) and "mix_weight" in r]
    return {
        "trained": versus.get("users", 0),
        "never_trained": versus.get("never_trained", 0),
        "better_than_local": versus.get("win_vs_local"),
        "no_worse_than_local": versus.get("no_worse_than_local"),
        "mean_gain_nats": versus.get("mean_gain_nats"),
        "worse": versus.get("worse"),
        "weights": {f"{w:g}": weights.count(w) for w in sorted(set(weights))},
        "newcomers_below_base": (
            sum(c["global_loss"] < c["base_loss"] for c in cold) / len(cold) if cold else None
        ),
        "newcomer_gain_nats": (
            statistics.fmean(c["base_loss"] - c["global_loss"] for c in cold) if cold else None
        ),
    }


def table(result: dict[str, Any]) -> str:
    """The candidates as a Markdown table."""
    lines = [
        f"Replayed {result['rounds_replayed']} released rounds of {result['run']} for "
        f"{result['users']} devices and {result['newcomers']} newcomers in "
        f"{result['minutes']:.1f} min (one run, same noise for every candidate).",
        "",
        "| server optimizer | devices' prior weight | better than local-only | mean gain (nats) "
        "| × run's | worse | weights served | newcomers below base | newcomer gain (nats) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["candidates"]:
        ratio = c["gain_ratio_to_run"]
        lines.append(
            f"| {c['candidate']} | {c['mix_prior']:g} "
            f"| {_pct(c['better_than_local'])} of {c['trained']} "
            f"| {_num(c['mean_gain_nats'])} | {'' if ratio is None else f'{ratio:.2f}'} "
            f"| {c['worse']} | {', '.join(f'{w}: {n}' for w, n in c['weights'].items())} "
            f"| {_pct(c['newcomers_below_base'])} | {_num(c['newcomer_gain_nats'])} |"
        )
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--users", type=int, default=None, help="only the first N devices")
    parser.add_argument("--newcomers", type=int, default=20, help="users who never joined")
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_DIR")
    args = parser.parse_args()
    try:
        result = measure(args.run_dir, users=args.users, newcomers=args.newcomers)
    except (ReplayError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    out = args.out or args.run_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_server_step.json").write_text(json.dumps(result, indent=1))
    (out / "bench_server_step.md").write_text(table(result) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
