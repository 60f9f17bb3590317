"""The environment of every Flower process this project starts.

This interpreter's ``bin`` first on ``PATH`` (a SuperLink or SuperNode starts Flower's
executables by name, and the venv need not be activated), the caller's own ``FLWR_HOME``, no
dependency installs at run time, no update check or telemetry, and the models offline.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

BIN = Path(sys.executable).parent


def flower_env(
    flwr_home: Path, *, base: Mapping[str, str] | None = None, drop: Iterable[str] = ()
) -> dict[str, str]:
    """``base`` (default: this process's environment) without ``drop``, plus the above."""
    source = os.environ if base is None else base
    env = {k: v for k, v in source.items() if k not in set(drop)}
    env.update(
        {
            "PATH": os.pathsep.join([str(BIN), source.get("PATH", "")]),
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
    )
    return env
