"""``fedpersona device join|worker|federation``: this device in a federation — ``join`` runs its
worker, SuperNode and ClientApp executor as one supervised service
(:mod:`client.federation.join`); ``worker`` is the long-lived process that alone unlocks the
store (:mod:`client.federation.worker`); ``federation pause|resume`` is the owner's switch."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from client.cli import options
from client.store import DEFAULT_RETENTION_DAYS, LocalStore, StoreError
from common.crypto import StoreKeyError, keep_secret

NumPartitions = Annotated[
    int | None,
    typer.Option(help="Federation size this device sizes its noise share by (else the run's)"),
]
LocalOnlyBaseline = Annotated[
    bool, typer.Option(help="Also train the local-only baseline the server may ask for")
]


@options.app.command(rich_help_panel="The federation")
def worker(
    socket: Annotated[
        Path, typer.Option(help="Unix socket to answer on; the SuperNode's worker-socket")
    ],
    data_dir: options.DataDir,
    key_file: options.KeyFile = None,
    retention_days: options.Retention = DEFAULT_RETENTION_DAYS,
    num_partitions: NumPartitions = None,
    local_only_baseline: LocalOnlyBaseline = False,
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

    options.passphrase_out_of_environment()
    secret = options.secret_of(key_file)
    if secret.passphrase is not None:  # typed, or read from a pipe: this process keeps it
        keep_secret(secret)
    try:  # unlock (creating on first use) now, or fail before any ClientApp waits on it
        LocalStore.open(data_dir, secret, retention_days=retention_days, create=True).close()
    except (StoreError, StoreKeyError, FileNotFoundError, ValueError) as err:
        raise options.fail(err) from None
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
        raise options.fail(err) from None


@options.app.command(rich_help_panel="The federation")
def join(
    address: Annotated[str, typer.Argument(help="The federation's server, HOST:PORT")],
    data_dir: options.DataDir,
    ca: Annotated[
        Path | None,
        typer.Option(help="The federation's CA certificate (ca.crt, from its operator)"),
    ] = None,
    key_file: options.KeyFile = None,
    retention_days: options.Retention = DEFAULT_RETENTION_DAYS,
    num_partitions: NumPartitions = None,
    local_only_baseline: LocalOnlyBaseline = False,
    part: Annotated[
        str | None,
        typer.Option(
            help="Run only this process: worker, supernode or clientapp-executor (one "
            "container each, as in docker-compose.yml; give them the same --run-dir and "
            "--runtime-port)"
        ),
    ] = None,
    run_dir: Annotated[
        Path | None,
        typer.Option(help="Folder of the worker's socket, shared by the parts (default: private)"),
    ] = None,
    runtime_port: Annotated[
        int | None,
        typer.Option(help="The SuperNode's port for its executor (default: a free one)"),
    ] = None,
) -> None:
    """Join a federation: this device's worker, SuperNode and ClientApp executor as one service.

    Makes the device's key pair the first time (the private key stays here, 0600; send the
    public key it prints to the operator), checks the server's certificate against --ca, then
    keeps the three processes running — restarting one that dies — until SIGTERM or Ctrl-C,
    which stops them all. Log: <data-dir>/join.log; state: `fedpersona device status`.
    """
    from client.federation.join import JoinError, JoinPlan

    options.passphrase_out_of_environment()
    try:
        plan = JoinPlan(
            address=address,
            ca=None if ca is None else ca.absolute(),
            data_dir=data_dir.absolute(),
            key_file=None if key_file is None else key_file.absolute(),
            retention_days=retention_days,
            num_partitions=num_partitions,
            local_only_baseline=local_only_baseline,
            part=part,
            run_dir=None if run_dir is None else run_dir.absolute(),
            runtime_port=runtime_port,
        )
    except JoinError as err:
        raise options.fail(err) from None
    passphrase = None
    if plan.runs("worker"):  # only the worker opens the store
        secret = _unlocked(data_dir, key_file, retention_days)
        plan = dataclasses.replace(
            plan, key_file=None if secret.key_file is None else Path(secret.key_file).absolute()
        )
        passphrase = secret.passphrase
    else:
        plan.data_dir.mkdir(parents=True, exist_ok=True)
    _run_join(plan, passphrase)


def _run_join(plan, passphrase: str | None) -> None:  # type: ignore[no-untyped-def]
    """Hold the lock, make the key and check the server where this service needs them, then
    run it until it is stopped."""
    import logging

    from client.federation.join import JOIN_LOCK, JOIN_LOG, JoinError, check_server, join_lock
    from client.federation.join import join as run_join
    from common.supervise import ServiceFailed, Supervisor, service_logger

    logger = service_logger("fedpersona.join", plan.file(JOIN_LOG))
    try:
        with join_lock(plan.data_dir, plan.file(JOIN_LOCK)):
            if plan.runs("supernode"):
                _print_new_key(plan.data_dir)
                check_server(plan.address, plan.ca)
            what = f"{plan.part} of " if plan.part else ""
            options.console.print(
                f"joining {plan.address}: {what}this device's service (log: "
                f"{plan.file(JOIN_LOG)}); Ctrl-C to leave",
                soft_wrap=True,
            )
            logger.info("joining %s%s", plan.address, f" ({plan.part})" if plan.part else "")
            run_join(plan, passphrase, logger, on_start=Supervisor.stop_on_signals)
    except (JoinError, ServiceFailed) as err:
        logger.error("%s", err)
        raise options.fail(err) from None
    finally:
        logging.getLogger("fedpersona.join").handlers.clear()
    options.console.print(f"left the federation at {plan.address}; nothing of it runs any more")


def _print_new_key(data_dir: Path) -> None:
    """Make the device's key pair if it has none, and then say what to send the operator."""
    from client.federation.join import ensure_node_key, node_key_paths

    public, made = ensure_node_key(data_dir)
    if made:
        key, pub = node_key_paths(data_dir)
        options.console.print(
            f"Made this device's key pair: {key} (private, stays here) and {pub}. Send the "
            "public key to the federation's operator, who "
            "registers it with `fedpersona server devices add`:\n" + public.decode().strip(),
            soft_wrap=True,
        )


@options.app.command(rich_help_panel="The federation")
def key(data_dir: options.DataDir) -> None:
    """Print this device's public key: what the federation's operator registers
    (`fedpersona server devices add`). Made on the device the first time; the private key
    stays in the data directory (0600) and is never printed."""
    from client.federation.join import JoinError, ensure_node_key

    try:
        public, _ = ensure_node_key(data_dir.absolute())
    except JoinError as err:
        raise options.fail(err) from None
    print(public.decode().strip())


def _unlocked(data_dir: Path, key_file: Path | None, retention_days: float):  # type: ignore[no-untyped-def]
    """The store's secret, once it opened the store (a missing store or a wrong passphrase
    is found here, before anything starts)."""
    if not LocalStore.exists(data_dir):
        raise options.fail(
            ValueError(f"no device store at {data_dir}: run `fedpersona device init` first")
        )
    secret = options.secret_of(key_file)
    try:
        LocalStore.open(data_dir, secret, retention_days=retention_days).close()
    except (StoreError, StoreKeyError, FileNotFoundError, ValueError) as err:
        raise options.fail(err) from None
    return secret


federation_app = typer.Typer(
    help="Pause or resume this device's part in its federation.", no_args_is_help=True
)
options.app.add_typer(federation_app, name="federation", rich_help_panel="The federation")


def _switch(data_dir: Path, key_file: Path | None, *, paused: bool) -> None:
    from client.store.state import set_paused

    with options.open_store(data_dir, key_file, DEFAULT_RETENTION_DAYS) as store:
        set_paused(store, paused)
    options.console.print(
        "paused: this device declines every round (nothing charged) until `resume`"
        if paused
        else "resumed: this device takes part in rounds again, within its privacy policy"
    )


@federation_app.command("pause")
def pause(data_dir: options.DataDir, key_file: options.KeyFile = None) -> None:
    """Decline every round from now on, charging nothing, until `resume`."""
    _switch(data_dir, key_file, paused=True)


@federation_app.command("resume")
def resume(data_dir: options.DataDir, key_file: options.KeyFile = None) -> None:
    """Take part in the federation's rounds again (within the privacy policy)."""
    _switch(data_dir, key_file, paused=False)
