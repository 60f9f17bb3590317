"""Transport of LoRA tensors: state dict <-> Flower ``ArrayRecord``, and the one function that
builds what a device sends back.

Record keys follow Flower's own conventions (``"arrays"``, ``"metrics"``, ``"config"``,
``"num-examples"``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
NUM_EXAMPLES_KEY = "num-examples"

# Scalar metrics a device may report (DESIGN.md, "What leaves the device").
ALLOWED_TRAIN_METRICS = frozenset({NUM_EXAMPLES_KEY, "train_loss", "partition_id"})
ALLOWED_EVAL_METRICS = frozenset(
    {
        NUM_EXAMPLES_KEY,
        "partition_id",
        "n_train",
        "n_test",
        "base_loss",
        "global_loss",
        "personal_loss",
        "win",
    }
)


def to_arrayrecord(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Pack named tensors (any device/dtype) into an ``ArrayRecord`` of fp32 arrays."""
    return ArrayRecord(
        OrderedDict((n, t.detach().to("cpu", torch.float32)) for n, t in tensors.items())
    )


def from_arrayrecord(
    record: ArrayRecord, expected: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """Unpack an ``ArrayRecord``, checking names, shapes and finiteness against ``expected``.

    Raises:
        ValueError: On missing or unexpected names, wrong shapes, or NaN/Inf values.
    """
    names = set(record.keys())
    missing = sorted(set(expected) - names)
    extra = sorted(names - set(expected))
    if missing or extra:
        raise ValueError(
            f"array record does not match the model: missing {missing[:3]} "
            f"({len(missing)}), unexpected {extra[:3]} ({len(extra)})"
        )
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected.items():
        arr = record[name].numpy()
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"shape mismatch for {name}: got {arr.shape}, expected {shape}")
        if not np.isfinite(arr).all():
            raise ValueError(f"non-finite values in {name}")
        out[name] = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))
    return out


def build_outbound_record(
    shared: Mapping[str, torch.Tensor],
    *,
    shared_names: Collection[str],
    metrics: Mapping[str, float | int],
    allowed_metrics: frozenset[str],
) -> RecordDict:
    """Build the only record a device sends to the server.

    Args:
        shared: The shared (federated) tensors; nothing else may be passed.
        shared_names: Every shared tensor name of the strategy; ``shared`` must equal it.
        metrics: Scalar metrics, each in ``allowed_metrics``.
        allowed_metrics: The scalar metrics this message type may carry.

    Raises:
        ValueError: If a non-shared tensor or a non-allowed metric would leave the device.
    """
    if set(shared) != set(shared_names):
        leaked = sorted(set(shared) - set(shared_names))
        raise ValueError(f"outbound record must hold exactly the shared tensors; extra {leaked}")
    bad = sorted(set(metrics) - allowed_metrics)
    if bad:
        raise ValueError(f"metrics {bad} may not leave the device")
    content = RecordDict({METRICS_KEY: MetricRecord(dict(metrics))})
    if shared:
        content[ARRAYS_KEY] = to_arrayrecord(shared)
    return content
