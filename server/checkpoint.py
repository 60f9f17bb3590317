"""The server's checkpoint: everything a restarted ServerApp needs to continue a run.

After every round (its training phase, then again after its evaluation) the ServerApp writes
``<run_dir>/checkpoint/server.npz`` atomically (:func:`common.atomic.atomic_write_bytes`): the
shared adapter tensors, the last completed round, the federation accountant's history, the
run's records (rounds, users, A/B counts), the sampling RNG state and the config the run was
started with. A ServerApp started on the same run dir with ``resume = true`` continues at the
next round with the same privacy accounting; a config that differs in anything but the round
count and timeouts is refused, naming the keys.

The server optimizer's state (``server/optimizer.py``: momentum's ``v``, adam's and yogi's
``m`` and ``u``; none for ``sgd``) is kept beside the shared tensors, so a resumed run takes the
same steps an uninterrupted one would.
"""

from __future__ import annotations

import io
import json
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_write_bytes

VERSION = 1
FILE = Path("checkpoint") / "server.npz"
# Under the run dir: each released round's mean change, as the server saw it (noised).
RELEASED = "released"
# Keys a resumed run may change: how long it runs and how long it waits.
MAY_CHANGE = frozenset({"num-server-rounds", "round-timeout", "secagg.timeout", "resume"})


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, from another run, or inconsistent."""


@dataclass
class ServerState:
    """A run's state after ``round`` completed rounds."""

    round: int
    shared_names: list[str]
    shared: list[np.ndarray]
    config: dict[str, Any]
    accountant: dict[str, Any] | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    clients: dict[int | str, dict[str, Any]] = field(default_factory=dict)
    ab_rounds: list[list[float]] = field(default_factory=list)
    pending_train: dict[int, dict[str, Any]] = field(default_factory=dict)
    stopped_at: int | None = None
    rng: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0
    # ServerStep.state_dict(): {"kind": str, "first": {name: array}, "second": {name: array}}
    optimizer: dict[str, Any] | None = None


def capture_rng() -> dict[str, Any]:
    """State of the RNGs that drive sampling (Flower samples nodes with ``random``)."""
    version, internal, gauss = random.getstate()
    return {"python": [version, list(internal), gauss]}


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(x) for x in internal), gauss))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def save(run_dir: Path, state: ServerState) -> Path:
    """Write the checkpoint atomically; returns its path."""
    meta = {
        "version": VERSION,
        "round": state.round,
        "shared_names": state.shared_names,
        "config": state.config,
        "accountant": state.accountant,
        "rounds": state.rounds,
        "clients": {str(k): v for k, v in state.clients.items()},
        "ab_rounds": state.ab_rounds,
        "pending_train": {str(k): v for k, v in state.pending_train.items()},
        "stopped_at": state.stopped_at,
        "rng": state.rng,
        "elapsed_s": state.elapsed_s,
        "server_optimizer": None,
    }
    buf = io.BytesIO()
    arrays = {f"shared_{i}": np.asarray(a, np.float32) for i, a in enumerate(state.shared)}
    if state.optimizer is not None:
        opt = state.optimizer
        meta["server_optimizer"] = {
            "kind": opt["kind"],
            **{part: list(opt[part]) for part in ("first", "second")},
        }
        for part in ("first", "second"):
            for i, a in enumerate(opt[part].values()):
                arrays[f"opt_{part}_{i}"] = np.asarray(a, np.float64)
    np.savez(
        buf,
        meta=np.frombuffer(json.dumps(meta, default=_json_default).encode(), dtype=np.uint8),
        **arrays,
    )
    path = Path(run_dir) / FILE
    atomic_write_bytes(path, buf.getvalue())
    return path


def load(run_dir: Path) -> ServerState | None:
    """The run dir's checkpoint, or ``None`` if it has none.

    Raises:
        CheckpointError: If the file exists but cannot be read or is inconsistent.
    """
    path = Path(run_dir) / FILE
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            shared = [np.array(data[f"shared_{i}"]) for i in range(len(meta["shared_names"]))]
            opt = meta.get("server_optimizer")
            optimizer = None
            if opt is not None:
                optimizer = {"kind": opt["kind"]}
                for part in ("first", "second"):
                    optimizer[part] = {
                        n: np.array(data[f"opt_{part}_{i}"]) for i, n in enumerate(opt[part])
                    }
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{path}: unreadable checkpoint ({err}); move it away to start over"
        ) from err
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')} != {VERSION}")
    for array in shared:
        if array.dtype != np.float32 or not np.isfinite(array).all():
            raise CheckpointError(f"{path}: shared tensors must be finite float32")
    return ServerState(
        round=int(meta["round"]),
        shared_names=list(meta["shared_names"]),
        shared=shared,
        config=dict(meta["config"]),
        accountant=meta["accountant"],
        rounds=list(meta["rounds"]),
        clients={_client_key(k): v for k, v in meta["clients"].items()},
        ab_rounds=[list(map(float, r)) for r in meta["ab_rounds"]],
        pending_train={int(k): v for k, v in meta["pending_train"].items()},
        stopped_at=meta["stopped_at"],
        rng=meta["rng"],
        elapsed_s=float(meta["elapsed_s"]),
        optimizer=optimizer,
    )


def check_compatible(
    state: ServerState, config: dict[str, Any], shared: dict[str, tuple[int, ...]]
) -> None:
    """Refuse a checkpoint written under another config or for other tensors.

    Raises:
        CheckpointError: Naming the differing keys (or tensors).
    """
    differing = sorted(
        key
        for key in set(state.config) | set(config)
        if key not in MAY_CHANGE and state.config.get(key) != config.get(key)
    )
    if differing:
        detail = ", ".join(
            f"{k}: {state.config.get(k)!r} -> {config.get(k)!r}" for k in differing[:5]
        )
        raise CheckpointError(
            f"the run's checkpoint was written under another config ({detail}); use another "
            "output.run-name, or set resume = false to start this run over"
        )
    if state.shared_names != list(shared) or any(
        tuple(a.shape) != tuple(shared[n])
        for n, a in zip(state.shared_names, state.shared, strict=True)
    ):
        raise CheckpointError("the checkpoint's shared tensors do not match the model")


def _client_key(key: str) -> int | str:
    """A ``clients`` key as the recorder keeps it: a partition id, or ``node-<id>``."""
    return int(key) if key.isdigit() else key


def save_released(run_dir: Path, server_round: int, change: dict[str, np.ndarray]) -> None:
    """Write a released round's mean change to ``<run_dir>/released/round-NNNN.npz``: the run's
    audit trail of what it released, which ``benchmarks/server_step.py`` replays through
    other server optimizers."""
    buf = io.BytesIO()
    np.savez(buf, **{n: np.asarray(a, np.float32) for n, a in change.items()})
    atomic_write_bytes(Path(run_dir) / RELEASED / f"round-{server_round:04d}.npz", buf.getvalue())
