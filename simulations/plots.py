"""The PNG plots of ``fedpersona report`` (:mod:`simulations.report`): per-round losses,
personal vs global per user, ε over rounds and per device, the ε–utility curve, cold-start and
drift curves, the membership-inference ROC and the federated A/B results. Each takes the run's
``summary.json`` or ``evaluation.json`` (parsed) and the output folder and returns the PNG's
path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def fmt(value: Any) -> str:
    """A table cell or title value: — for none, yes/no, 3 decimals for a float."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


# Each plot's axes: x label, y label.
AXES = {
    "rounds.png": ("round", "loss (nats/token)"),
    "users.png": ("global (cold-start) loss", "personal loss"),
    "epsilon_utility.png": ("user-level ε (RDP)", "held-out loss"),
    "cold_start.png": ("local interactions", "win_rate vs global"),
    "drift.png": ("interactions after the switch", "loss on the new role"),
    "mia_roc.png": ("false-positive rate", "true-positive rate"),
}


def _finish(fig: plt.Figure, ax: Any, path: Path, title: str, *, legend: bool = True) -> Path:
    """Label ``ax`` (its :data:`AXES`, ``title``, the legend unless told not to) and save
    ``fig`` to ``path``."""
    x, y = AXES[path.name]
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    if legend:
        ax.legend(fontsize=8)
    return _save(fig, path)


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
    return _finish(fig, ax, out / "rounds.png", "Losses per round (mean over users)")


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
    return _finish(
        fig, ax, out / "users.png", f"Per user: win_rate {summary['win_rate']:.2f}", legend=False
    )


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
    return _finish(fig, ax, out / "epsilon_utility.png", "Privacy–utility")


def plot_cold_start(ev: dict, out: Path) -> Path:
    """win_rate of new users against the number of local interactions."""
    rates = {int(k): v for k, v in ev["cold_start"]["win_rate_by_k"].items()}
    fig, ax = plt.subplots(figsize=(4.6, 3.2))
    ks = sorted(rates)
    ax.plot(ks, [rates[k] for k in ks], marker="o")
    ax.axhline(0.85, color="r", ls="--", lw=0.8, label="0.85")
    ax.set_ylim(-0.05, 1.05)
    return _finish(
        fig,
        ax,
        out / "cold_start.png",
        f"Cold start (cold_start_k = {fmt(ev['cold_start']['cold_start_k'])})",
    )


def plot_drift(ev: dict, out: Path) -> Path:
    """Personal loss on the new role after each interaction, against the global model's."""
    fig, ax = plt.subplots(figsize=(4.6, 3.2))
    for i, pair in enumerate(ev["drift"]["pairs"]):
        trace = pair["personal_loss_trace"]
        line = ax.plot(range(len(trace)), trace, marker=".", label=f"pair {i + 1}")[0]
        ax.axhline(pair["global_loss_on_new"], color=line.get_color(), ls="--", lw=0.8)
    return _finish(fig, ax, out / "drift.png", "Drift recovery (dashed: global)")


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
    return _finish(fig, ax, out / "mia_roc.png", "Membership inference ROC")


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
