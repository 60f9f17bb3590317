"""``fedpersona report RUN_DIR``: a self-contained HTML page (+ Markdown) with PNG plots.

Reads ``summary.json`` and ``evaluation.json`` (running :func:`simulations.evaluate.
evaluate_run` first if it is missing) and writes into ``RUN_DIR/report/``:
``report.html`` (PNGs embedded as data URIs: one file to mail or open offline),
``report.md`` and the PNGs — per-round losses, personal vs global per user, ε over rounds and
per device, the ε–utility curve (with ``--sweep`` results), cold-start and drift curves, the
membership-inference ROC, and the federated A/B results when the run had them.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_bytes
from simulations.plots import (
    fmt,
    plot_ab,
    plot_cold_start,
    plot_drift,
    plot_epsilon,
    plot_mia,
    plot_rounds,
    plot_sweep,
    plot_users,
)


def row_from_run(target_epsilon: float, sigma: float, run_dir: Path) -> dict:
    """One table row from a finished run: its accountants' ε and its last round's losses
    (the users evaluated in that round, all under the final model)."""
    s = json.loads((Path(run_dir) / "summary.json").read_text())
    user = s["privacy"]["user_level"]
    last = s["rounds"][-1]
    return {
        "target_epsilon": target_epsilon,
        "noise_multiplier": sigma,
        "epsilon_rdp": user.get("epsilon_rdp", math.inf),
        "epsilon_prv": user.get("epsilon_prv", math.inf),
        "max_device_user_epsilon": max((c["user_epsilon"] for c in s["clients"]), default=0.0),
        "base_loss": last["base_loss"],
        "global_loss": last["global_loss"],
        "personal_loss": last["personal_loss"],
        "win_rate": last["win_rate"],
        "evaluated": last["evaluated"],
        "declined": sum(r.get("declined", 0) for r in s["rounds"]),
        "local_only_loss": (s.get("versus_local") or {}).get("mean_local_only_loss"),
        "no_worse_than_local": (s.get("versus_local") or {}).get("no_worse_than_local"),
        "win_vs_local": (s.get("versus_local") or {}).get("win_vs_local"),
        "newcomers_below_base": (s.get("cold_start_users") or {}).get("below_base"),
        "newcomer_global_loss": (s.get("cold_start_users") or {}).get("global_loss"),
        "newcomer_base_loss": (s.get("cold_start_users") or {}).get("base_loss"),
        "minutes": s["timings"]["total_s"] / 60,
        "run_dir": str(run_dir),
    }


BY_DATA_COLUMNS = (
    ("users", "users"),
    ("training examples", "examples"),
    ("base", "base_loss"),
    ("global", "global_loss"),
    ("served", "personal_loss"),
    ("local-only", "local_only_loss"),
    ("better than local-only", "better_than_local"),
    ("no worse", "no_worse_than_local"),
)


def by_data_rows(summary: dict) -> list[list[str]]:
    """The summary's users grouped by training examples, as table cells (header first)."""
    cells = [[name for name, _ in BY_DATA_COLUMNS]]
    for g in summary.get("by_data") or []:
        row = []
        for _, key in BY_DATA_COLUMNS:
            if key == "users":
                row.append(f"{g['group']}: {g['users']}")
            elif key == "examples":
                row.append(f"{g['n_train_min']}–{g['n_train_max']}")
            elif key in ("better_than_local", "no_worse_than_local"):
                row.append("—" if g[key] is None else f"{g[key]:.0%}")
            else:
                row.append("—" if g[key] is None else f"{g[key]:.3f}")
        cells.append(row)
    return cells


def build_report(
    run_dir: Path,
    *,
    sweep: Path | None = None,
    compare: list[Path] | None = None,
    evaluate: bool = True,
) -> Path:
    """Write ``RUN_DIR/report/{report.html, report.md, *.png}``; return the HTML path.

    Args:
        run_dir: The run to report on.
        sweep: ``sweep.json`` of ``benchmarks.sweep`` for the ε–utility plot.
        compare: Other runs of the same setup at other noise levels (ε–utility plot).
        evaluate: Run the evaluation if ``evaluation.json`` is missing.
    """
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    ev_path = run_dir / "evaluation.json"
    if not ev_path.exists():
        if not evaluate:
            raise FileNotFoundError(f"{ev_path} missing; run `python -m simulations.evaluate`")
        from simulations.evaluate import evaluate_run

        evaluate_run(run_dir)
    ev = json.loads(ev_path.read_text())
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    figures = _figures(run_dir, summary, ev, out, sweep=sweep, compare=compare)
    page = _Page(
        title=f"fedpersona report — {run_dir.name}",
        summary=summary,
        ev=ev,
        facts=_facts(summary, ev),
        groups=by_data_rows(summary),
        figures=figures,
    )
    atomic_write_bytes(out / "report.md", _markdown(page))
    atomic_write_bytes(out / "report.html", _html(page))
    return out / "report.html"


@dataclass
class _Page:
    """What both forms of the report show."""

    title: str
    summary: dict[str, Any]  # summary.json
    ev: dict[str, Any]  # evaluation.json
    facts: list[str]  # one line each
    groups: list[list[str]]  # who gains, by amount of data (header row first)
    figures: list[tuple[str, Path]]  # (caption, PNG)


def _figures(
    run_dir: Path,
    summary: dict[str, Any],
    ev: dict[str, Any],
    out: Path,
    *,
    sweep: Path | None,
    compare: list[Path] | None,
) -> list[tuple[str, Path]]:
    """The report's plots, drawn into ``out``: ``(caption, PNG path)`` each."""
    figures = [
        ("Losses per round", plot_rounds(summary, out)),
        ("Personal vs global, per user", plot_users(summary, out)),
        ("Privacy budget", plot_epsilon(summary, out)),
        ("Cold start", plot_cold_start(ev, out)),
        ("Drift recovery", plot_drift(ev, out)),
        ("Membership inference", plot_mia(ev, out)),
    ]
    rows = json.loads(Path(sweep).read_text()) if sweep is not None else []
    if compare:
        for d in [run_dir, *compare]:
            dp = json.loads((Path(d) / "summary.json").read_text())["config"]["dp"]
            rows.append(row_from_run(0.0, dp["noise_multiplier"], Path(d)))
    if rows:
        figures.append(("Privacy–utility", plot_sweep(rows, out)))
    ab = summary.get("ab_test")
    if ab and ab.get("n_a", 0) and ab.get("n_b", 0):
        figures.append(("Federated A/B test", plot_ab(ab, out)))
    return figures


def _facts(summary: dict[str, Any], ev: dict[str, Any]) -> list[str]:
    """The run's facts in one line each: setup and scores, what the ε assumes, canaries."""
    p = ev["personalization"]
    facts = [
        f"strategy `{summary['strategy']}`, {len(summary['clients'])} users, "
        f"{len(summary['rounds'])} rounds; win_rate {p['win_rate']:.3f}, ppl_gain "
        f"{p['ppl_gain']:.3f}, attribution chance level {p['attribution_chance']:.3f}, "
        f"style chance level {ev['generation']['style_chance']:.3f}",
        f"privacy: {summary['privacy'].get('user_level', {}).get('assumes', '')}",
    ]
    if summary.get("client_audit"):  # the user-level audit, beside the accountant's ε
        from simulations.client_audit import describe

        facts.append(describe(summary["client_audit"]))
    if ev.get("canaries"):
        c = ev["canaries"]
        facts.append(
            f"canary exposure (max {c['max_exposure']:.1f} bits): global "
            f"{[round(x, 2) for x in c['global']]}; "
            + "; ".join(
                f"{k} {[round(x, 2) for x in v]}" for k, v in c.items() if k.startswith("personal")
            )
        )
    return facts


def _markdown(page: _Page) -> bytes:
    """``report.md``: the seed targets, the facts, who gains by amount of data, the plots."""
    title, summary, ev, facts, groups = page.title, page.summary, page.ev, page.facts, page.groups
    table = ["| metric | seed target | measured | meets |", "|---|---|---|---|"]
    for row in ev["seed_targets"]:
        table.append(
            f"| {row['metric']} | {row['target']} | {fmt(row['measured'])} | {fmt(row['meets'])} |"
        )
    md = [f"# {title}", "", *table, "", *[f"- {f}" for f in facts], ""]
    if len(groups) > 1:
        md += ["## Who gains from joining, by how much data they have", ""]
        md += ["| " + " | ".join(r) + " |" for r in groups[:1]]
        md += ["|" + "---|" * len(groups[0])]
        md += ["| " + " | ".join(r) + " |" for r in groups[1:]]
        md += ["", summary.get("headline", ""), ""]
    md += [f"## {name}\n\n![{name}]({path.name})\n" for name, path in page.figures]
    return "\n".join(md).encode()


def _html(page: _Page) -> bytes:
    """``report.html``: the same as ``report.md``, one self-contained page (plots inline)."""
    title, summary, ev, facts, groups = page.title, page.summary, page.ev, page.facts, page.groups

    def img(path: Path) -> str:
        data = base64.b64encode(path.read_bytes()).decode()
        return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'

    rows_html = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(fmt(row[k]))}</td>"
            for k in ("metric", "target", "measured", "meets")
        )
        + "</tr>"
        for row in ev["seed_targets"]
    )
    by_data_html = ""
    if len(groups) > 1:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in groups[0])
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in groups[1:]
        )
        by_data_html = (
            f"<h2>Who gains from joining, by how much data they have</h2><table><tr>{head}</tr>"
            f"{body}</table><p>{html.escape(summary.get('headline', ''))}</p>"
        )
    text = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px}}
.grid{{display:grid;grid-template-columns:1fr 1fr;gap:16px}}img{{max-width:100%}}</style>
</head><body><h1>{html.escape(title)}</h1>
<table><tr><th>metric</th><th>seed target</th><th>measured</th><th>meets</th></tr>{rows_html}
</table><ul>{"".join(f"<li>{html.escape(f)}</li>" for f in facts)}</ul>
{by_data_html}
<div class="grid">{
        "".join(
            f"<figure>{img(p)}<figcaption>{html.escape(n)}</figcaption></figure>"
            for n, p in page.figures
        )
    }</div></body></html>"""
    return text.encode()
