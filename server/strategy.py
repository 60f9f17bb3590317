"""Message-API aggregation (the path without SecAgg+): FedAvg over the shared LoRA tensors,
with user-level DP when configured.

Devices send the change of their shared tensors, already clipped to ``C`` (and, in
``distributed`` mode, noised). This strategy samples (waiting, bounded, for lost nodes), drops
malformed and declined replies and averages the changes per user (weight 1) when DP is on;
whether and how a round is released — m_min, finiteness, central noise N(0, (σC)²)/m, the
accountant's charge — is :class:`server.release.ReleasePolicy`, the same for the SecAgg+ path.
``privacy.target-epsilon`` stops training before the target would be passed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import cast

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import ab
from common.sampling import poisson_sample
from common.serialization import (
    ALLOWED_EVAL_METRICS,
    ALLOWED_TRAIN_METRICS,
    METRICS_KEY,
    reply_problem,
)
from server.recorder import users_in
from server.release import RoundOptions, RoundSchedule


def reply_metrics(replies: Iterable[Message]) -> list[dict[str, float]]:
    """Metrics of the replies that carry content, each with its sender's node id (``node``)."""
    out = []
    for msg in replies:
        if msg.has_error() or METRICS_KEY not in msg.content:
            continue
        row: dict = {k: float(v) for k, v in msg.content[METRICS_KEY].items()}
        row["node"] = str(msg.metadata.src_node_id)
        out.append(row)
    return out


class PersonaFedAvg(RoundSchedule, FedAvg):
    """``FedAvg`` with declines, m_min, central noise, accounting and bookkeeping.

    Args:
        options: What both round strategies take (:class:`server.release.RoundOptions`); its
            ``on_round_end`` is called with the run's round and its current arrays after the
            training phase, and with ``None`` arrays after the evaluation.
        shapes: The shared tensors' names and shapes: a training reply must hold exactly
            these (float32, finite) or it is rejected with a logged reason.
        **kwargs: ``FedAvg`` arguments. ``min_available_nodes``, ``min_train_nodes`` and
            ``min_evaluate_nodes`` are what a round asks for: before the first round the
            strategy waits up to ``assemble_wait`` s for them, later up to ``rejoin_wait`` s
            for lost nodes, then samples from the nodes online (Flower's sampling would wait
            forever for a node that died; the m_min check decides whether a round is released).
    """

    assemble_wait = 3600.0
    rejoin_wait = 60.0

    def __init__(
        self,
        options: RoundOptions,
        *,
        shapes: Mapping[str, tuple[int, ...]] | None = None,
        **kwargs,  # type: ignore[no-untyped-def]
    ) -> None:
        super().__init__(
            fraction_train=options.fraction_train,
            fraction_evaluate=options.fraction_evaluate,
            **kwargs,
        )
        self._adopt(options)
        self._global: ArrayRecord | None = None
        self.shapes = dict(shapes) if shapes is not None else None
        self._wanted = (self.min_available_nodes, self.min_train_nodes, self.min_evaluate_nodes)
        self._assembled = False

    def _await_nodes(self, grid: Grid) -> Grid:
        """Wait (bounded) for the wanted nodes; lower this round's minimums to those online
        and return the grid with its node list frozen at them (a node lost a moment later
        then fails to answer instead of making Flower's sampler wait for it forever)."""
        wanted = self._wanted[0]
        deadline = time.monotonic() + (self.rejoin_wait if self._assembled else self.assemble_wait)
        while len(nodes := list(grid.get_node_ids())) < wanted and time.monotonic() < deadline:
            time.sleep(1)
        online = len(nodes)
        self._assembled = self._assembled or online >= wanted
        if online < wanted:
            log(WARNING, "%s of %s nodes online: sampling from those online", online, wanted)
        self.min_available_nodes, self.min_train_nodes, self.min_evaluate_nodes = (
            min(w, online) for w in self._wanted
        )
        return cast(Grid, _FrozenNodes(grid, nodes))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample as FedAvg does, unless the privacy target forbids another round."""
        server_round += self.round_offset
        if self._stopping(server_round):
            return []
        self._global = arrays
        frozen = self._await_nodes(grid)
        if self.sampling == "poisson":
            nodes = poisson_sample(list(frozen.get_node_ids()), self.fraction_train)
            log(INFO, "configure_train: Poisson cohort of %s nodes", len(nodes))
            if self._too_few(server_round, nodes):
                self.sampled[server_round] = 0
                return []
            config["server-round"] = server_round
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
            messages = list(self._construct_messages(record, nodes, MessageType.TRAIN))
        else:
            messages = list(super().configure_train(server_round, arrays, config, frozen))
        self.sampled[server_round] = len(messages)
        return messages

    def _well_formed(self, server_round: int, replies: list[Message], *, train: bool) -> list:
        """Replies without an error whose content is well formed; the others are logged."""
        kept = []
        for msg in replies:
            if msg.has_error():
                continue
            reason = reply_problem(
                msg.content,
                train=train,
                expected=self.shapes if train else None,
                allowed_metrics=ALLOWED_TRAIN_METRICS if train else ALLOWED_EVAL_METRICS,
                required_metrics=("weight",) if train else ("personal_loss",),
            )
            if reason:
                log(
                    WARNING,
                    "round %s: rejecting node %s's %s reply: %s",
                    server_round,
                    msg.metadata.src_node_id,
                    "train" if train else "evaluate",
                    reason,
                )
                continue
            kept.append(msg)
        return kept

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the participants' changes; the release policy decides the round."""
        server_round += self.round_offset
        replies = list(replies)
        ok = self._well_formed(server_round, replies, train=True)
        rows = reply_metrics(ok)
        participants = [m for m, r in zip(ok, rows, strict=True) if users_in(r) > 0]
        # Users whose updates arrived (a simulation node may carry several).
        users = sum(users_in(r) for r in rows)
        # Failed, malformed, and never-answered (stragglers, dropouts) replies.
        failures = max(len(replies), self.sampled.get(server_round, 0)) - len(ok)
        mean, metrics = None, None
        if participants:
            # Devices send their clipped, noised change; FedAvg's weighted mean of the changes.
            aggregated, metrics = super().aggregate_train(server_round, participants)
            if aggregated is not None:
                mean = {n: aggregated[n].numpy() for n in aggregated}
        assert self._global is not None  # set by configure_train
        counts = [c for c in (ab.from_metrics(r) for r in rows if users_in(r) > 0) if c is not None]
        released = self.release.apply(
            server_round,
            {n: self._global[n].numpy() for n in self._global},
            mean,
            users=users,
            rows=rows,
            failures=failures,
            # Without SecAgg+ the server sees each device's counts (the summary says so).
            ab_counts=np.sum(counts, axis=0) if counts else None,
        )
        arrays = (
            None if released is None else ArrayRecord({n: Array(a) for n, a in released.items()})
        )
        if arrays is None:
            metrics = None
        if self.on_round_end is not None:
            self.on_round_end(server_round, arrays)
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Record the round's per-user losses; return their means (unweighted: per user)."""
        server_round += self.round_offset
        ok = self._well_formed(server_round, list(replies), train=False)
        record = self.recorder.evaluated(server_round, reply_metrics(ok))
        if self.on_round_end is not None:
            self.on_round_end(server_round, None)
        keys = ("global_loss", "personal_loss", "base_loss", "win_rate")
        means = {k: float(record[k]) for k in keys if k in record}
        return MetricRecord(means) if means else None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's evaluation sampling, at the run's round number, in the rounds due
        (``evaluate-every``)."""
        server_round += self.round_offset
        if self._evaluation_skipped(server_round):
            return []
        frozen = self._await_nodes(grid)
        return super().configure_evaluate(server_round, arrays, config, frozen)


class _FrozenNodes:
    """``grid`` with ``get_node_ids`` fixed to ``node_ids`` (FedAvg's sampling reads only that)."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid, self._node_ids = grid, node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)
