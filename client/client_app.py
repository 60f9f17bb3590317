"""fedpersona ClientApp: thin Flower wiring around :class:`client.device.Device`."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.device import Device, shared_shapes
from common.config import parse_run_config
from common.data import user_for_partition
from common.serialization import (
    ALLOWED_EVAL_METRICS,
    ALLOWED_TRAIN_METRICS,
    ARRAYS_KEY,
    CONFIG_KEY,
    build_outbound_record,
    from_arrayrecord,
)

app = ClientApp()


def _device(context: Context) -> Device:
    cfg = parse_run_config(dict(context.run_config))
    node = context.node_config
    try:
        partition_id = int(node["partition-id"])
        num_partitions = int(node["num-partitions"])
    except KeyError as err:
        raise ValueError(
            f"node config lacks {err}; start the SuperNode with "
            "--node-config 'partition-id=N num-partitions=M data-dir=\"DIR\"'"
        ) from None
    if "data-dir" in node:
        data_dir = Path(str(node["data-dir"])).expanduser()
    else:
        user = user_for_partition(
            partition_id,
            num_partitions,
            min_lines=cfg.data.min_lines,
            seed=cfg.seed,
            test_fraction=cfg.data.test_fraction,
        )
        data_dir = cfg.simulated_device_dir(context.run_id, user.user)
    return Device(cfg, partition_id=partition_id, num_partitions=num_partitions, data_dir=data_dir)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on the device's data; reply with the shared tensors only."""
    device = _device(context)
    shapes = shared_shapes(device.cfg)
    global_shared = from_arrayrecord(msg.content[ARRAYS_KEY], shapes)
    server_round = int(msg.content[CONFIG_KEY]["server-round"])
    shared, metrics = device.train(global_shared, server_round=server_round)
    content = build_outbound_record(
        shared, shared_names=shapes, metrics=metrics, allowed_metrics=ALLOWED_TRAIN_METRICS
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate base, global and personal models on the device's held-out text."""
    device = _device(context)
    global_shared = from_arrayrecord(msg.content[ARRAYS_KEY], shared_shapes(device.cfg))
    server_round = int(msg.content[CONFIG_KEY]["server-round"])
    metrics = device.evaluate(global_shared, server_round=server_round)
    content = build_outbound_record(
        {}, shared_names=(), metrics=metrics, allowed_metrics=ALLOWED_EVAL_METRICS
    )
    return Message(content=content, reply_to=msg)
