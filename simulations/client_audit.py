"""The user-level one-run audit of a finished run with canary clients (``audit.canary-clients``,
:mod:`common.audit`): each canary client's score on the released rounds, the guesses, and the
empirical ε lower bound beside the accountant's ε, written into ``summary.json`` as
``client_audit``.

``python -m simulations.client_audit RUN_DIR`` (``fedpersona simulate`` runs it itself when
the run has canary clients).
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from common import audit
from common.atomic import atomic_write_bytes
from common.config import RunConfig
from server.checkpoint import RELEASED


def released_rounds(run_dir: Path, summary: dict[str, Any]) -> dict[int, tuple[int, dict]]:
    """``{round: (m_r, mean_r)}`` of every released round: its updates (users and canary
    clients) and the noised mean change the run kept under ``released/``."""
    updates = {int(r["round"]): int(r.get("updates", 0)) for r in summary.get("rounds", [])}
    out = {}
    for path in sorted((Path(run_dir) / RELEASED).glob("round-*.npz")):
        server_round = int(path.stem.split("-")[1])
        with np.load(io.BytesIO(path.read_bytes())) as npz:
            mean = {name: np.asarray(npz[name], np.float64) for name in npz.files}
        out[server_round] = (updates.get(server_round, 0), mean)
    return out


def measure(run_dir: Path) -> dict[str, Any]:
    """The audit of ``run_dir`` (module docstring).

    Raises:
        ValueError: The run has no canary clients or released nothing.
    """
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    cfg = RunConfig.from_dict(summary["config"])
    if not cfg.audit.canary_clients:
        raise ValueError(f"{run_dir} has no canary clients (audit.canary-clients = 0)")
    scores = audit.client_scores(cfg, released_rounds(run_dir, summary))
    result = audit.client_audit(scores, audit.clients_included(cfg), delta=cfg.privacy.delta)
    user = summary.get("privacy", {}).get("user_level", {})
    return {
        **result,
        "accountant_epsilon": user.get("epsilon_rdp", user.get("epsilon")),
        "relation": "one client's whole update present or absent (user-level, the "
        "accountant's relation)",
        "model": "the released per-round noised means (what the server saw)",
        "score": "movement of the released sums along each canary client's direction",
    }


def add_to_summary(run_dir: Path) -> dict[str, Any]:
    """:func:`measure`, written into ``summary.json`` as ``client_audit``."""
    result = measure(run_dir)
    path = Path(run_dir) / "summary.json"
    summary = json.loads(path.read_text())
    summary["client_audit"] = result
    atomic_write_bytes(path, json.dumps(summary, indent=2, allow_nan=True).encode())
    return result


def describe(result: dict[str, Any]) -> str:
    """One line for the console."""
    return (
        f"user-level audit: {result['correct']} of {result['guesses']} guesses right on "
        f"{result['canary_clients']} canary clients ({result['took_part']} took part) -> "
        f"ε >= {result['epsilon_lower_bound']:.2f} at {result['confidence']:.0%} confidence "
        f"(accountant: ε = {result['accountant_epsilon']})"
    )


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    print(describe(add_to_summary(args.run_dir)))


if __name__ == "__main__":
    main()
