"""Bookkeeping of a run, shared by both aggregation paths (Message API and SecAgg+).

Per round: training loss, how many updates were aggregated / declined / failed, whether the
round was released, the federation's user-level ε after it, the held-out losses, the win rate
and the wall time. Per user: the latest held-out losses and the device's own ledger ε.
"""

from __future__ import annotations

import math
import statistics
import time
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.common.logger import log

from common.serialization import HOSTED_SEP
from server.accountant import FederationAccountant


def _mean(rows: list[dict[str, float]], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return statistics.fmean(values) if values else math.nan


def users_in(row: dict[str, Any]) -> int:
    """How many users' updates a training reply carries: a device's 1 (0 if it declined), or a
    simulation node's count of the hosted users it trained (``users``)."""
    if "users" in row:
        return int(row["users"])
    return 0 if row.get("declined") else 1


def expand_hosted(row: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per user: a simulation node hosting several users reports each one's metrics
    as ``<metric>#<i>`` (see ``common.serialization.HOSTED_SEP``). A node that hosts only the
    audit's canary clients evaluates no one: no row."""
    if not any(HOSTED_SEP in k for k in row):
        return [row] if "personal_loss" in row else []
    users: dict[str, dict[str, Any]] = {}
    shared = {k: v for k, v in row.items() if HOSTED_SEP not in k}
    for key, value in row.items():
        if HOSTED_SEP in key:
            base, index = key.split(HOSTED_SEP, 1)
            users.setdefault(index, dict(shared))[base] = value
    return [users[i] for i in sorted(users, key=int)]


def client_key(row: dict[str, Any]) -> int | str:
    """Who a reply is from: a simulated device's partition id, else ``node-<node id>`` (a real
    device reports no partition)."""
    if "partition_id" in row:
        return int(row["partition_id"])
    return f"node-{row['node']}"


class RoundRecorder:
    """Collects what ``summary.json`` reports about rounds and users."""

    def __init__(self, accountant: FederationAccountant | None) -> None:
        self.accountant = accountant
        self.rounds: list[dict[str, Any]] = []
        self.clients: dict[int | str, dict[str, Any]] = {}
        self._start: dict[int, float] = {}
        self._train: dict[int, dict[str, Any]] = {}
        self.ab_rounds: list[np.ndarray] = []

    def export_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the bookkeeping (see :mod:`server.checkpoint`)."""
        closed = {r["round"] for r in self.rounds}
        return {
            "rounds": self.rounds,
            "clients": self.clients,
            "ab_rounds": [a.tolist() for a in self.ab_rounds],
            "pending_train": {k: v for k, v in self._train.items() if k not in closed},
        }

    def restore(
        self,
        *,
        rounds: list[dict[str, Any]],
        clients: dict[int | str, dict[str, Any]],
        ab_rounds: list[list[float]],
        pending_train: dict[int, dict[str, Any]],
    ) -> None:
        """Continue from a checkpoint. A round trained but never evaluated before the
        restart is closed with its training record and a note."""
        self.rounds = list(rounds)
        self.clients = dict(clients)
        self.ab_rounds = [np.asarray(a, dtype=np.float64) for a in ab_rounds]
        for server_round, record in sorted(pending_train.items()):
            note = "; ".join(filter(None, [record.get("note"), "not evaluated: server restarted"]))
            self.rounds.append({"round": server_round, **record, "note": note})
        self.rounds.sort(key=lambda r: r["round"])

    def open_round(
        self, server_round: int, *, stopped_at: int | None, target_epsilon: float
    ) -> int | None:
        """Start ``server_round``'s record; return the round at which training stopped because
        another release would pass ``privacy.target-epsilon`` (``None``: this one may train)."""
        self.start(server_round)
        acc = self.accountant
        if stopped_at is None and (acc is None or not acc.next_round_exceeds(target_epsilon)):
            return None
        log(WARNING, "privacy.target-epsilon reached: no training in round %s", server_round)
        return stopped_at or server_round

    def start(self, server_round: int) -> None:
        """Start the round's clock."""
        self._start.setdefault(server_round, time.time())

    def trained(
        self,
        server_round: int,
        rows: list[dict[str, float]],
        *,
        failures: int,
        released: bool,
        note: str = "",
    ) -> None:
        """Record a training phase: ``rows`` are the replies' metrics (declines included)."""
        participants = [r for r in rows if users_in(r) > 0]
        users = sum(users_in(r) for r in participants)
        reported = [r for r in participants if "train_loss" in r]
        weight = sum(users_in(r) for r in reported)
        record: dict[str, Any] = {
            "train_loss": (
                sum(r["train_loss"] * users_in(r) for r in reported) / weight
                if weight
                else math.nan
            ),
            "updates": users,
            "declined": int(sum(r.get("declined", 0) for r in rows)),
            "failures": failures,
            "released": released,
            # The training phase's wall time (every SecAgg+ stage included).
            "train_seconds": time.time() - self._start.get(server_round, time.time()),
        }
        if note:
            record["note"] = note
        if self.accountant is not None:
            record["user_epsilon"] = self.accountant.epsilon("rdp")
            record["user_epsilon_prv"] = self.accountant.epsilon("prv")
        self._train[server_round] = record

    def cohort_losses(self, server_round: int, losses: dict[str, float]) -> None:
        """Record the held-out losses the round's participants summed under SecAgg+ (the
        model the round started from; ``eval.secure-sums``): their number and mean losses."""
        record = self._train.setdefault(server_round, {})
        record["cohort_losses"] = {
            **losses,
            "of": "the model this round started from (the previous release), on each "
            "participant's held-out text; the server saw only the SecAgg+ sums",
        }
        log(INFO, "fedpersona round %s: cohort losses (SecAgg+ sums) %s", server_round, losses)

    def ab(self, server_round: int, counts: np.ndarray) -> None:
        """Record the round's summed A/B counts ``[n, Σr, Σr²]`` per arm."""
        self.ab_rounds.append(np.asarray(counts, dtype=np.float64))
        log(INFO, "fedpersona round %s: A/B counts %s", server_round, np.round(counts, 3).tolist())

    def evaluated(self, server_round: int, rows: list[dict[str, float]]) -> dict[str, Any]:
        """Record an evaluation phase and close the round; returns the round's record. Rows
        of devices whose owners withheld their losses are counted (``losses_withheld``)."""
        withheld = sum(1 for row in rows if row.get("losses_withheld"))
        rows = [user for row in rows for user in expand_hosted(row)]
        for row in rows:
            self.clients[client_key(row)] = row
        record: dict[str, Any] = {"round": server_round, **self._train.get(server_round, {})}
        if rows:
            record.update(
                global_loss=_mean(rows, "global_loss"),
                personal_loss=_mean(rows, "personal_loss"),
                base_loss=_mean(rows, "base_loss"),
                win_rate=_mean(rows, "win"),
                evaluated=len(rows),
            )
            local = [r for r in rows if "local_only_loss" in r]
            if local:
                record["local_only_loss"] = _mean(local, "local_only_loss")
                record["win_vs_local"] = statistics.fmean(
                    r["personal_loss"] < r["local_only_loss"] for r in local
                )
        if withheld:
            record["losses_withheld"] = withheld
        record["seconds"] = time.time() - self._start.get(server_round, time.time())
        self.rounds.append(record)
        log(
            INFO,
            "fedpersona round %s: train_loss=%.4f global_loss=%.4f personal_loss=%.4f "
            "win_rate=%.2f win_vs_local=%.2f updates=%s declined=%s user_eps=%.3f (%.1f s)",
            server_round,
            record.get("train_loss", math.nan),
            record.get("global_loss", math.nan),
            record.get("personal_loss", math.nan),
            record.get("win_rate", math.nan),
            record.get("win_vs_local", math.nan),
            record.get("updates", 0),
            record.get("declined", 0),
            record.get("user_epsilon", math.nan),
            record["seconds"],
        )
        return record
