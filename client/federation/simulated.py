"""What only a simulated device has: the Shakespeare role it replays, the audit's canaries
planted in its training set, the simulated user who rates its answers for the A/B counts, and
the simulated node's line in its run's engine timings.

A simulation runs the same ClientApp and :class:`~client.federation.device.Device` as a deployment;
this module is the part that stands in for the user. It lives in ``client/`` because the ClientApp
a simulation runs may only import downward; everything here is keyed by the partition id,
which a real device does not have (its node config names a store, not a role).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time

import torch
from flwr.app import Context

from common import ab, audit
from common.config import RunConfig
from common.corpus import user_for_partition
from common.data import Encoded, UserData, encode
from common.lora import load_lora_tensors
from common.train import per_example_losses

log = logging.getLogger(__name__)


def simulated_user(cfg: RunConfig, partition_id: int, num_partitions: int) -> UserData:
    """The user a simulated device with ``partition_id`` plays: a Shakespeare role, or a user
    of the run's corpus (``data.corpus``, :mod:`common.corpus`).

    Raises:
        ValueError: If the partition id is out of range or too few roles qualify.
    """
    # Canary clients of the audit take no user's data (common.audit.data_partition).
    partition_id, num_partitions = audit.data_partition(cfg, partition_id, num_partitions)
    return user_for_partition(
        cfg.data, seed=cfg.seed, partition_id=partition_id, num_partitions=num_partitions
    )


def planted_canaries(cfg: RunConfig, partition_id: int | None, tokenizer, max_len: int) -> tuple:
    """The audit's canaries (its own secrets, not the user's) a simulated device adds to its
    training set, tokenized; none on a real device (``partition_id`` is ``None``)."""
    if partition_id is None:
        return ()
    return tuple(encode(c, tokenizer, max_len) for c in audit.planted(cfg, partition_id))


def simulated_ratings(
    model: torch.nn.Module,
    models: dict[str, dict[str, torch.Tensor]],
    test_set: list[Encoded],
    *,
    seed: int,
    user: str,
    batch_size: int,
    server_round: int,
    count: int,
) -> list[tuple[str, int]]:
    """``count`` ``(arm, rating)`` pairs from a simulated user: each rates the answer of a
    coin-chosen model of ``models`` (``base``, ``global``, ``personal``: the LoRA tensors each
    loads into ``model``) to a held-out prompt of ``test_set``, higher the better that model
    predicts the user's own reply (:func:`common.ab.simulated_rating`); the coins are drawn from
    the run's ``seed``, the round and the ``user``."""
    if count <= 0 or not test_set:
        return []
    rng = random.Random(f"ab:{seed}:{server_round}:{user}")
    idx = [(server_round * count + i) % len(test_set) for i in range(count)]
    samples: list[Encoded] = [test_set[i] for i in idx]
    arms = [rng.choice(ab.ARMS) for _ in idx]
    losses = {}
    with torch.no_grad():
        for name, tensors in models.items():
            load_lora_tensors(model, tensors)
            losses[name] = per_example_losses(model, samples, batch_size=batch_size)
    return [
        (arm, ab.simulated_rating(losses[arm][i], losses["base"][i])) for i, arm in enumerate(arms)
    ]


ENGINE_TIMINGS = "engine_timings.jsonl"


def engine_time(
    context: Context,
    cfg: RunConfig,
    server_round: int,
    *,
    started: float | None,
    device_s: float,
    users: int,
) -> None:
    """A simulated node's line in its run's ``engine_timings.jsonl``: how long the node
    answered this train message (store open, device set-up, decoding and encoding included)
    and how much of it the devices' own rounds took (``Device.train``). The simulation
    engine's per-client overhead is measured from these (``benchmarks.scaling``); a deployed
    device (``data-dir`` in its node config) writes nothing."""
    run_dir = cfg.run_dir(context.run_id)
    # A deployed device writes nothing; nor does a node whose server made no run folder here.
    if started is None or not users or "data-dir" in context.node_config or not run_dir.is_dir():
        return
    line = {
        "round": server_round,
        "users": users,
        "node_s": time.perf_counter() - started,
        "device_s": device_s,
        "pid": os.getpid(),
    }
    # One short append per message: atomic beside other processes' appends (O_APPEND). A
    # measurement never fails a round: an unwritable folder costs the line, not the update.
    try:
        fd = os.open(run_dir / ENGINE_TIMINGS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (json.dumps(line) + "\n").encode())
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("engine timings not written to %s: %s", run_dir, exc)
