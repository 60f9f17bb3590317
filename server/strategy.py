"""Message-API aggregation (the path without SecAgg+): FedAvg over the shared LoRA tensors,
with user-level DP when configured.

Devices send their shared tensors as ``global + update``, where the update is already clipped
to ``C`` (and, in ``distributed`` mode, noised). This strategy drops declined replies, refuses
to release a round with fewer than m_min updates, averages per user (weight 1) when DP is on,
adds N(0, (σC)²)/m in ``central`` mode, and charges the federation accountant for each
released round. ``privacy.target-epsilon`` stops training before the target would be passed.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import ab
from common.serialization import METRICS_KEY
from server.recorder import RoundRecorder


def reply_metrics(replies: Iterable[Message]) -> list[dict[str, float]]:
    """Metrics of the replies that carry content."""
    out = []
    for msg in replies:
        if msg.has_error() or METRICS_KEY not in msg.content:
            continue
        out.append({k: float(v) for k, v in msg.content[METRICS_KEY].items()})
    return out


class PersonaFedAvg(FedAvg):
    """``FedAvg`` with declines, m_min, central noise, accounting and bookkeeping.

    Args:
        recorder: Shared run bookkeeping (holds the federation accountant, if any).
        min_updates: m_min; rounds with fewer updates are discarded.
        central_noise_std: Std of the noise added to the *sum* (σC) in central mode, else 0.
        target_epsilon: Stop before the federation's ε would pass this (0 = no target).
        **kwargs: ``FedAvg`` arguments.
    """

    def __init__(
        self,
        *,
        recorder: RoundRecorder,
        min_updates: int,
        central_noise_std: float = 0.0,
        target_epsilon: float = 0.0,
        **kwargs,  # type: ignore[no-untyped-def]
    ) -> None:
        super().__init__(**kwargs)
        self.recorder = recorder
        self.min_updates = min_updates
        self.central_noise_std = central_noise_std
        self.target_epsilon = target_epsilon
        self.stopped_at: int | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample as FedAvg does, unless the privacy target forbids another round."""
        self.recorder.start(server_round)
        acc = self.recorder.accountant
        if self.stopped_at is not None or (
            acc is not None and acc.next_round_exceeds(self.target_epsilon)
        ):
            self.stopped_at = self.stopped_at or server_round
            log(WARNING, "privacy.target-epsilon reached: no training in round %s", server_round)
            return []
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the participants' shared tensors; discard under-populated rounds."""
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        rows = reply_metrics(ok)
        participants = [m for m, r in zip(ok, rows, strict=True) if not r.get("declined")]
        failures = len(replies) - len(ok)
        if len(participants) < self.min_updates:
            log(
                WARNING,
                "round %s discarded: %s updates < m_min=%s (releasing it would give less noise "
                "and a weaker guarantee than promised)",
                server_round,
                len(participants),
                self.min_updates,
            )
            self.recorder.trained(
                server_round,
                rows,
                failures=failures,
                released=False,
                note=f"discarded: {len(participants)} updates < m_min {self.min_updates}",
            )
            return None, None
        arrays, metrics = super().aggregate_train(server_round, participants)
        if arrays is not None and self.central_noise_std > 0:
            arrays = _add_noise(arrays, self.central_noise_std / len(participants))
        if self.recorder.accountant is not None:
            self.recorder.accountant.release()
        counts = [ab.from_metrics(r) for r in rows if not r.get("declined")]
        counts = [c for c in counts if c is not None]
        if counts:  # without SecAgg+ the server sees each device's counts (summary says so)
            self.recorder.ab(server_round, np.sum(counts, axis=0))
        self.recorder.trained(server_round, rows, failures=failures, released=arrays is not None)
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Record the round's per-user losses; return their means (unweighted: per user)."""
        record = self.recorder.evaluated(server_round, reply_metrics(replies))
        keys = ("global_loss", "personal_loss", "base_loss", "win_rate")
        means = {k: float(record[k]) for k in keys if k in record}
        return MetricRecord(means) if means else None


def _add_noise(arrays: ArrayRecord, std: float) -> ArrayRecord:
    """``arrays + N(0, std²)`` from a CSPRNG-seeded generator."""
    rng = np.random.default_rng(secrets.randbits(128))
    noised = {}
    for name in arrays:
        value = arrays[name].numpy()
        noised[name] = Array((value + rng.normal(0.0, std, size=value.shape)).astype(np.float32))
    log(INFO, "central DP: added N(0, %.3g²) to the averaged update", std)
    return ArrayRecord(noised)
