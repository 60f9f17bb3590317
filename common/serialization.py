"""Transport of LoRA tensors: state dict <-> Flower ``ArrayRecord``, and the one function that
builds what a device sends back.

Record keys follow Flower's own conventions (``"arrays"``, ``"metrics"``, ``"config"``,
``"num-examples"``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat

from common import ab, loss_sums

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
NUM_EXAMPLES_KEY = "num-examples"

# Scalar metrics a device may report (docs/architecture.md, "What leaves the device").
ALLOWED_TRAIN_METRICS = frozenset(
    {
        NUM_EXAMPLES_KEY,
        "train_loss",
        "partition_id",
        "weight",
        "users",
        "declined",
        "noise_shares",  # late declines' noise shares a masked reply carries (weight 1 each)
        "record_epsilon",
        "user_epsilon",
        *ab.METRIC_KEYS,
    }
)
ALLOWED_EVAL_METRICS = frozenset(
    {
        NUM_EXAMPLES_KEY,
        "partition_id",
        "n_train",
        "n_test",
        "base_loss",
        "global_loss",
        "personal_loss",
        "local_only_loss",
        "mix_weight",
        "win",
        "losses_withheld",  # a real device whose owner shares no per-device losses
        "record_epsilon",
        "user_epsilon",
        "declined_rounds",
        "rounds_trained",  # simulated devices only
    }
)


# A simulation node hosting several users reports each one's evaluation as "<metric>#<i>".
HOSTED_SEP = "#"


def metric_base(key: str) -> str:
    """The metric a (possibly hosted-user) metric key reports: ``personal_loss#3`` -> its base."""
    return key.split(HOSTED_SEP, 1)[0]


def to_arrayrecord(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Pack named tensors (any device/dtype) into an ``ArrayRecord`` of fp32 arrays."""
    return ArrayRecord(
        OrderedDict((n, t.detach().to("cpu", torch.float32)) for n, t in tensors.items())
    )


# The largest magnitude a LoRA tensor entry may have on the wire. Factors start at ~1/√d and
# every released round moves them by a clipped (norm <= C) update plus noise: entries stay
# orders of magnitude below this. A finite but huge value (3e38) would overflow every forward
# pass of the model it is put into, so it is refused like NaN.
MAX_ABS_VALUE = 1e4
_FLOAT_DTYPES = ("float32", "float16", "float64")
_NPY_HEADER_BYTES = 4096  # an .npy header is at most a few hundred bytes


def _declared_problem(array: Array, shape: tuple[int, ...], name: str) -> str:
    """What is wrong with an array's declared shape, dtype or payload size ('' if nothing):
    checked before its bytes are decoded, so an oversized payload is never materialized."""
    declared = tuple(array.shape)
    if declared != tuple(shape):
        return f"shape mismatch for {name}: got {declared}, expected {tuple(shape)}"
    if array.dtype not in _FLOAT_DTYPES:
        return f"{name} has dtype {array.dtype}, expected floating point"
    return _oversized(array, shape, name)


def _oversized(array: Array, shape: Sequence[int], name: str) -> str:
    """Why ``array``'s payload is too large for ``shape`` ('' if it is not): the most an
    encoded array of that shape can take is float64 entries and an .npy header."""
    limit = int(np.prod(shape, dtype=np.int64)) * 8 + _NPY_HEADER_BYTES
    if len(array.data) > limit:
        return f"{name} carries {len(array.data)} bytes, more than its shape can hold ({limit})"
    return ""


def check_declared(record: ArrayRecord, shapes: Sequence[tuple[int, ...]]) -> None:
    """Check a legacy (``fitins.parameters``) array record's count and payload sizes against
    ``shapes`` before anything is decoded. Its arrays are opaque ``.npy`` blobs (Flower
    declares no shape for them); their shapes and values are checked once decoded
    (:func:`ordered_tensors`).

    Raises:
        ValueError: On a wrong count or a payload larger than its array can be.
    """
    if len(record) != len(shapes):
        raise ValueError(f"expected {len(shapes)} arrays, got {len(record)}")
    for i, (array, shape) in enumerate(zip(record.values(), shapes, strict=True)):
        problem = _oversized(array, shape, f"array {i}")
        if problem:
            raise ValueError(problem)


def check_values(arr: np.ndarray, name: str) -> None:
    """Refuse NaN/Inf and magnitudes beyond :data:`MAX_ABS_VALUE`.

    Raises:
        ValueError: Naming the array and the problem.
    """
    if not np.isfinite(arr).all():
        raise ValueError(f"non-finite values in {name}")
    if arr.size and float(np.abs(arr).max()) > MAX_ABS_VALUE:
        raise ValueError(
            f"{name} has entries of magnitude up to {float(np.abs(arr).max()):.3g}, beyond "
            f"{MAX_ABS_VALUE:g} (no released LoRA tensor comes near it)"
        )


def from_arrayrecord(
    record: ArrayRecord, expected: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """Unpack an ``ArrayRecord``, checking names, shapes and values against ``expected``.

    The declared shape, dtype and payload size are checked before the bytes are decoded, so
    an oversized payload is refused without being materialized.

    Raises:
        ValueError: On missing or unexpected names, wrong shapes, dtypes or sizes,
            undecodable bytes, NaN/Inf values or magnitudes beyond :data:`MAX_ABS_VALUE`.
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
        problem = _declared_problem(record[name], shape, name)
        if problem:
            raise ValueError(problem)
        try:
            arr = record[name].numpy()
        except (ValueError, TypeError) as err:
            raise ValueError(f"{name} cannot be decoded: {err}") from err
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"shape mismatch for {name}: got {arr.shape}, expected {shape}")
        check_values(arr, name)
        out[name] = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))
    return out


def build_outbound_record(
    shared: Mapping[str, torch.Tensor],
    *,
    shared_names: Sequence[str],
    metrics: Mapping[str, float | int],
    allowed_metrics: frozenset[str],
    legacy: str | None = None,
    ab_vector: np.ndarray | None = None,
    discrete: np.ndarray | None = None,
    loss_vector: np.ndarray | None = None,
) -> RecordDict:
    """Build the only record a device sends to the server.

    Args:
        shared: The shared (federated) tensors — or their clipped, noised update; nothing
            else may be passed.
        shared_names: Every shared tensor name of the strategy, in canonical order;
            ``shared`` must hold exactly these.
        metrics: Scalar metrics, each in ``allowed_metrics``.
        allowed_metrics: The scalar metrics this message type may carry.
        legacy: ``None`` for the Message API; ``"fitres"`` / ``"evaluateres"`` for Flower's
            legacy workflow (the SecAgg+ path), whose arrays are an unnamed list in
            ``shared_names`` order.
        ab_vector: ``fitres`` only: the scaled A/B counts (``common/ab.py``), appended after
            the shared tensors so that SecAgg+ sums them with the update (``skellam`` mode:
            the counts themselves, as integers).
        loss_vector: ``fitres`` only: the scaled held-out losses (``common/loss_sums.py``,
            ``eval.secure-sums``), appended last so that SecAgg+ sums them too.
        discrete: ``fitres`` only, ``skellam`` mode: the update encoded as integers
            (:mod:`common.dp.discrete`), sent in place of the tensors (``shared`` is then
            empty); float64, which holds them exactly, for SecAgg+'s identity quantizer.

    Raises:
        ValueError: If a non-shared tensor or a non-allowed metric would leave the device.
    """
    if set(shared) and set(shared) != set(shared_names):
        leaked = sorted(set(shared) ^ set(shared_names))
        raise ValueError(f"outbound record must hold exactly the shared tensors; off by {leaked}")
    bad = sorted(k for k in metrics if metric_base(k) not in allowed_metrics)
    if bad:
        raise ValueError(f"metrics {bad} may not leave the device")
    if legacy is None:
        content = RecordDict({METRICS_KEY: MetricRecord(dict(metrics))})
        if shared:
            content[ARRAYS_KEY] = to_arrayrecord(shared)
        return content
    num_examples = int(metrics.get(NUM_EXAMPLES_KEY, 0))
    scalars = {k: v for k, v in metrics.items() if k != NUM_EXAMPLES_KEY}
    status = Status(code=Code.OK, message="declined" if scalars.get("declined") else "ok")
    if discrete is not None and (legacy != "fitres" or shared):
        raise ValueError("an encoded update leaves only in a SecAgg+ fitres, without tensors")
    if legacy == "fitres":
        dtype = np.float32 if discrete is None else np.float64
        if discrete is None:
            arrays = [shared[n].detach().to("cpu", torch.float32).numpy() for n in shared_names]
        else:
            arrays = [np.asarray(discrete, dtype=np.float64).reshape(-1)]
        if ab_vector is not None:
            if ab_vector.shape != (ab.FIELDS,):
                raise ValueError(f"A/B vector must have shape ({ab.FIELDS},)")
            arrays.append(np.asarray(ab_vector, dtype=dtype))
        if loss_vector is not None:
            if discrete is not None or loss_vector.shape != (len(loss_sums.FIELDS),):
                raise ValueError(
                    f"a loss vector has shape ({len(loss_sums.FIELDS)},), beside real numbers"
                )
            arrays.append(np.asarray(loss_vector, dtype=dtype))
        res = FitRes(status, ndarrays_to_parameters(arrays), num_examples, scalars)
        return compat.fitres_to_recorddict(res, keep_input=False)
    if legacy == "evaluateres":
        if shared:
            raise ValueError("an evaluate reply carries no tensors")
        loss = float(scalars.get("personal_loss", 0.0))
        return compat.evaluateres_to_recorddict(EvaluateRes(status, loss, num_examples, scalars))
    raise ValueError(f"unknown legacy record type {legacy!r}")


def ordered_tensors(
    arrays: list[np.ndarray], names: Sequence[str], expected: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """Name an unnamed legacy array list (in ``names`` order) and validate it like
    :func:`from_arrayrecord`.

    Raises:
        ValueError: On a wrong count, shape or dtype, or a non-finite value.
    """
    if len(arrays) != len(names):
        raise ValueError(f"expected {len(names)} arrays, got {len(arrays)}")
    for name, arr in zip(names, arrays, strict=True):
        if np.asarray(arr).dtype.kind != "f":
            raise ValueError(f"{name} has dtype {np.asarray(arr).dtype}, expected floating point")
    record = ArrayRecord(
        {n: Array(np.asarray(a, dtype=np.float32)) for n, a in zip(names, arrays, strict=True)}
    )
    return from_arrayrecord(record, expected)


def reply_problem(
    content: RecordDict,
    *,
    train: bool,
    expected: Mapping[str, tuple[int, ...]] | None,
    allowed_metrics: frozenset[str],
    required_metrics: Sequence[str] = (),
) -> str:
    """Why a device's Message-API reply is malformed ('' when it is well formed).

    A well-formed reply holds exactly one ``metrics`` record (allowed keys, finite numbers,
    ``required_metrics`` present) and, for training, one ``arrays`` record of float32 arrays:
    exactly the ``expected`` names and shapes when given, finite. Nothing else.
    """
    expected_keys = {METRICS_KEY} | ({ARRAYS_KEY} if train else set())
    keys = set(content.keys())
    if keys != expected_keys:
        return f"record keys {sorted(keys)}, expected {sorted(expected_keys)}"
    metrics = content[METRICS_KEY]
    if not isinstance(metrics, MetricRecord):
        return f"`{METRICS_KEY}` is a {type(metrics).__name__}, expected a MetricRecord"
    bad = sorted(k for k in metrics if metric_base(k) not in allowed_metrics)
    if bad:
        return f"metrics {bad[:5]} are not allowed"
    present = {metric_base(k) for k in metrics}
    missing = [k for k in required_metrics if k not in present]
    if missing:
        return f"metrics {missing} missing"
    for key, value in metrics.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            return f"metric {key} is a {type(value).__name__}, expected a number"
        if not np.isfinite(value):
            return f"metric {key} is not finite"
    if not train:
        return ""
    arrays = content[ARRAYS_KEY]
    if not isinstance(arrays, ArrayRecord):
        return f"`{ARRAYS_KEY}` is a {type(arrays).__name__}, expected an ArrayRecord"
    for name in arrays:
        if arrays[name].dtype != "float32":
            return f"{name} has dtype {arrays[name].dtype}, expected float32"
    try:
        from_arrayrecord(arrays, expected or {n: tuple(arrays[n].shape) for n in arrays})
    except ValueError as err:
        return str(err)
    return ""
