"""Privacy–utility sweep: the same federation at user-level ε ∈ {∞, 8, 2, 1}.

For each target ε the noise multiplier σ comes from the accountant (the smallest σ whose
``rounds`` rounds at sampling rate q stay within ε); ε = ∞ clips but adds no noise. Devices
account with verifiable sampling (the simulation's server samples uniformly) and cap at the
target, so every number in the table comes from the run's own accountants.

Each row also has what the users got: the served models against the local-only baseline
(shares no worse and better) and, when the preset measures them, the released model on users
who never joined. ``python -m benchmarks.sweep --preset population --users 200 --per-round 40
--rounds 10 --eval-fraction 1`` (the curve in docs/results.md) writes ``sweep.md``,
``sweep.json`` and ``sweep.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from common.config import parse_set
from common.dp.accounting import noise_for_target
from simulations.report import row_from_run
from simulations.simulate import simulate

EPSILONS = (math.inf, 8.0, 2.0, 1.0)


def sweep(
    preset: str,
    out: Path,
    *,
    users: int,
    per_round: int,
    rounds: int,
    delta: float = 1e-5,
    eval_fraction: float = 0.2,
    epsilons: tuple[float, ...] = EPSILONS,
    extra: dict | None = None,
    reuse: dict[float, Path] | None = None,
) -> list[dict]:
    """Run one simulation per target ε and return one row per run, ε descending; ``reuse``
    maps a target ε to a finished run of the same federation (its row is read, not re-run)."""
    q = per_round / users
    rows = [row_from_run(eps, _run_sigma(d), d) for eps, d in (reuse or {}).items()]
    for eps in epsilons:
        if eps in (reuse or {}):
            continue
        overrides = {
            "data.num-users": users,
            "num-server-rounds": rounds,
            "fraction-train": q,
            "fraction-evaluate": eval_fraction,
            "privacy.delta": delta,
            "privacy.verifiable-sampling": True,
            **(extra or {}),
        }
        if math.isinf(eps):
            overrides.update({"dp.noise-mode": "none", "privacy.epsilon-cap": 1e9})
            sigma = 0.0
        else:
            sigma = noise_for_target(target_epsilon=eps, delta=delta, sample_rate=q, steps=rounds)
            overrides.update({"dp.noise-multiplier": sigma, "privacy.epsilon-cap": eps})
        name = f"{preset}-eps-{'inf' if math.isinf(eps) else f'{eps:g}'}"
        run_dir = simulate(preset, overrides, out, run_name=name)
        rows.append(row_from_run(eps, sigma, run_dir))
        rows.sort(key=lambda r: -r["target_epsilon"])
        _write(out, preset, users, per_round, rounds, rows)
    rows.sort(key=lambda r: -r["target_epsilon"])
    _write(out, preset, users, per_round, rounds, rows)
    return rows


def _run_sigma(run_dir: Path) -> float:
    """The noise multiplier a finished run used (0 without noise)."""
    dp = json.loads((Path(run_dir) / "summary.json").read_text())["config"]["dp"]
    return 0.0 if dp["noise_mode"] == "none" else float(dp["noise_multiplier"])


def _parse_epsilon(text: str) -> float:
    return math.inf if text.strip().lower() in ("inf", "∞") else float(text)


def _fmt(x: float | None) -> str:
    if x is None:
        return "—"
    return "∞" if math.isinf(x) else f"{x:.3g}"


def _share(x: float | None) -> str:
    return "—" if x is None else f"{x:.0%}"


def _write(
    out: Path, preset: str, users: int, per_round: int, rounds: int, rows: list[dict]
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(rows, indent=2, default=str))
    lines = [
        f"Privacy–utility sweep: preset `{preset}`, {users} users, {per_round} per round, "
        f"{rounds} rounds. Losses: mean over the users evaluated in the last round.",
        "",
        "| target ε | σ | ε (RDP) | ε (PRV) | max device ε | base loss | global loss "
        "| personal loss | local-only loss | no worse than local | better than local "
        "| newcomers: released vs base | newcomers below base | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        newcomers = (
            f"{r['newcomer_global_loss']:.4f} vs {r['newcomer_base_loss']:.4f}"
            if r.get("newcomer_global_loss") is not None
            else "—"
        )
        lines.append(
            f"| {_fmt(r['target_epsilon'])} | {r['noise_multiplier']:.3f} | "
            f"{_fmt(r['epsilon_rdp'])} | {_fmt(r['epsilon_prv'])} | "
            f"{_fmt(r['max_device_user_epsilon'])} | {r['base_loss']:.4f} | "
            f"{r['global_loss']:.4f} | {r['personal_loss']:.4f} | "
            f"{_fmt(r.get('local_only_loss'))} | {_share(r.get('no_worse_than_local'))} | "
            f"{_share(r.get('win_vs_local'))} | {newcomers} | "
            f"{_share(r.get('newcomers_below_base'))} | {r.get('minutes', 0):.1f} |"
        )
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [_fmt(r["target_epsilon"]) for r in rows]
    ax.plot(labels, [r["global_loss"] for r in rows], "o-", label="global (cold start)")
    ax.plot(labels, [r["personal_loss"] for r in rows], "s-", label="served (personal)")
    if all(r.get("local_only_loss") is not None for r in rows):
        ax.plot(labels, [r["local_only_loss"] for r in rows], "^--", label="local-only")
    ax.axhline(rows[0]["base_loss"], color="gray", ls=":", label="base model")
    ax.set_xlabel("user-level ε (δ = 1e-5)")
    ax.set_ylabel("held-out loss (mean over users)")
    ax.set_title(f"Privacy–utility, {preset}: {users} users, {per_round}/round, {rounds} rounds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=110)
    plt.close(fig)


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--per-round", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--eval-fraction", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--set", action="append", default=[], help="extra key=value overrides")
    parser.add_argument(
        "--epsilons", default="inf,8,2,1", help="target user-level ε list (default inf,8,2,1)"
    )
    parser.add_argument(
        "--reuse",
        action="append",
        default=[],
        metavar="EPS=RUN_DIR",
        help="take the row for EPS from a finished run of the same federation",
    )
    args = parser.parse_args()
    reuse = {}
    for item in args.reuse:
        eps, _, run_dir = item.partition("=")
        reuse[_parse_epsilon(eps)] = Path(run_dir)
    sweep(
        args.preset,
        args.out.resolve(),
        users=args.users,
        per_round=args.per_round,
        rounds=args.rounds,
        eval_fraction=args.eval_fraction,
        epsilons=tuple(_parse_epsilon(e) for e in args.epsilons.split(",")),
        extra=parse_set(args.set),
        reuse=reuse,
    )
    print((args.out / "sweep.md").read_text())


if __name__ == "__main__":
    main()
