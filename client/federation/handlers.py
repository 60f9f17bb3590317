"""The heavy half of the ClientApp: a device's training and evaluation replies.

:mod:`client.client_app` imports only Flower, so that the SecAgg+ protocol stages (setup,
key sharing, unmasking) start in a fraction of a second; this module imports torch, peft and
the device and runs wherever the model lives — in the ClientApp process, or in the device's
long-lived worker (:mod:`client.federation.worker`), which keeps it loaded across messages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from flwr.app import Context, RecordDict
from flwr.common import parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from client.federation.canary import hosted_canaries
from client.federation.device import Device, TrainResult, open_node_store
from client.federation.gate import federation_size
from client.federation.runtime import get_runtime, shared_shapes
from client.federation.secagg_stage import masking
from client.federation.simulated import engine_time, simulated_user
from common import ab, audit, loss_sums
from common.config import RunConfig, parse_run_config
from common.dp.discrete import centred
from common.dp.privatize import Privatize, ab_in_range
from common.sampling import poisson_sample
from common.serialization import (
    ALLOWED_EVAL_METRICS,
    ALLOWED_TRAIN_METRICS,
    ARRAYS_KEY,
    CONFIG_KEY,
    HOSTED_SEP,
    NUM_EXAMPLES_KEY,
    build_outbound_record,
    check_declared,
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
                # The server may ask; the device's owner decides (node config).
                local_baseline=cfg.eval.local_only
                and str(node.get("local-only-baseline", "false")).lower() == "true",
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
    if not isinstance(value, bool) and isinstance(value, (int, str)) and str(value).isdigit():
        return int(value)
    raise ValueError(f"node config `{key}` must be an integer >= 0, got {value!r}")


def _incoming(
    content: RecordDict, cfg: RunConfig, kind: str
) -> tuple[dict[str, torch.Tensor], int, bool]:
    """Global shared tensors and round number from either record style, validated.

    Raises:
        ValueError: The message has the wrong records, keys, shapes, dtypes or sizes, a
            non-finite value, or no valid ``server-round``; the reason is logged, nothing
            on the device is touched.
    """
    try:
        return _parse_incoming(content, cfg, kind)
    except (KeyError, TypeError, ValueError) as err:
        reason = f"rejecting the server's {kind} message: {type(err).__name__}: {err}"
        logger.error(reason)
        raise ValueError(reason) from None


def _parse_incoming(
    content: RecordDict, cfg: RunConfig, kind: str
) -> tuple[dict[str, torch.Tensor], int, bool]:
    shapes = shared_shapes(cfg)
    shared_names = list(shapes)
    legacy_key = f"{kind}.parameters"
    if legacy_key in content.array_records:
        # Count, shapes, dtypes and sizes as declared, before any payload is decoded.
        check_declared(content.array_records[legacy_key], [shapes[n] for n in shared_names])
        to_ins = (
            compat.recorddict_to_fitins if kind == "fitins" else compat.recorddict_to_evaluateins
        )
        ins = to_ins(content, keep_input=True)
        arrays = parameters_to_ndarrays(ins.parameters)
        tensors = ordered_tensors(arrays, shared_names, shapes)
        return tensors, _round(ins.config.get("server-round")), True
    if ARRAYS_KEY not in content.array_records:
        raise ValueError(f"no `{ARRAYS_KEY}` array record (got {sorted(content.keys())})")
    if CONFIG_KEY not in content.config_records:
        raise ValueError(f"no `{CONFIG_KEY}` config record")
    tensors = from_arrayrecord(content[ARRAYS_KEY], shapes)
    return tensors, _round(content[CONFIG_KEY].get("server-round")), False


def _fit_config(content: RecordDict) -> dict[str, Any]:
    """The legacy fit message's config (the server's round config: ``skellam`` mode's offer
    among it); empty for a Message-API message."""
    record = content.config_records.get("fitins.config")
    return dict(record) if record is not None else {}


def _encoded_sum(
    cfg: RunConfig, privatize: Privatize, vectors: list[np.ndarray | None], legacy: bool
) -> np.ndarray:
    """``skellam`` mode: what a node masks — the sum of its users' integer vectors as
    centred residues (zeros, sent with weight 0, when none trained).

    Raises:
        ValueError: Outside the SecAgg+ path (the integers are meant to be masked).
    """
    if not legacy:
        raise ValueError('dp.noise-mode = "skellam" runs only through SecAgg+ (secagg.enabled)')
    dim = sum(int(np.prod(s)) for s in shared_shapes(cfg).values())
    params = privatize.discrete_params(dim)
    total = np.zeros(params.d, dtype=np.int64)
    for vector in vectors:
        if vector is not None:
            total += vector
    return centred(total, params.bits)


def _round(value: object) -> int:
    """The server round from a message's config: a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`server-round` must be a positive integer, got {value!r}")
    return value


def _hosted_users(context: Context, cfg: RunConfig) -> list[int] | None:
    """The users a simulation node hosts (``simulation.users-per-node`` > 1), else ``None``."""
    k = cfg.users_per_node
    if k <= 1 or "data-dir" in context.node_config:
        return None
    node = _optional_int(context.node_config, "partition-id")
    if node is None:
        raise ValueError("a simulation node hosting users needs its partition-id")
    return list(range(node * k, min((node + 1) * k, cfg.data.num_users)))


@contextmanager
def _hosted_device(context: Context, cfg: RunConfig, user: int) -> Iterator[Device]:
    """Hosted user ``user``'s own simulated device: its store, state and ledger."""
    n = cfg.data.num_users
    role = simulated_user(cfg, user, n)
    store = open_node_store({}, simulated_dir=cfg.simulated_device_dir(context.run_id, role.user))
    try:
        yield Device.simulated(cfg, store=store, partition_id=user, num_partitions=n)
    finally:
        store.close()


def _train_hosted(
    content: RecordDict, context: Context, users: list[int], *, started: float | None
) -> RecordDict:
    """A simulation node's training reply for the users it hosts.

    Each hosted user is in this round with probability ``fraction-train`` (Poisson, drawn from
    the OS's randomness) and trains on its own device exactly as a one-user node would: own
    store, ledger, clipping and noise share. The node sends the mean of the updates that
    arrived with their count as weight (``users``), so the server's weighted mean is the mean
    over users; declines are counted, nothing of them is sent (canary clients: the audit's).
    """
    cfg = parse_run_config(dict(context.run_config))
    rt = get_runtime(cfg)
    global_shared, server_round, legacy = _incoming(content, cfg, "fitins")
    run = str(context.run_id)
    results, with_data = hosted_canaries(cfg, users, server_round=server_round, run=run)
    chosen = poisson_sample(with_data, cfg.fraction_train)
    device_s = 0.0
    for user in chosen:
        with _hosted_device(context, cfg, user) as device:
            start = time.perf_counter()
            results.append(
                device.train(
                    global_shared,
                    server_round=server_round,
                    run=run,
                    masked=masking(),
                    self_sampled=True,  # the coin above, at fraction-train
                    offer=_fit_config(content),
                )
            )
            device_s += time.perf_counter() - start
    sent = [r for r in results if not r.declined]
    k = len(sent)
    # What is masked: the users who trained, and the noise shares of those who declined late.
    carried = sent + [r for r in results if r.noise_share]
    w = len(carried)
    privatize = Privatize.of(cfg, cfg.data.num_users)
    encoded = None
    if privatize.discrete:  # the users' integers, summed (each carries its own noise share)
        encoded = _encoded_sum(cfg, privatize, [r.encoded for r in carried], legacy)
        update: dict[str, torch.Tensor] = {}
    else:
        update = {
            n: (sum(r.update[n] for r in carried) / w if w else torch.zeros_like(t))
            for n, t in global_shared.items()
        }
    metrics = _hosted_metrics(results, sent, noise_shares=w - k)
    counts = sum((r.ab for r in sent if r.ab is not None), np.zeros(ab.FIELDS))
    ab_vector = None
    if legacy and encoded is not None:
        # skellam: weight 1 (SecAgg+'s identity quantizer) for a sum of w >= 1 integer vectors
        metrics[NUM_EXAMPLES_KEY] = int(w > 0)
        if cfg.ab.interactions:
            ab_vector = counts
    elif legacy:
        # SecAgg+ weights the mean by it; the server counts users (``users``) and rescales.
        metrics[NUM_EXAMPLES_KEY] = w
        if cfg.ab.interactions:  # the weighted mean over nodes must sum the counts
            ab_vector = ab_in_range(cfg, counts / max(w, 1))
    elif cfg.ab.interactions and k:
        metrics.update(ab.to_metrics(counts))
    loss_vector = None
    if legacy and cfg.eval.secure_sums:  # the weighted mean over nodes must sum the entries
        entries = sum((r.losses for r in sent if r.losses is not None), loss_sums.nothing())
        loss_vector = loss_sums.to_masked(entries / max(w, 1), clip_norm=cfg.dp.clip_norm)
    record = build_outbound_record(
        update,
        shared_names=rt.shared_names,
        metrics=metrics,
        allowed_metrics=ALLOWED_TRAIN_METRICS,
        legacy="fitres" if legacy else None,
        ab_vector=ab_vector,
        discrete=encoded,
        loss_vector=loss_vector,
    )
    engine_time(context, cfg, server_round, started=started, device_s=device_s, users=len(chosen))
    return record


def _hosted_metrics(
    results: list[TrainResult], sent: list[TrainResult], *, noise_shares: int
) -> dict[str, float | int]:
    """A simulation node's clear metrics: its users who trained, declined or sent only
    their noise share, their examples, mean training loss and largest ε."""
    trained = [r.metrics["train_loss"] for r in sent if not r.canary]
    return {
        "users": len(sent),
        "weight": len(sent),
        "declined": len(results) - len(sent),
        **({"noise_shares": noise_shares} if noise_shares else {}),
        "num-examples": int(sum(r.metrics["num-examples"] for r in sent)),
        # No loss from a node whose updates all came from the audit's canary clients.
        **({"train_loss": sum(trained) / max(len(trained), 1)} if trained or not sent else {}),
        "record_epsilon": max((r.metrics["record_epsilon"] for r in results), default=0.0),
        "user_epsilon": max((r.metrics["user_epsilon"] for r in results), default=0.0),
    }


def _evaluate_hosted(content: RecordDict, context: Context, users: list[int]) -> RecordDict:
    """A simulation node's evaluation reply: each hosted user's metrics as ``<metric>#<i>``."""
    cfg = parse_run_config(dict(context.run_config))
    rt = get_runtime(cfg)
    global_shared, server_round, legacy = _incoming(content, cfg, "evaluateins")
    metrics: dict[str, float | int] = {}
    for i, user in enumerate(users):
        if audit.canary_client(cfg, user) is not None:  # no data, nothing to evaluate
            continue
        with _hosted_device(context, cfg, user) as device:
            row = device.evaluate(global_shared, server_round=server_round, run=str(context.run_id))
        metrics.update({f"{k}{HOSTED_SEP}{i}": v for k, v in row.items()})
    metrics[NUM_EXAMPLES_KEY] = len(users)
    return build_outbound_record(
        {},
        shared_names=rt.shared_names,
        metrics=metrics,
        allowed_metrics=ALLOWED_EVAL_METRICS,
        legacy="evaluateres" if legacy else None,
    )


def train(content: RecordDict, context: Context, *, started: float | None = None) -> RecordDict:
    """Train on the device's data; the reply holds the clipped (noised) shared update only.
    ``started``: when the message arrived (``perf_counter``), for the engine's timings."""
    hosted = _hosted_users(context, parse_run_config(dict(context.run_config)))
    if hosted is not None:
        return _train_hosted(content, context, hosted, started=started)
    with _device(context) as device:
        global_shared, server_round, legacy = _incoming(content, device.cfg, "fitins")
        start = time.perf_counter()
        result = device.train(
            global_shared,
            server_round=server_round,
            run=str(context.run_id),
            masked=masking(),
            offer=_fit_config(content),
        )
        device_s = time.perf_counter() - start
        privatize = device.privatize
        encoded = (
            _encoded_sum(device.cfg, privatize, [result.encoded], legacy)
            if privatize.discrete
            else None
        )
    metrics = dict(result.metrics)
    cfg = device.cfg
    ab_vector = loss_vector = None
    if legacy and cfg.eval.secure_sums:  # every device appends it (zeros when declining)
        entry = result.losses if result.losses is not None else loss_sums.nothing()
        loss_vector = loss_sums.to_masked(entry, clip_norm=cfg.dp.clip_norm)
    if legacy:
        # SecAgg+ sums the update weighted by num_examples: 1 per participant, 0 if declined
        # (1 for a late decline's noise share: the server counts users, ``declined``).
        metrics[NUM_EXAMPLES_KEY] = 1 if result.noise_share else int(metrics["weight"])
        if cfg.ab.interactions:
            # Every device appends the same-shaped vector (zeros when declining).
            counts = result.ab if result.ab is not None else np.zeros(ab.FIELDS)
            ab_vector = counts if encoded is not None else ab_in_range(cfg, counts)
    elif result.ab is not None and device.simulated:  # a real device's: only under SecAgg+
        metrics.update(ab.to_metrics(result.ab))
    record = build_outbound_record(
        {} if encoded is not None else result.update,
        shared_names=device.rt.shared_names,
        metrics=metrics,
        allowed_metrics=ALLOWED_TRAIN_METRICS,
        legacy="fitres" if legacy else None,
        ab_vector=ab_vector,
        discrete=encoded,
        loss_vector=loss_vector,
    )
    engine_time(context, cfg, server_round, started=started, device_s=device_s, users=1)
    return record


def evaluate(content: RecordDict, context: Context) -> RecordDict:
    """Evaluate base, global and personal models on the device's held-out text."""
    hosted = _hosted_users(context, parse_run_config(dict(context.run_config)))
    if hosted is not None:
        return _evaluate_hosted(content, context, hosted)
    with _device(context) as device:
        global_shared, server_round, legacy = _incoming(content, device.cfg, "evaluateins")
        metrics = device.evaluate(global_shared, server_round=server_round, run=str(context.run_id))
    return build_outbound_record(
        {},
        shared_names=device.rt.shared_names,
        metrics=metrics,
        allowed_metrics=ALLOWED_EVAL_METRICS,
        legacy="evaluateres" if legacy else None,
    )


def answer(kind: str, content: RecordDict, context: Context) -> RecordDict:
    """The reply content for a ``train`` or ``evaluate`` message."""
    if kind == "train":
        return train(content, context, started=time.perf_counter())
    if kind == "evaluate":
        return evaluate(content, context)
    raise ValueError(f"unknown message kind {kind!r}; expected train or evaluate")
