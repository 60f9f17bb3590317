"""``fedpersona server …``: the operator's commands (:mod:`server.operator`) — make the key
material, run the SuperLink and its ServerApp executor as one service, register and revoke
devices, start a run and follow it, and see what the runs have done."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from server import operator
from server.operator import FederationDir, OperatorError

app = typer.Typer(help="Run a federation's server (the operator's side).", no_args_is_help=True)
devices_app = typer.Typer(help="Register, list and revoke devices.", no_args_is_help=True)
app.add_typer(devices_app, name="devices")
console = Console()

Dir = Annotated[
    Path,
    typer.Option(
        "--dir", envvar="FEDPERSONA_SERVER_DIR", help="The federation folder (keys, state, runs)"
    ),
]
DEFAULT_DIR = Path("federation")


def _fail(err: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {err}", soft_wrap=True)
    return typer.Exit(1)


def _on(directory: Path, call, *args):  # type: ignore[no-untyped-def]
    """``call(the federation folder, *args)``; its refusal is the command's one error line."""
    try:
        return call(FederationDir(directory.absolute()), *args)
    except OperatorError as err:
        raise _fail(err) from None


@app.command()
def init(
    host: Annotated[
        list[str],
        typer.Option(help="A name or IP devices reach the server by (repeatable)"),
    ],
    directory: Dir = DEFAULT_DIR,
    days: Annotated[int, typer.Option(help="Certificates' validity in days")] = 365,
) -> None:
    """Make the federation's CA, the server's TLS certificate and the executor's secret.

    Refuses to overwrite. Hand certs/ca.crt to every device; keep certs/ca.key offline."""
    fed = FederationDir(directory.absolute())
    try:
        written = operator.init(fed, hosts=host, days=days)
    except (OperatorError, ValueError) as err:
        raise _fail(err) from None
    for path in written:
        console.print(f"wrote {path}", soft_wrap=True)
    console.print(
        f"Give devices {fed.ca} (they join with `fedpersona device join HOST:PORT --ca ca.crt`); "
        f"keep {fed.certs / 'ca.key'} offline. Next: `fedpersona server start --dir {directory}`.",
        soft_wrap=True,
    )


@app.command()
def start(
    directory: Dir = DEFAULT_DIR,
    port: Annotated[int, typer.Option(help="The port devices and `flwr` connect to")] = (
        operator.DEFAULT_PORT
    ),
    host: Annotated[
        str,
        typer.Option(
            help="Address to bind (0.0.0.0: every interface; the Control API shares the port — "
            "see docs/deploy.md)"
        ),
    ] = "127.0.0.1",
) -> None:
    """Run the SuperLink (TLS, device authentication, its database) and its ServerApp
    executor as one service, until SIGTERM or Ctrl-C stops both."""
    from common.supervise import ServiceFailed, Supervisor, service_logger

    fed = FederationDir(directory.absolute())
    try:
        children = operator.service(fed, host=host, port=port)
    except OperatorError as err:
        raise _fail(err) from None
    operator.write_flwr_config(fed, port)
    logger = service_logger("fedpersona.server", fed.root / operator.LOG_FILE)
    supervisor = Supervisor(
        children, logger=logger, on_change=lambda p: operator.write_state(fed, host, port, p)
    )
    supervisor.stop_on_signals()
    console.print(
        f"serving on {host}:{port} (log: {fed.root / operator.LOG_FILE}); Ctrl-C to stop",
        soft_wrap=True,
    )
    try:
        supervisor.run()
    except ServiceFailed as err:
        raise _fail(err) from None
    finally:
        logger.handlers.clear()
    console.print("stopped: the SuperLink and its executor")


@devices_app.command("add")
def devices_add(
    public_key: Annotated[Path, typer.Argument(help="The device's public key (node.key.pub)")],
    directory: Dir = DEFAULT_DIR,
) -> None:
    """Register a device's public key: it may connect from now on."""
    node_id = _on(directory, operator.add_device, public_key)
    console.print(f"registered {public_key} as node {node_id}")


@devices_app.command("list")
def devices_list(
    directory: Dir = DEFAULT_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """The registered devices and whether each is online."""
    nodes = _on(directory, operator.list_devices)
    if as_json:
        print(json.dumps(nodes, indent=1))
        return
    table = Table(title="devices")
    for column in ("node", "status", "last seen"):
        table.add_column(column)
    for n in nodes:
        table.add_row(str(n.get("node-id")), str(n.get("status")), str(n.get("online-until") or ""))
    console.print(table)


@devices_app.command("remove")
def devices_remove(
    node_id: Annotated[str, typer.Argument(help="The node id `devices list` shows")],
    directory: Dir = DEFAULT_DIR,
) -> None:
    """Revoke a device: its key no longer connects."""
    _on(directory, operator.remove_device, node_id)
    console.print(f"revoked node {node_id}")


@app.command()
def run(
    directory: Dir = DEFAULT_DIR,
    run_config: Annotated[
        Path | None, typer.Option(help="TOML of run-config keys (e.g. num-server-rounds = 10)")
    ] = None,
) -> None:
    """Start a federation run on the devices online and follow its rounds to the end."""
    fed = FederationDir(directory.absolute())
    try:
        env = operator.connect(fed)
        config = operator.run_config_file(fed, run_config)
    except OperatorError as err:
        raise _fail(err) from None
    try:
        done = subprocess.run(
            [
                str(operator.BIN / "flwr"), "run", str(operator.PROJECT_DIR),
                operator.FEDERATION, "--stream", "--run-config", str(config),
            ],
            env=env,
            cwd=operator.PROJECT_DIR,
        )  # fmt: skip
    finally:
        config.unlink(missing_ok=True)
    if done.returncode != 0:
        raise _fail(RuntimeError(f"the run failed (flwr exit {done.returncode}); see above"))


@app.command()
def status(
    directory: Dir = DEFAULT_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """The service, and each run: rounds released and discarded, cohort sizes, ε so far."""
    info = operator.status(FederationDir(directory.absolute()))
    if as_json:
        print(json.dumps(info, indent=1))
        return
    console.print(
        "server: " + (f"running on port {info['port']}" if info["running"] else "not running")
    )
    table = Table(title="runs")
    for column in ("run", "state", "rounds", "released", "discarded", "cohorts", "user ε"):
        table.add_column(column)
    for r in info["runs"]:
        if "error" in r:
            table.add_row(r["run"], f"unreadable: {r['error']}", "", "", "", "", "")
            continue
        table.add_row(
            r["run"],
            "finished" if r["finished"] else "in progress",
            str(r["rounds"]),
            str(r["released"]),
            str(r["discarded"]),
            ", ".join(map(str, r["cohorts"])),
            f"{r['user_epsilon']:.3f}",
        )
    console.print(table)
