"""The heavy half of the ClientApp: a device's training and evaluation replies.

:mod:`client.client_app` imports only Flower, so that the SecAgg+ protocol stages (setup,
key sharing, unmasking) start in a fraction of a second; this module imports torch, peft and
the device and runs wherever the model lives — in the ClientApp process, or in the device's
long-lived worker (:mod:`client.worker`), which keeps it loaded across messages.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from flwr.app import Context, RecordDict
from flwr.common import parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from client.device import Device, open_node_store, shared_shapes, simulated_user
from common import ab
from common.config import RunConfig, parse_run_config
from common.serialization import (
    ALLOWED_EVAL_METRICS,
    ALLOWED_TRAIN_METRICS,
    ARRAYS_KEY,
    CONFIG_KEY,
    NUM_EXAMPLES_KEY,
    build_outbound_record,
    from_arrayrecord,
    ordered_tensors,
)

logger = logging.getLogger(__name__)


@contextmanager
def _device(context: Context) -> Iterator[Device]:
    """The device for this node, with its encrypted store open for the message's duration.

    A real device's node config names its store (``data-dir``, ``key-file``); it trains on
    what that store holds. A simulated device (no ``data-dir``) gets a store of its own in the
    run directory, filled once with the role its ``partition-id`` picks — then it is the same
    device code over the same kind of store.
    """
    cfg = parse_run_config(dict(context.run_config))
    node = context.node_config
    partition_id = _optional_int(node, "partition-id")
    num_partitions = _optional_int(node, "num-partitions")
    if "data-dir" in node:
        store = open_node_store(node)
        try:
            yield Device(
                cfg,
                store=store,
                num_partitions=num_partitions or federation_size(cfg),
                partition_id=partition_id,
            )
        finally:
            store.close()
        return
    if partition_id is None or num_partitions is None:
        raise ValueError(
            "node config has no data-dir: start a device's SuperNode with --node-config "
            '\'data-dir="DIR" key-file="FILE"\' (a simulated one needs partition-id and '
            "num-partitions, which Flower's simulation sets)"
        )
    user = simulated_user(cfg, partition_id, num_partitions)
    store = open_node_store(node, simulated_dir=cfg.simulated_device_dir(context.run_id, user.user))
    try:
        yield Device.simulated(
            cfg, store=store, partition_id=partition_id, num_partitions=num_partitions
        )
    finally:
        store.close()


def _optional_int(node: object, key: str) -> int | None:
    value = node.get(key) if hasattr(node, "get") else None  # type: ignore[union-attr]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"node config `{key}` must be an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"node config `{key}` must be an integer, got {value!r}") from None


def federation_size(cfg: RunConfig) -> int:
    """The federation size a real device sizes its share of distributed noise by, when its node
    config has no ``num-partitions``: ``data.num-users``, else ``dp.min-clients`` (which then
    fixes m_min), else 1 where no distributed noise is added.

    Raises:
        ValueError: Distributed noise with neither key set: the share cannot be sized.
    """
    if cfg.data.num_users > 0:
        return cfg.data.num_users
    if cfg.dp.min_clients > 0:
        return cfg.dp.min_clients
    if cfg.dp.noise_mode != "distributed" or not cfg.dp.adds_noise:
        return 1
    raise ValueError(
        "the device cannot size its share of the noise: the run config sets neither "
        "data.num-users nor dp.min-clients, and the node config has no num-partitions"
    )
