"""Crash-safe writes: a file or directory is either the old version or the new one, never half.

Everything fedpersona persists (device state, ledgers, adapters, summaries, the model cache)
goes through these two functions. A directory is replaced only when its caller says the old
one may go (its own earlier output, or an explicit ``--force``): a folder of the user's is
never deleted to make room.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_replaceable(target: Path, may_replace: Callable[[Path], bool], *, what: str) -> None:
    """Refuse to overwrite ``target`` unless it is absent, an empty folder, or ``may_replace``.

    Args:
        target: A file or folder about to be written.
        may_replace: Whether an existing ``target`` may be replaced (ours, or ``--force``).
        what: What would be written there, for the message.

    Raises:
        FileExistsError: ``target`` holds something that is not to be replaced.
    """
    target = Path(target)
    if not os.path.lexists(target):
        return
    if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        return
    if may_replace(target):
        return
    kind = "folder" if target.is_dir() else "file"
    raise FileExistsError(
        f"{target} is an existing {kind} that is not {what}; refusing to overwrite it. "
        "Choose a new path, or pass --force to replace it"
    )


def atomic_write_dir(
    target: Path, write: Callable[[Path], None], *, may_replace: Callable[[Path], bool]
) -> Path:
    """Fill a temporary sibling directory with ``write(tmp)``, then swap it in for ``target``.

    Args:
        target: The folder to (re)place.
        write: Fills the temporary folder.
        may_replace: Whether an existing, non-empty ``target`` may be replaced.

    Raises:
        FileExistsError: ``target`` exists, is not empty and ``may_replace`` says no (checked
            before anything is written).
    """
    target = Path(target)
    check_replaceable(target, may_replace, what="output of fedpersona")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
