"""Users who never joined: what the federation's released model gives them on day one.

After a simulated federation of ``data.num-users`` users, the next ``count`` Shakespeare roles
of the same seeded order — users the federation never sampled, whose text it never saw —
each get a simulated device of their own (the same :class:`client.federation.device.Device`, its
store filled through the import path) and evaluate the run's released shared tensors against the
base model on the test half of their held-out text: the cold-start model a newcomer is
served. The result goes into the run's ``summary.json`` as ``cold_start_users``.

    python -m simulations.cold_start RUN_DIR --users 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from client.federation.device import Device
from client.store import LocalStore
from common.atomic import atomic_write_bytes
from common.config import RunConfig
from common.crypto import Secret, create_key_file
from server import checkpoint
from server.outputs import headline


@contextmanager
def newcomer_devices(cfg: RunConfig, count: int) -> Iterator[Iterator[Device]]:
    """Simulated devices of the ``count`` users after the run's ``data.num-users`` (each
    filled through the import path in a temporary store, opened one at a time)."""
    joined = cfg.data.num_users
    with tempfile.TemporaryDirectory(prefix="fp-cold-") as tmp:

        def opened() -> Iterator[Device]:
            for i in range(count):
                root = Path(tmp) / f"newcomer{i}"
                key = create_key_file(Path(tmp) / f"newcomer{i}.key")
                with LocalStore.create(root, Secret(key_file=key)) as store:
                    yield Device.simulated(
                        cfg, store=store, partition_id=joined + i, num_partitions=joined + count
                    )

        yield opened()


def measure(run_dir: Path, count: int) -> dict[str, Any]:
    """Evaluate the run's released shared tensors for ``count`` users who never joined.

    Raises:
        FileNotFoundError: If the run has no summary or no checkpoint of its shared tensors.
    """
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = RunConfig.from_dict(summary["config"])
    state = checkpoint.load(run_dir)
    if state is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint of the released shared tensors")
    released = {
        n: torch.from_numpy(a) for n, a in zip(state.shared_names, state.shared, strict=True)
    }
    rows = []
    with newcomer_devices(cfg, count) as devices:
        for device in devices:
            rows.append({"user": device.user, **device.newcomer_losses(released)})
    below = [r["global_loss"] < r["base_loss"] for r in rows]
    return {
        "users": len(rows),
        "below_base": sum(below) / len(rows) if rows else None,
        "base_loss": statistics.fmean(r["base_loss"] for r in rows) if rows else None,
        "global_loss": statistics.fmean(r["global_loss"] for r in rows) if rows else None,
        "what": "users outside the federation (never sampled, their text never seen): the "
        "released shared tensors (the cold-start model) vs the base model on the test half "
        "of their held-out text",
        "clients": rows,
    }


def add_to_summary(run_dir: Path, count: int) -> dict[str, Any]:
    """:func:`measure`, written into ``summary.json`` as ``cold_start_users``."""
    result = measure(run_dir, count)
    path = Path(run_dir) / "summary.json"
    summary = json.loads(path.read_text())
    summary["cold_start_users"] = result
    summary["headline"] = headline(summary)
    atomic_write_bytes(path, json.dumps(summary, indent=2, allow_nan=True).encode())
    return result


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--users", type=int, default=20)
    args = parser.parse_args()
    result = add_to_summary(args.run_dir, args.users)
    print(json.dumps({k: v for k, v in result.items() if k != "clients"}, indent=1))


if __name__ == "__main__":
    main()
