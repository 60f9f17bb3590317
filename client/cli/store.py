"""``fedpersona device init|import|status|budget|token|export|forget``: the device's encrypted
store — create it, bring in its owner's writing, show, export or erase what it holds. ``status``,
``budget``, ``token``, ``export`` (without ``--adapter``) and ``forget`` never load torch."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from client.cli.options import (
    DataDir,
    KeyFile,
    Retention,
    app,
    console,
    fail,
    open_assistant,
    open_store,
    secret_of,
)
from client.store import API_TOKEN, DEFAULT_RETENTION_DAYS, LocalStore, StoreError
from client.store.ingest import DEFAULT_MAX_BYTES


@app.command(rich_help_panel="Your store")
def init(
    data_dir: DataDir,
    key_file: KeyFile = None,
    model: Annotated[str, typer.Option(help="smollm2 | tiny | a local HF model dir")] = "smollm2",
    strategy: Annotated[
        str, typer.Option(help="blend | fedsa | dual | ffa | fedavg-ft (the federation's)")
    ] = "blend",
    new_key_file: Annotated[
        bool, typer.Option(help="Create --key-file (0600) instead of using a passphrase")
    ] = False,
    retention_days: Retention = DEFAULT_RETENTION_DAYS,
) -> None:
    """Create the device's encrypted store, default profile and API token."""
    from client.store.state import init_device
    from common.crypto import create_key_file

    if new_key_file:
        if key_file is None:
            raise typer.BadParameter("--new-key-file needs --key-file PATH")
        create_key_file(key_file)
    secret = secret_of(key_file, confirm=True)
    try:
        store = LocalStore.create(data_dir, secret, retention_days=retention_days)
    except (StoreError, ValueError) as err:
        raise fail(err) from None
    with store:
        try:
            settings = init_device(store, model=model, strategy=strategy)
        except ValueError as err:
            store.close()
            LocalStore.forget(data_dir)
            raise fail(err) from None
        token = store.get_meta(API_TOKEN)
    console.print(f"device store created in {data_dir} ({secret.kind})")
    console.print(
        f"model {settings['model.name']}, strategy {settings['personalization.strategy']}"
    )
    console.print(f"local API token: {token}")


@app.command("import", rich_help_panel="Your store")
def import_(
    paths: Annotated[
        list[Path], typer.Argument(help="Files of your own writing: .txt/.md, .jsonl, .mbox")
    ],
    data_dir: DataDir,
    key_file: KeyFile = None,
    fmt: Annotated[
        str, typer.Option("--format", help="auto (by suffix, else content) | text | chat | mbox")
    ] = "auto",
    max_bytes: Annotated[int, typer.Option(help="Refuse files larger than this")] = (
        DEFAULT_MAX_BYTES
    ),
    retention_days: Retention = DEFAULT_RETENTION_DAYS,
) -> None:
    """Bring your own writing into the store: what federated rounds train your model on.

    Plain text or Markdown (each paragraph answers the one before), chat conversations as JSON
    Lines in the OpenAI `messages` shape (each assistant message answers the user message
    before it), or an mbox of sent mail (your text answers what it quotes, or its subject).
    Everything is PII-scrubbed and kept only in the encrypted store, purged after the retention
    window and erased by `forget`. If any file cannot be read, nothing is imported.
    """
    from client.store.ingest import BadImport, import_files

    with open_store(data_dir, key_file, retention_days) as store:
        try:
            parsed = import_files(store, paths, fmt=fmt, max_bytes=max_bytes)
        except (BadImport, ValueError) as err:
            raise fail(err) from None
        total = sum(store.example_counts().values())
    for p in parsed:
        console.print(f"{p.path}: {len(p.pairs)} examples ({p.fmt})", markup=False, soft_wrap=True)
    console.print(f"the store now holds {total} examples of your own writing")


@app.command(rich_help_panel="Your store")
def status(
    data_dir: DataDir,
    key_file: KeyFile = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    retention_days: Retention = DEFAULT_RETENTION_DAYS,
) -> None:
    """Profile, history, personal adapter, ε spent / cap and retention."""
    from client.store.status import status as device_status

    with open_store(data_dir, key_file, retention_days) as store:
        try:
            info = device_status(store)
        except ValueError as err:
            raise fail(err) from None
    if as_json:
        print(json.dumps(info, indent=1))
        return
    b, pa = info["budget"], info["personal_adapter"]
    table = Table(title=f"device {data_dir}", show_header=False)
    table.add_column("")
    table.add_column("")
    table.add_row("model", f"{info['model']} / {info['strategy']}")
    table.add_row("profile", info["profile"])
    table.add_row("history", f"{info['interactions']} interactions, {info['feedback']} feedback")
    ex = info["examples"]
    imported = ", ".join(f"{n} {src}" for src, n in sorted(ex["by_source"].items()))
    table.add_row(
        "your examples",
        f"{ex['train']} to train on, {ex['held_out']} held out "
        f"({imported or 'none imported'}; {ex['endorsed_interactions']} endorsed answers)"
        + ("" if ex["train"] >= ex["min_to_join"] else f"; joins rounds at {ex['min_to_join']}"),
    )
    table.add_row(
        "personal adapter",
        f"{pa['bytes']} B, {pa['rounds_trained']} federated rounds" if pa["present"] else "none",
    )
    table.add_row("answering with", f"{info['active_model']} ({info['gate']})")
    table.add_row(
        "privacy",
        f"user ε {b['user_epsilon']:.3f} / cap {b['epsilon_cap']:g} (δ={b['delta']:g}), "
        f"record ε {b['record_epsilon']:.3f}",
    )
    table.add_row("retention", f"{info['retention_days']:g} days")
    table.add_row("store", f"{info['store_bytes']} B on disk, encrypted")
    for name, value in _federation_rows(info["federation"]):
        table.add_row(name, value)
    console.print(table)


def _federation_rows(f: dict) -> list[tuple[str, str]]:
    """``device status``'s federation lines: the service, the switch, rounds, what left."""
    import time

    def when(t: float | None) -> str:
        return "never" if t is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(t))

    service = (
        "not joined (`fedpersona device join ADDRESS --ca CA_CERT`)"
        if not f["joined"]
        else f"{f['address']}: " + ("running" if f["running"] else "not running")
    )
    if f["joined"] and f["running"] and f["connected"] is not None:
        service += (
            ", connected"
            if f["connected"]
            else f", not connected ({f['server_error'] or 'no recent check'})"
        )
    if f["paused_since"] is not None:
        service += f"; paused since {when(f['paused_since'])} (declines every round)"
    rows = [
        ("federation", service),
        *([("server's code runs", f["isolation"])] if f.get("isolation") else []),
        (
            "rounds",
            f"{f['rounds_joined']} joined, {f['rounds_declined']} declined; last "
            f"{when(f['last_round_time'])}; user ε {f['user_epsilon']:.3f} / cap "
            f"{f['epsilon_cap']:g}; alone (worst case) ε {f['alone_epsilon']:.3f}",
        ),
    ]
    for d in f["declined"][-3:]:
        rows.append((f"declined round {d['round']}", d["reason"]))
    if f["sent"]:
        last = f["sent"][-1]
        what = last["sent"]
        shapes = ", ".join(
            f"{t['name'].split('model.')[-1]} {'×'.join(map(str, t['shape']))}"
            for t in what.get("tensors", [])[:3]
        )
        more = len(what.get("tensors", [])) - 3
        rows.append(
            (
                f"what left (round {last['round']})",
                f"{what['bytes']:,} B in {len(what.get('tensors', []))} tensors"
                + (", masked by SecAgg+" if what["masked"] else ", in the clear")
                + (f" + {what['ab_numbers']} A/B numbers" if what["ab_numbers"] else "")
                + (f": {shapes}" + (f" and {more} more" if more > 0 else "") if shapes else ""),
            )
        )
    rows.extend(("may leave", line) for line in f["leaves"])
    return rows


@app.command(rich_help_panel="Your store")
def budget(
    data_dir: DataDir,
    key_file: KeyFile = None,
    retention_days: Retention = DEFAULT_RETENTION_DAYS,
) -> None:
    """The privacy ledger: ε spent, cap, rounds charged/declined, what ε assumes."""
    from client.store.status import budget as device_budget

    with open_store(data_dir, key_file, retention_days) as store:
        try:
            info = device_budget(store)
        except ValueError as err:
            raise fail(err) from None
    print(json.dumps(info, indent=1))


@app.command(rich_help_panel="Your store")
def token(
    data_dir: DataDir,
    key_file: KeyFile = None,
    rotate: Annotated[
        bool,
        typer.Option(
            help="Replace the token (the old one stops working at once, in `device serve` too)"
        ),
    ] = False,
) -> None:
    """Print the local API's bearer token (``--rotate``: a new one)."""
    from client.store.state import rotate_api_token

    with open_store(data_dir, key_file, DEFAULT_RETENTION_DAYS) as store:
        print(rotate_api_token(store) if rotate else store.get_meta(API_TOKEN))


@app.command(rich_help_panel="Your store")
def export(
    data_dir: DataDir,
    out: Annotated[Path, typer.Option(help="JSON file to write (plaintext!)")],
    key_file: KeyFile = None,
    adapter: Annotated[
        Path | None,
        typer.Option(help="Also write the personal adapter (peft format) here; loads the model"),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace --out / --adapter even if they hold files")
    ] = False,
    retention_days: Retention = DEFAULT_RETENTION_DAYS,
) -> None:
    """Write everything the device holds about you as readable JSON (and the adapter)."""
    from common.atomic import atomic_write_bytes, check_replaceable

    try:  # both targets are checked before anything is read or written
        check_replaceable(
            out, lambda p: force or LocalStore.is_export(p), what="an earlier device export"
        )
        if adapter is not None:
            from common.lora import is_fedpersona_adapter

            ours = is_fedpersona_adapter
            check_replaceable(adapter, lambda p: force or ours(p), what="a fedpersona adapter")
    except FileExistsError as err:
        raise fail(err) from None
    if adapter is not None:
        assistant = open_assistant(data_dir, key_file, retention_days)
        with assistant.store:
            data = assistant.store.export()
            assistant.export_adapter(adapter, force=force)
    else:
        with open_store(data_dir, key_file, retention_days) as store:
            data = store.export()
    atomic_write_bytes(out, json.dumps(data, indent=1).encode())
    os.chmod(out, 0o600)
    console.print(f"exported {len(data['interactions'])} interactions to {out} (mode 0600)")


@app.command(rich_help_panel="Your store")
def forget(
    data_dir: DataDir,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation")] = False,
) -> None:
    """Erase everything: shred the wrapped key (crypto-erase), then delete the database."""
    if not LocalStore.exists(data_dir):
        raise fail(StoreError(f"no device store in {data_dir}"))
    if not yes and not typer.confirm(f"Erase the device store in {data_dir} for good?"):
        raise typer.Exit(1)
    removed = LocalStore.forget(data_dir)
    console.print(f"erased: {', '.join(removed)}")
