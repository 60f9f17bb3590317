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
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.atomic import atomic_write_bytes  # noqa: E402


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


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_rounds(summary: dict, out: Path) -> Path:
    """Held-out losses (base, global, personal) and training loss per round."""
    rounds = summary["rounds"]
    x = [r["round"] for r in rounds]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for key, style in (
        ("base_loss", ":"),
        ("global_loss", "--"),
        ("personal_loss", "-"),
        ("train_loss", "-."),
    ):
        y = [r.get(key) for r in rounds]
        if any(v is not None for v in y):
            ax.plot(x, y, style, marker="o", label=key.replace("_", " "))
    ax.set_xlabel("round")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Losses per round (mean over users)")
    ax.legend(fontsize=8)
    return _save(fig, out / "rounds.png")


def plot_users(summary: dict, out: Path) -> Path:
    """Each user's personal vs global held-out loss (below the diagonal = personal wins)."""
    clients = summary["clients"]
    g = [c["global_loss"] for c in clients]
    p = [c["personal_loss"] for c in clients]
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.scatter(g, p, s=30)
    lo, hi = min(g + p), max(g + p)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    for c in clients:
        ax.annotate(c["user"].split("@")[0], (c["global_loss"], c["personal_loss"]), fontsize=6)
    ax.set_xlabel("global (cold-start) loss")
    ax.set_ylabel("personal loss")
    ax.set_title(f"Per user: win_rate {summary['win_rate']:.2f}")
    return _save(fig, out / "users.png")


def plot_epsilon(summary: dict, out: Path) -> Path:
    """Federation ε per round (RDP, PRV) and each device's ledger ε against its cap."""
    rounds = summary["rounds"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    x = [r["round"] for r in rounds]
    for key, label in (("user_epsilon", "RDP"), ("user_epsilon_prv", "PRV")):
        y = [r.get(key) for r in rounds]
        if any(v is not None for v in y):
            a.plot(x, y, marker="o", label=label)
    cap = summary["privacy"].get("device_epsilon_cap")
    if cap:
        a.axhline(cap, color="r", ls="--", lw=0.8, label="device cap")
    a.set_xlabel("round")
    a.set_ylabel("user-level ε")
    a.set_title("Federation ε")
    a.legend(fontsize=8)
    clients = summary["clients"]
    b.bar(range(len(clients)), [c.get("user_epsilon", 0.0) for c in clients])
    if cap:
        b.axhline(cap, color="r", ls="--", lw=0.8)
    b.set_xticks(
        range(len(clients)), [c["user"].split("@")[0] for c in clients], rotation=60, fontsize=6
    )
    b.set_title("Each device's ledger ε")
    return _save(fig, out / "epsilon.png")


def plot_sweep(rows: list[dict], out: Path) -> Path:
    """ε–utility from ``benchmarks.sweep``'s ``sweep.json``: held-out losses against ε."""
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    finite = sorted(
        (
            r
            for r in rows
            if isinstance(r.get("epsilon_rdp"), int | float) and r["epsilon_rdp"] != float("inf")
        ),
        key=lambda r: r["epsilon_rdp"],
    )
    eps = [r["epsilon_rdp"] for r in finite]
    ax.plot(eps, [r["personal_loss"] for r in finite], marker="o", label="personal")
    ax.plot(eps, [r["global_loss"] for r in finite], marker="s", ls="--", label="global")
    no_dp = [r for r in rows if r not in finite]
    if no_dp:
        ax.axhline(no_dp[0]["personal_loss"], color="k", lw=0.8, ls=":", label="no DP")
    ax.set_xscale("log")
    ax.set_xlabel("user-level ε (RDP)")
    ax.set_ylabel("held-out loss")
    ax.set_title("Privacy–utility")
    ax.legend(fontsize=8)
    return _save(fig, out / "epsilon_utility.png")


def plot_cold_start(ev: dict, out: Path) -> Path:
    """win_rate of new users against the number of local interactions."""
    rates = {int(k): v for k, v in ev["cold_start"]["win_rate_by_k"].items()}
    fig, ax = plt.subplots(figsize=(4.6, 3.2))
    ks = sorted(rates)
    ax.plot(ks, [rates[k] for k in ks], marker="o")
    ax.axhline(0.85, color="r", ls="--", lw=0.8, label="0.85")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("local interactions")
    ax.set_ylabel("win_rate vs global")
    ax.set_title(f"Cold start (cold_start_k = {_fmt(ev['cold_start']['cold_start_k'])})")
    ax.legend(fontsize=8)
    return _save(fig, out / "cold_start.png")


def plot_drift(ev: dict, out: Path) -> Path:
    """Personal loss on the new role after each interaction, against the global model's."""
    fig, ax = plt.subplots(figsize=(4.6, 3.2))
    for i, pair in enumerate(ev["drift"]["pairs"]):
        trace = pair["personal_loss_trace"]
        line = ax.plot(range(len(trace)), trace, marker=".", label=f"pair {i + 1}")[0]
        ax.axhline(pair["global_loss_on_new"], color=line.get_color(), ls="--", lw=0.8)
    ax.set_xlabel("interactions after the switch")
    ax.set_ylabel("loss on the new role")
    ax.set_title("Drift recovery (dashed: global)")
    ax.legend(fontsize=8)
    return _save(fig, out / "drift.png")


def plot_mia(ev: dict, out: Path) -> Path:
    """ROC of the loss-threshold membership attack."""
    mia = ev["membership_inference"]
    fig, ax = plt.subplots(figsize=(4.0, 3.8))
    for name in ("global", "personal"):
        pts = mia["roc_points"][name]
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            label=f"{name}: AUC {mia[name]['mia_auc']:.3f}",
        )
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title("Membership inference ROC")
    ax.legend(fontsize=8)
    return _save(fig, out / "mia_roc.png")


def plot_ab(ab: dict, out: Path) -> Path:
    """Mean rating per arm with its confidence interval."""
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    arms = ["global", "personal"]
    means = [ab["mean_a"], ab["mean_b"]]
    ax.bar(arms, means, color=["#999", "#3a7"])
    ax.set_ylim(1, 5)
    ax.set_ylabel("mean rating (1–5)")
    ax.set_title(
        f"A/B: Δ {ab['diff']:+.2f} [{ab['ci_low']:+.2f}, {ab['ci_high']:+.2f}], "
        f"p={ab['p_value']:.3g}",
        fontsize=9,
    )
    return _save(fig, out / "ab.png")


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

    title = f"fedpersona report — {run_dir.name}"
    table = ["| metric | seed target | measured | meets |", "|---|---|---|---|"]
    for row in ev["seed_targets"]:
        table.append(
            f"| {row['metric']} | {row['target']} | {_fmt(row['measured'])} | "
            f"{_fmt(row['meets'])} |"
        )
    p = ev["personalization"]
    facts = [
        f"strategy `{summary['strategy']}`, {len(summary['clients'])} users, "
        f"{len(summary['rounds'])} rounds; win_rate {p['win_rate']:.3f}, ppl_gain "
        f"{p['ppl_gain']:.3f}, attribution chance level {p['attribution_chance']:.3f}, "
        f"style chance level {ev['generation']['style_chance']:.3f}",
        f"privacy: {summary['privacy'].get('user_level', {}).get('assumes', '')}",
    ]
    if ev.get("canaries"):
        c = ev["canaries"]
        facts.append(
            f"canary exposure (max {c['max_exposure']:.1f} bits): global "
            f"{[round(x, 2) for x in c['global']]}; "
            + "; ".join(
                f"{k} {[round(x, 2) for x in v]}" for k, v in c.items() if k.startswith("personal")
            )
        )
    md = [f"# {title}", "", *table, "", *[f"- {f}" for f in facts], ""]
    groups = by_data_rows(summary)
    if len(groups) > 1:
        md += ["## Who gains from joining, by how much data they have", ""]
        md += ["| " + " | ".join(r) + " |" for r in groups[:1]]
        md += ["|" + "---|" * len(groups[0])]
        md += ["| " + " | ".join(r) + " |" for r in groups[1:]]
        md += ["", summary.get("headline", ""), ""]
    md += [f"## {name}\n\n![{name}]({path.name})\n" for name, path in figures]
    atomic_write_bytes(out / "report.md", "\n".join(md).encode())

    def img(path: Path) -> str:
        data = base64.b64encode(path.read_bytes()).decode()
        return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'

    rows_html = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(_fmt(row[k]))}</td>"
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
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
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
            for n, p in figures
        )
    }</div></body></html>"""
    atomic_write_bytes(out / "report.html", page.encode())
    return out / "report.html"
