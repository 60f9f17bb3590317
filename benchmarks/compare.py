"""Compare the personalization strategies on one preset: same seed, same users.

``python -m benchmarks.compare --preset quick --out runs/compare`` runs one simulation per
strategy, one after another, and writes ``comparison.md`` and ``comparison.json`` with base /
global / personal loss, the local-only baseline (what each user could train alone with the
same compute, when the preset measures it) and the shares of users no worse / better than
it, win rate, ppl gain and wall-clock minutes per strategy.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common.config import STRATEGIES, parse_set
from simulations.simulate import simulate


def compare(
    preset: str,
    out: Path,
    strategies: tuple[str, ...] = STRATEGIES,
    extra: dict | None = None,
) -> list[dict]:
    """Run ``preset`` once per strategy (plus ``extra`` overrides); one row per strategy."""
    rows = []
    for strategy in strategies:
        t0 = time.time()
        run_dir = simulate(
            preset,
            {**(extra or {}), "personalization.strategy": strategy},
            out,
            run_name=f"{preset}-{strategy}",
        )
        minutes = (time.time() - t0) / 60
        s = json.loads((run_dir / "summary.json").read_text())
        rows.append(
            {
                "strategy": strategy,
                "users": len(s["clients"]),
                "rounds": len(s["rounds"]),
                "base_loss": s["base_loss"],
                "global_loss": s["global_loss"],
                "personal_loss": s["personal_loss"],
                "win_rate": s["win_rate"],
                "ppl_gain": s["ppl_gain"],
                "local_only_loss": (s.get("versus_local") or {}).get("mean_local_only_loss"),
                "no_worse_than_local": (s.get("versus_local") or {}).get("no_worse_than_local"),
                "win_vs_local": (s.get("versus_local") or {}).get("win_vs_local"),
                "minutes": minutes,
                "cold_start_model": s["cold_start_model"],
                "run_dir": str(run_dir),
            }
        )
        _write(out, preset, rows)
    return rows


def _write(out: Path, preset: str, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(rows, indent=2))
    lines = [
        f"| strategy ({preset}) | base loss | global loss | personal loss | local-only loss "
        "| no worse than local | better than local | win_rate | ppl_gain | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def opt(x: float | None, fmt: str) -> str:
        return "—" if x is None else format(x, fmt)

    for r in rows:
        lines.append(
            f"| `{r['strategy']}` | {r['base_loss']:.3f} | {r['global_loss']:.3f} | "
            f"{r['personal_loss']:.3f} | {opt(r.get('local_only_loss'), '.3f')} | "
            f"{opt(r.get('no_worse_than_local'), '.0%')} | {opt(r.get('win_vs_local'), '.0%')} "
            f"| {r['win_rate']:.2f} | {r['ppl_gain']:.3f} | {r['minutes']:.1f} |"
        )
    (out / "comparison.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--set", action="append", default=[], help="extra key=value overrides")
    args = parser.parse_args()
    compare(args.preset, args.out.resolve(), tuple(args.strategies.split(",")), parse_set(args.set))
    print((args.out / "comparison.md").read_text())


if __name__ == "__main__":
    main()
