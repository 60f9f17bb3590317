"""Where ``device join`` runs the server's code: the ClientApp executor in a sandbox.

Flower runs each message's ClientApp from the app bundle the server sends, in processes the
SuperNode's executor (``flower-superexec``) starts: the server's code, on the device. As the
device's own OS user it could read the encrypted store's files, the key file, the passphrase
file, the node's private key, and other processes' ``/proc/<pid>/environ``, or write the
virtual environment the worker is restarted from. :func:`sandboxed` runs the executor (and so
every ClientApp it starts) under **bubblewrap** (Debian's ``bubblewrap``; unprivileged user
namespaces):

* a file system of its own built from an allow-list: the system's directories and the Python
  installation and virtual environment it runs from, all **read-only**; the worker's socket
  folder read-only (the socket and the key a ClientApp proves itself with); one writable
  folder, the executor's own Flower home (the app bundles it installs); an empty ``/tmp``;
* the device's store, key files and passphrase file are not in it — and where one lies
  under an allowed directory it is masked (an empty folder, or ``/dev/null``);
* its own process namespace (``/proc`` shows only its processes: no other process's
  environment or memory), IPC and host name; it dies with ``join``.

The network is shared: the executor reaches the SuperNode's runtime API on 127.0.0.1, which
the SuperNode and executor protect with a shared secret only ``join`` and its children hold
(Flower's SuperExec authentication), so another local user cannot act as the executor.

Where bubblewrap cannot run (not installed, or user namespaces disabled), :func:`problem`
says why; ``join`` says so at start and runs the executor as the device's user
(docs/deploy.md, "Who may run code on a device", says what that leaves open).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

BWRAP = "bwrap"
# System directories the executor may read (those that exist; a symlink stays a symlink).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc", "/opt")


def problem() -> str | None:
    """Why the executor cannot be sandboxed here (``None``: it can)."""
    path = shutil.which(BWRAP)
    if path is None:
        return "bubblewrap is not installed (Debian: `apt install bubblewrap`)"
    probe = [path, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-pid"]
    try:
        done = subprocess.run([*probe, "true"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"bubblewrap does not run: {err}"
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        return f"bubblewrap cannot make a sandbox here: {why[-1] if why else done.returncode}"
    return None


def _python_roots() -> list[Path]:
    """The Python installation and virtual environment this process runs from."""
    roots = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve().parent.parent}
    return sorted(roots)


def _under(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def sandboxed(
    command: Sequence[str],
    *,
    readable: Sequence[Path],
    writable: Sequence[Path],
    hidden: Sequence[Path],
    home: Path,
) -> list[str]:
    """``command`` under bubblewrap (see the module docstring).

    Args:
        command: The executor's command line.
        readable: Folders it may read besides the system and Python (the worker's socket's).
        writable: Folders it may write (its Flower home).
        hidden: The device's store, key and passphrase files: masked if they lie under what
            it may read.
        home: Its ``$HOME`` inside.
    """
    args = [BWRAP, "--die-with-parent", "--new-session"]
    args += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    args += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    bound: list[Path] = []
    for d in SYSTEM_DIRS:
        p = Path(d)
        if p.is_symlink():
            args += ["--symlink", os.readlink(p), d]
        elif p.is_dir():
            args += ["--ro-bind", d, d]
            bound.append(p)
    for p in [*_python_roots(), *map(Path, readable)]:
        p = p.absolute()
        if p.exists() and not _under(p, bound):
            args += ["--ro-bind", str(p), str(p)]
            bound.append(p)
    for p in writable:
        p = Path(p).absolute()
        args += ["--bind", str(p), str(p)]
    for p in hidden:
        p = Path(p).absolute()
        if not p.exists() or not _under(p, bound):
            continue
        args += ["--tmpfs", str(p)] if p.is_dir() else ["--ro-bind", "/dev/null", str(p)]
    args += ["--setenv", "HOME", str(home), "--chdir", str(home), "--"]
    return [*args, *command]
