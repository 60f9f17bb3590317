"""What every ``fedpersona device …`` command shares: the ``device`` Typer app the command
groups register on, the data-dir and key-file options, unlocking the store (a key file, a
passphrase from the environment, or typed when asked) and the error line."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from client.store import LocalStore, StoreError
from common.crypto import (
    PASSPHRASE_ENV,
    PASSPHRASE_FILE_ENV,
    NoSecret,
    Secret,
    StoreKeyError,
    resolve_secret,
)

app = typer.Typer(help="The on-device assistant (encrypted, local, private).", no_args_is_help=True)
console = Console()

DataDir = Annotated[
    Path,
    typer.Option(envvar="FEDPERSONA_DATA_DIR", help="The device's data dir (encrypted store)"),
]
KeyFile = Annotated[
    Path | None,
    typer.Option(envvar="FEDPERSONA_KEY_FILE", help=f"0600 key file (else ${PASSPHRASE_ENV})"),
]
Retention = Annotated[float, typer.Option(help="Delete interactions older than this many days")]


def secret_of(key_file: Path | None, *, confirm: bool = False) -> Secret:
    """The store's secret from the options or environment; else asked at the terminal. A
    passphrase given but too short is refused, never replaced by a prompt."""
    try:
        return resolve_secret(key_file=key_file)
    except NoSecret as err:
        if not sys.stdin.isatty():
            raise fail(err) from None
    except (ValueError, StoreKeyError) as err:
        raise fail(err) from None
    phrase = typer.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm)
    try:
        return Secret(passphrase=phrase)
    except ValueError as err:
        raise fail(err) from None


# Set by the console script's entry point: this process is the command itself (not a test
# calling the app), so it may start over (:func:`passphrase_out_of_environment`).
AS_PROCESS = False


def passphrase_out_of_environment() -> None:
    """Run this long-lived command (``device join``, ``worker``, ``serve``) without
    ``$FEDPERSONA_PASSPHRASE`` in its environment: any process of the same user may read
    ``/proc/<pid>/environ``, which keeps a process's environment as it started. If it is set,
    the command starts over (``exec``, the same pid) with the variable removed and the
    passphrase in a pipe only this process holds (``$FEDPERSONA_PASSPHRASE_FILE=/dev/fd/N``,
    read once)."""
    value = os.environ.get(PASSPHRASE_ENV)
    if not value or not AS_PROCESS:
        return
    read, write = os.pipe()
    os.write(write, (value + "\n").encode())
    os.close(write)
    os.set_inheritable(read, True)
    env = {k: v for k, v in os.environ.items() if k != PASSPHRASE_ENV}
    env[PASSPHRASE_FILE_ENV] = f"/dev/fd/{read}"
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def fail(err: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {err}", soft_wrap=True)  # paths stay copyable
    return typer.Exit(1)


def open_store(data_dir: Path, key_file: Path | None, retention: float) -> LocalStore:
    try:
        return LocalStore.open(data_dir, secret_of(key_file), retention_days=retention)
    except (StoreError, StoreKeyError, FileNotFoundError, ValueError) as err:
        raise fail(err) from None


def open_assistant(  # type: ignore[no-untyped-def]
    data_dir: Path, key_file: Path | None, retention: float, *, ab_test: bool = False
):
    from client.assistant.assistant import Assistant
    from common.model import quiet_transformers

    quiet_transformers()
    store = open_store(data_dir, key_file, retention)
    try:
        return Assistant(store, ab_test=ab_test)
    except (ValueError, FileNotFoundError) as err:
        store.close()
        raise fail(err) from None
