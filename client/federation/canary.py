"""A canary client of the user-level privacy audit (:mod:`common.audit`, "canary clients"):
a simulated participant without data that, in each round it is sampled, sends a fixed random
direction of norm ``C`` of its own — through the same privatize step (clip, noise share, or
the skellam integers) as every device, so the audit sees the mechanism the accountant
analyses."""

from __future__ import annotations

import torch

from client.federation.device import TrainResult
from client.federation.runtime import Runtime, get_runtime
from common import audit
from common.config import RunConfig
from common.dp.privatize import Privatize


def canary_update(
    cfg: RunConfig, rt: Runtime, j: int, *, server_round: int, run: str
) -> TrainResult:
    """Canary client ``j``'s update this round (it takes part: the caller checked
    :func:`common.audit.clients_included`)."""
    shapes = {n: tuple(rt.shapes[n]) for n in rt.shared_names}
    direction = audit.client_direction(cfg, j, shapes)
    update = {
        n: torch.from_numpy(direction[n] * cfg.dp.clip_norm).to(torch.float32) for n in shapes
    }
    privatize = Privatize.of(cfg, cfg.data.num_users)
    update, _, encoded = privatize.leaving(
        update, rt.shared_names, run=run, server_round=server_round
    )
    metrics = {
        "train_loss": 0.0,
        "num-examples": 0,
        "weight": 1,
        "declined": 0,
        "record_epsilon": 0.0,
        "user_epsilon": 0.0,
    }
    return TrainResult(update, metrics, declined=False, encoded=encoded, canary=True)


def hosted_canaries(
    cfg: RunConfig, users: list[int], *, server_round: int, run: str
) -> tuple[list[TrainResult], list[int]]:
    """The updates of the privacy audit's canary clients among ``users`` that take part and
    are sampled this round (by the audit's own coins, :mod:`common.audit`), and the users
    with data."""
    canaries = {u: audit.canary_client(cfg, u) for u in users}
    if not any(j is not None for j in canaries.values()):
        return [], users
    included, rt = audit.clients_included(cfg), get_runtime(cfg)
    results = [
        canary_update(cfg, rt, j, server_round=server_round, run=run)
        for j in canaries.values()
        if j is not None
        and included[j]
        and server_round in audit.client_rounds(cfg, j, server_round)
    ]
    return results, [u for u in users if canaries[u] is None]
