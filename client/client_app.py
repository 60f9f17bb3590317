"""fedpersona ClientApp: thin Flower wiring around :class:`client.device.Device`.

One app serves both server paths. Message-API messages carry ``arrays`` + ``config``; the
SecAgg+ path uses Flower's legacy records (``fitins.*`` / ``evaluateins.*``) and the SecAgg+
protocol stages, which :func:`secagg_when_requested` hands to Flower's ``secaggplus_mod``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from client.device import Device, open_node_store, shared_shapes
from common import ab
from common.config import parse_run_config
from common.data import user_for_partition
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


def secagg_when_requested(msg: Message, ctxt: Context, call_next):  # type: ignore[no-untyped-def]
    """Run Flower's ``secaggplus_mod`` for SecAgg+ messages; pass others straight through."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


logger = logging.getLogger(__name__)
app = ClientApp(mods=[secagg_when_requested])


@contextmanager
def _device(context: Context) -> Iterator[Device]:
    """The device for this node, with its encrypted store open for the message's duration."""
    cfg = parse_run_config(dict(context.run_config))
    node = context.node_config
    try:
        partition_id = int(node["partition-id"])
        num_partitions = int(node["num-partitions"])
    except KeyError as err:
        raise ValueError(
            f"node config lacks {err}; start the SuperNode with --node-config 'partition-id=N "
            'num-partitions=M data-dir="DIR" key-file="FILE"\''
        ) from None
    simulated_dir = None
    if "data-dir" not in node:
        user = user_for_partition(
            partition_id,
            num_partitions,
            min_lines=cfg.data.min_lines,
            seed=cfg.seed,
            test_fraction=cfg.data.test_fraction,
        )
        simulated_dir = cfg.simulated_device_dir(context.run_id, user.user)
    store = open_node_store(node, simulated_dir=simulated_dir)
    try:
        yield Device(cfg, partition_id=partition_id, num_partitions=num_partitions, store=store)
    finally:
        store.close()


def _incoming(msg: Message, device: Device, kind: str) -> tuple[dict[str, torch.Tensor], int, bool]:
    """Global shared tensors and round number from either record style, validated.

    Raises:
        ValueError: The message has the wrong records, keys, shapes, dtypes or sizes, a
            non-finite value, or no valid ``server-round``; the reason is logged, nothing
            on the device is touched.
    """
    try:
        return _parse_incoming(msg, device, kind)
    except (KeyError, TypeError, ValueError) as err:
        reason = f"rejecting the server's {kind} message: {type(err).__name__}: {err}"
        logger.error(reason)
        raise ValueError(reason) from None


def _parse_incoming(
    msg: Message, device: Device, kind: str
) -> tuple[dict[str, torch.Tensor], int, bool]:
    shapes = shared_shapes(device.cfg)
    legacy_key = f"{kind}.parameters"
    if legacy_key in msg.content.array_records:
        to_ins = (
            compat.recorddict_to_fitins if kind == "fitins" else compat.recorddict_to_evaluateins
        )
        ins = to_ins(msg.content, keep_input=True)
        arrays = parameters_to_ndarrays(ins.parameters)
        tensors = ordered_tensors(arrays, device.rt.shared_names, shapes)
        return tensors, _round(ins.config.get("server-round")), True
    if ARRAYS_KEY not in msg.content.array_records:
        raise ValueError(f"no `{ARRAYS_KEY}` array record (got {sorted(msg.content.keys())})")
    if CONFIG_KEY not in msg.content.config_records:
        raise ValueError(f"no `{CONFIG_KEY}` config record")
    tensors = from_arrayrecord(msg.content[ARRAYS_KEY], shapes)
    return tensors, _round(msg.content[CONFIG_KEY].get("server-round")), False


def _round(value: object) -> int:
    """The server round from a message's config: a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`server-round` must be a positive integer, got {value!r}")
    return value


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on the device's data; reply with the clipped (noised) shared update only."""
    with _device(context) as device:
        global_shared, server_round, legacy = _incoming(msg, device, "fitins")
        result = device.train(global_shared, server_round=server_round)
    metrics = dict(result.metrics)
    cfg = device.cfg
    ab_vector = None
    if legacy:
        # SecAgg+ sums the update weighted by num_examples: 1 per participant, 0 if declined.
        metrics[NUM_EXAMPLES_KEY] = int(metrics["weight"])
        outbound = result.update
        if cfg.ab.interactions:
            # Every device appends the same-shaped vector (zeros when declining).
            counts = result.ab if result.ab is not None else np.zeros(ab.FIELDS)
            ab_vector = counts / ab.scale(cfg.ab.interactions, cfg.dp.clip_norm)
    else:
        outbound = {n: global_shared[n] + result.update[n] for n in result.update}
        if result.ab is not None:
            metrics.update(ab.to_metrics(result.ab))
    content = build_outbound_record(
        outbound,
        shared_names=device.rt.shared_names,
        metrics=metrics,
        allowed_metrics=ALLOWED_TRAIN_METRICS,
        legacy="fitres" if legacy else None,
        ab_vector=ab_vector,
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate base, global and personal models on the device's held-out text."""
    with _device(context) as device:
        global_shared, server_round, legacy = _incoming(msg, device, "evaluateins")
        metrics = device.evaluate(global_shared, server_round=server_round)
    content = build_outbound_record(
        {},
        shared_names=device.rt.shared_names,
        metrics=metrics,
        allowed_metrics=ALLOWED_EVAL_METRICS,
        legacy="evaluateres" if legacy else None,
    )
    return Message(content=content, reply_to=msg)
