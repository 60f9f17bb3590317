"""FedAvg over the shared LoRA tensors, recording what each round did.

The aggregation itself is Flower's ``FedAvg`` (weighted by ``num-examples``); this subclass
adds bookkeeping for ``summary.json``: per-round losses, win rate and wall time, and each
user's latest held-out losses.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.serialization import METRICS_KEY


def _metrics(replies: Iterable[Message]) -> list[dict[str, float]]:
    out = []
    for msg in replies:
        if msg.has_error() or METRICS_KEY not in msg.content:
            continue
        out.append({k: float(v) for k, v in msg.content[METRICS_KEY].items()})
    return out


class PersonaFedAvg(FedAvg):
    """``FedAvg`` that records per-round and per-user metrics."""

    def __init__(self, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.rounds: list[dict[str, float | int]] = []
        self.clients: dict[int, dict[str, float]] = {}
        self._round_start: dict[int, float] = {}
        self._train: dict[int, dict[str, float]] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes as FedAvg does; start the round's clock."""
        self._round_start[server_round] = time.time()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the shared tensors (FedAvg); note the mean train loss and update count."""
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        rows = _metrics(replies)
        self._train[server_round] = {
            "train_loss": statistics.fmean(r["train_loss"] for r in rows) if rows else float("nan"),
            "updates": len(rows),
            "failures": len(replies) - len(rows),
        }
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate as FedAvg does, and record the round's per-user losses and win rate."""
        replies = list(replies)
        aggregated = super().aggregate_evaluate(server_round, replies)
        rows = _metrics(replies)
        for row in rows:
            self.clients[int(row["partition_id"])] = row
        record: dict[str, float | int] = {
            "round": server_round,
            **self._train.get(server_round, {}),
        }
        if rows:
            record.update(
                global_loss=statistics.fmean(r["global_loss"] for r in rows),
                personal_loss=statistics.fmean(r["personal_loss"] for r in rows),
                base_loss=statistics.fmean(r["base_loss"] for r in rows),
                win_rate=statistics.fmean(r["win"] for r in rows),
                evaluated=len(rows),
            )
        record["seconds"] = time.time() - self._round_start.get(server_round, time.time())
        self.rounds.append(record)
        log(
            INFO,
            "fedpersona round %s: train_loss=%.4f global_loss=%.4f personal_loss=%.4f "
            "win_rate=%.2f (%.1f s)",
            server_round,
            record.get("train_loss", float("nan")),
            record.get("global_loss", float("nan")),
            record.get("personal_loss", float("nan")),
            record.get("win_rate", float("nan")),
            record["seconds"],
        )
        return aggregated
