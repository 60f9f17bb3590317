"""``fedpersona device worker``: the device's long-lived worker, the only process that unlocks
its store for the federation (:mod:`client.federation.worker`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from client.cli.options import (
    DataDir,
    KeyFile,
    Retention,
    app,
    fail,
    secret_of,
)
from client.store import DEFAULT_RETENTION_DAYS, LocalStore, StoreError
from common.crypto import PASSPHRASE_ENV, StoreKeyError


@app.command(rich_help_panel="The federation")
def worker(
    socket: Annotated[
        Path, typer.Option(help="Unix socket to answer on; the SuperNode's worker-socket")
    ],
    data_dir: DataDir,
    key_file: KeyFile = None,
    retention_days: Retention = DEFAULT_RETENTION_DAYS,
    num_partitions: Annotated[
        int | None,
        typer.Option(help="Federation size this device sizes its noise share by (else the run's)"),
    ] = None,
    local_only_baseline: Annotated[
        bool, typer.Option(help="Also train the local-only baseline the server may ask for")
    ] = False,
    preload: Annotated[
        bool, typer.Option(help="Import torch/transformers/peft before the first message")
    ] = True,
) -> None:
    """Run this device's side of the federation for its SuperNode's ClientApps (one per device).

    The worker alone unlocks the device's store; start the SuperNode with only
    ``--node-config 'worker-socket="SOCKET"'``: its ClientApps (the server's code) forward every
    message here and never see the passphrase, the store or an unmasked update. Unix socket
    only (0600, with a 0600 key beside it); stops on SIGTERM.
    """
    import logging

    from client.federation.worker import serve

    secret = secret_of(key_file)
    if secret.passphrase is not None:  # typed at the prompt: this process alone keeps it
        os.environ[PASSPHRASE_ENV] = secret.passphrase
    try:  # unlock (creating on first use) now, or fail before any ClientApp waits on it
        LocalStore.open(data_dir, secret, retention_days=retention_days, create=True).close()
    except (StoreError, StoreKeyError, FileNotFoundError, ValueError) as err:
        raise fail(err) from None
    device: dict[str, object] = {
        "data-dir": str(data_dir.absolute()),
        "retention-days": retention_days,
        "local-only-baseline": str(local_only_baseline).lower(),
    }
    if secret.key_file is not None:
        device["key-file"] = str(Path(secret.key_file).absolute())
    if num_partitions is not None:
        device["num-partitions"] = num_partitions
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        serve(socket, preload=preload, device=device)
    except (ValueError, RuntimeError) as err:
        raise fail(err) from None
