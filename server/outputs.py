"""A run's outputs: ``summary.json`` and the global adapter in peft format.

Definitions (docs/architecture.md): ``base`` is the pre-trained model without adapter;
``global`` is what a brand-new user gets from the federation (its cold-start model);
``personal`` is each device's own model. ``win_rate`` is the share of users whose personal
loss is below their global loss; ``ppl_gain`` is the median over users of
1 - ppl_personal / ppl_global.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from common import ab, metrics
from common.atomic import atomic_write_bytes
from common.config import RunConfig
from common.corpus import simulation_users
from common.lora import export_adapter
from common.model import model_dir
from common.personalization import GLOBAL_ADAPTER, Strategy, strategy_for
from server.privacy import privacy_report

if TYPE_CHECKING:
    from server.progress import Progress


def per_user_rows(
    clients: dict[int | str, dict[str, Any]], users: list[str]
) -> list[dict[str, Any]]:
    """One row per evaluated user with its latest held-out losses."""
    rows = []
    for key in sorted(clients, key=lambda k: (isinstance(k, str), str(k).zfill(12))):
        c = clients[key]
        pid = key if isinstance(key, int) else None
        # A real device reports no partition: the server knows its node, not its user.
        label = users[pid] if pid is not None and pid < len(users) else f"partition-{pid}"
        user = str(key) if pid is None else label
        rows.append(
            {
                "partition_id": pid,
                "user": user,
                "n_train": int(c["n_train"]),
                "n_test": int(c["n_test"]),
                "base_loss": c["base_loss"],
                "global_loss": c["global_loss"],
                "personal_loss": c["personal_loss"],
                **{k: c[k] for k in ("local_only_loss", "mix_weight") if k in c},
                "record_epsilon": c.get("record_epsilon", 0.0),
                "user_epsilon": c.get("user_epsilon", 0.0),
                "declined_rounds": int(c.get("declined_rounds", 0)),
                **({"rounds_trained": int(c["rounds_trained"])} if "rounds_trained" in c else {}),
            }
        )
    return rows


def user_labels(cfg: RunConfig, partitions: list[int]) -> list[str]:
    """The users simulated partitions ``0, 1, …`` play (enough for ``partitions``); the
    audit's canary clients, the last ``audit.canary-clients`` partitions, play none."""
    n_data = cfg.data.num_users - cfg.audit.canary_clients
    count = max(n_data, max(partitions, default=-1) + 1)
    return [u.user for u in simulation_users(cfg.data, seed=cfg.seed, count=count)]


def win_rate(rows: list[dict[str, Any]]) -> float:
    """Share of users whose personal model has lower held-out loss than the global one."""
    return metrics.win_rate([r["personal_loss"] for r in rows], [r["global_loss"] for r in rows])


def ppl_gain(rows: list[dict[str, Any]]) -> float:
    """Median over users of ``1 - ppl_personal / ppl_global``."""
    return metrics.ppl_gain([r["personal_loss"] for r in rows], [r["global_loss"] for r in rows])


# "No worse than training alone": the served model's loss within 0.5 % of the local-only one.
NO_WORSE_TOLERANCE = 0.005


def _shares(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    """``(better, no worse)``: shares of ``(served, local-only)`` loss pairs strictly below,
    and within :data:`NO_WORSE_TOLERANCE` of, the local-only loss."""
    better = sum(p < b for p, b in pairs) / len(pairs)
    no_worse = sum(p <= b * (1 + NO_WORSE_TOLERANCE) for p, b in pairs) / len(pairs)
    return better, no_worse


def trained(row: dict[str, Any]) -> bool:
    """Whether a user trained in the run (a row without the count, a real device's, did)."""
    return int(row.get("rounds_trained", 1)) > 0


def versus_local(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """How the served models compare with what each user could train alone (the local-only
    baseline, same compute): shares of the users **who trained** no worse (within 0.5 %) and
    strictly better, and the mean gain in nats. A user who never trained has no local-only
    model to beat (it is the base model): it is counted apart, as ``never_trained``."""
    pairs = [
        (r["personal_loss"], r["local_only_loss"])
        for r in rows
        if "local_only_loss" in r and trained(r)
    ]
    if not pairs:
        return None
    return {
        "users": len(pairs),
        "never_trained": sum(1 for r in rows if "local_only_loss" in r and not trained(r)),
        "mean_gain_nats": statistics.fmean(b - p for p, b in pairs),
        "worse": sum(p > b * (1 + NO_WORSE_TOLERANCE) for p, b in pairs),
        "no_worse_than_local": _shares(pairs)[1],
        "win_vs_local": _shares(pairs)[0],
        "mean_local_only_loss": statistics.fmean(b for _, b in pairs),
        "tolerance": NO_WORSE_TOLERANCE,
        "baseline": "a LoRA of the same size on the same user's examples, with the same "
        "optimizer steps, batch size, sequence length and learning rate as the device spent "
        "(every adapter it trained counts); no federation, no noise",
    }


def by_data(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The users who trained, in four groups by how many training examples they have
    (quartiles of ``n_train``), then the users who never trained: per group, its range of
    examples and mean base / global / served / local-only losses, and the shares better than
    and no worse than training alone."""
    done = sorted((r for r in rows if trained(r)), key=lambda r: r["n_train"])
    groups: list[tuple[str, list[dict[str, Any]]]] = []
    if done:
        k = min(4, len(done))
        cuts = [round(i * len(done) / k) for i in range(k + 1)]
        groups += [(f"Q{i + 1}", done[cuts[i] : cuts[i + 1]]) for i in range(k)]
    never = [r for r in rows if not trained(r)]
    if never:
        groups.append(("never trained", never))
    out = []
    for name, group in groups:
        if not group:
            continue
        mean = {
            key: statistics.fmean(r[key] for r in group) if all(key in r for r in group) else None
            for key in ("base_loss", "global_loss", "personal_loss", "local_only_loss")
        }
        local = [
            (r["personal_loss"], r["local_only_loss"]) for r in group if "local_only_loss" in r
        ]
        # A user who never trained has no local-only model to beat: no shares for that group.
        shares = _shares(local) if local and name != "never trained" else None
        out.append(
            {
                "group": name,
                "users": len(group),
                "n_train_min": min(r["n_train"] for r in group),
                "n_train_max": max(r["n_train"] for r in group),
                **mean,
                "better_than_local": shares[0] if shares else None,
                "no_worse_than_local": shares[1] if shares else None,
            }
        )
    return out


def headline(summary: dict[str, Any]) -> str:
    """One plain sentence: who gained from joining, by how much, and what newcomers get."""
    local = summary.get("versus_local")
    parts = []
    if local:
        parts.append(
            f"better than training alone for {round(local['win_vs_local'] * local['users'])} "
            f"of the {local['users']} users who trained, by {local['mean_gain_nats']:.3f} nats "
            f"on average; worse by more than {NO_WORSE_TOLERANCE:.1%} for {local['worse']}"
        )
        if local.get("never_trained"):
            parts.append(f"{local['never_trained']} never trained (never sampled)")
    cold = summary.get("cold_start_users")
    if cold and cold.get("users"):
        parts.append(
            f"newcomers: the released model is below the base model for "
            f"{round(cold['below_base'] * cold['users'])} of {cold['users']} "
            f"({cold['base_loss']:.3f} → {cold['global_loss']:.3f})"
        )
    if not parts:
        return "no local-only baseline measured (eval.local-only = false): nothing to compare"
    sentence = "; ".join(parts)
    return sentence[0].upper() + sentence[1:] + "."


def write_summary(
    run_dir: Path,
    *,
    cfg: RunConfig,
    strategy: Strategy,
    rounds: list[dict[str, Any]],
    clients: dict[int | str, dict[str, Any]],
    users: list[str],
    timings: dict[str, float],
    privacy: dict[str, Any] | None = None,
    ab_test: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``summary.json`` atomically and return it."""
    rows = per_user_rows(clients, users)
    summary = {
        "config": cfg.to_dict(),
        "strategy": strategy.name,
        "cold_start_model": strategy.cold_start,
        "rounds": rounds,
        "clients": rows,
        "win_rate": win_rate(rows),
        "ppl_gain": ppl_gain(rows),
        "base_loss": statistics.fmean(r["base_loss"] for r in rows) if rows else None,
        "global_loss": statistics.fmean(r["global_loss"] for r in rows) if rows else None,
        "personal_loss": statistics.fmean(r["personal_loss"] for r in rows) if rows else None,
        "versus_local": versus_local(rows),
        "by_data": by_data(rows),
        "privacy": privacy or {},
        "ab_test": ab_test,
        "timings": timings,
    }
    summary["headline"] = headline(summary)
    atomic_write_bytes(
        run_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=True).encode()
    )
    return summary


def write_outputs(progress: Progress, timings: dict[str, float]) -> dict:
    """The global adapter (peft) and ``summary.json`` of a finished (or stopped) run; returns
    the summary. The rows of simulated devices (which report their partition id) are
    labelled with the names of the roles they replayed."""
    plan, cfg, recorder = progress.plan, progress.plan.cfg, progress.recorder
    strategy = strategy_for(cfg)
    init, current, run_dir = plan.init, progress.current, plan.run_dir
    final = {n: t for n, t in init.items() if f".{GLOBAL_ADAPTER}." in n}
    final.update({n: torch.from_numpy(np.array(a)) for n, a in current.items()})
    export_adapter(
        final,
        cfg.model,
        run_dir / "global_adapter",
        base_model=str(model_dir(cfg.model.name)),
        note={"kind": "global", "strategy": cfg.strategy, "what": strategy.cold_start},
    )
    users = user_labels(cfg, [k for k in recorder.clients if isinstance(k, int)])
    summary = write_summary(
        run_dir,
        cfg=cfg,
        strategy=strategy,
        rounds=recorder.rounds,
        clients=recorder.clients,
        users=users,
        privacy=privacy_report(
            cfg,
            m_min=plan.m_min,
            sample_rate=plan.sample_rate,
            acc=progress.acc,
            num_params=int(sum(np.size(a) for a in current.values())),
            round_updates=tuple(
                int(r.get("updates", 0)) for r in recorder.rounds if r.get("released")
            ),
            discrete=(
                plan.privatize.discrete_params(int(sum(np.size(a) for a in current.values())))
                if plan.privatize.discrete
                else None
            ),
            privatize=plan.privatize,
        ),
        ab_test=ab.summarize(recorder.ab_rounds, secure=cfg.secagg.enabled)
        if recorder.ab_rounds
        else None,
        timings=timings,
    )
    return summary
