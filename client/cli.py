"""``fedpersona device …``: the user's side — init, chat, ask, feedback, profile, serve, forget.

Every command works on one device data dir (``--data-dir`` or ``$FEDPERSONA_DATA_DIR``) and
unlocks its encrypted store with ``--key-file`` or a passphrase (``$FEDPERSONA_PASSPHRASE``, or
typed when asked). Nothing here talks to any server; ``serve`` binds 127.0.0.1 only.

(One file on purpose, over the usual length: each command is a short function over the same unlock
and option helpers, and together they are what `fedpersona device --help` lists, read top to
bottom; the work is in the modules they call.)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from client.store import API_TOKEN, DEFAULT_RETENTION_DAYS, LocalStore, StoreError
from client.store.ingest import DEFAULT_MAX_BYTES
from common.crypto import PASSPHRASE_ENV, NoSecret, Secret, StoreKeyError, resolve_secret

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


def _secret(key_file: Path | None, *, confirm: bool = False) -> Secret:
    """The store's secret from the options or environment; else asked at the terminal. A
    passphrase given but too short is refused, never replaced by a prompt."""
    try:
        return resolve_secret(key_file=key_file)
    except NoSecret as err:
        if not sys.stdin.isatty():
            raise _fail(err) from None
    except ValueError as err:
        raise _fail(err) from None
    phrase = typer.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm)
    try:
        return Secret(passphrase=phrase)
    except ValueError as err:
        raise _fail(err) from None


def _fail(err: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {err}", soft_wrap=True)  # paths stay copyable
    return typer.Exit(1)


def _open(data_dir: Path, key_file: Path | None, retention: float) -> LocalStore:
    try:
        return LocalStore.open(data_dir, _secret(key_file), retention_days=retention)
    except (StoreError, StoreKeyError, FileNotFoundError, ValueError) as err:
        raise _fail(err) from None


def _assistant(  # type: ignore[no-untyped-def]
    data_dir: Path, key_file: Path | None, retention: float, *, ab_test: bool = False
):
    from client.assistant.assistant import Assistant
    from common.model import quiet_transformers

    quiet_transformers()
    store = _open(data_dir, key_file, retention)
    try:
        return Assistant(store, ab_test=ab_test)
    except (ValueError, FileNotFoundError) as err:
        store.close()
        raise _fail(err) from None


@app.command()
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
    secret = _secret(key_file, confirm=True)
    try:
        store = LocalStore.create(data_dir, secret, retention_days=retention_days)
    except (StoreError, ValueError) as err:
        raise _fail(err) from None
    with store:
        try:
            settings = init_device(store, model=model, strategy=strategy)
        except ValueError as err:
            store.close()
            LocalStore.forget(data_dir)
            raise _fail(err) from None
        token = store.get_meta(API_TOKEN)
    console.print(f"device store created in {data_dir} ({secret.kind})")
    console.print(
        f"model {settings['model.name']}, strategy {settings['personalization.strategy']}"
    )
    console.print(f"local API token: {token}")


@app.command("import")
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

    with _open(data_dir, key_file, retention_days) as store:
        try:
            parsed = import_files(store, paths, fmt=fmt, max_bytes=max_bytes)
        except (BadImport, ValueError) as err:
            raise _fail(err) from None
        total = sum(store.example_counts().values())
    for p in parsed:
        console.print(f"{p.path}: {len(p.pairs)} examples ({p.fmt})", markup=False, soft_wrap=True)
    console.print(f"the store now holds {total} examples of your own writing")


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="What to ask")],
    data_dir: DataDir,
    key_file: KeyFile = None,
    candidates: Annotated[int, typer.Option(help="Samples to rerank")] = 3,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length limit")] = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature")] = 0.8,
    seed: Annotated[int | None, typer.Option(help="Sampling seed")] = None,
    task: Annotated[str | None, typer.Option(help="Your current task or app")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    ab_test: Annotated[
        bool, typer.Option(help="Join the federated A/B test (coin-chosen model)")
    ] = False,
    retention_days: Retention = DEFAULT_RETENTION_DAYS,
) -> None:
    """Ask once; prints the answer and its interaction id (for `feedback`)."""
    assistant = _assistant(data_dir, key_file, retention_days, ab_test=ab_test)
    with assistant.store:
        try:
            answer = assistant.ask(
                question,
                n=candidates,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                seed=seed,
                task=task,
            )
        except ValueError as err:
            raise _fail(err) from None
    if as_json:
        print(json.dumps(vars(answer), indent=1))
        return
    console.print(answer.text, markup=False, highlight=False)
    console.print(
        f"[dim]#{answer.interaction_id} · model: {answer.variant} · "
        f"{answer.timings_ms['generate']:.0f} ms[/dim]"
    )


@app.command()
def feedback(
    interaction_id: Annotated[int, typer.Argument(help="The answer's id (from ask/chat)")],
    data_dir: DataDir,
    key_file: KeyFile = None,
    rating: Annotated[float | None, typer.Option(help="1-5 stars")] = None,
    preferred: Annotated[str | None, typer.Option(help="The answer you wanted instead")] = None,
    edit: Annotated[str | None, typer.Option(help="Your edited version of the answer")] = None,
    reject: Annotated[bool, typer.Option(help="Mark the answer as bad")] = False,
    retention_days: Retention = DEFAULT_RETENTION_DAYS,
) -> None:
    """Rate, prefer, edit or reject an answer; the personal model adapts immediately."""
    assistant = _assistant(data_dir, key_file, retention_days)
    with assistant.store:
        try:
            result = assistant.feedback(
                interaction_id, rating=rating, preferred=preferred, edit=edit, reject=reject
            )
        except ValueError as err:
            raise _fail(err) from None
    msg = f"feedback #{result.feedback_id} stored"
    if result.adapted:
        msg += f"; personal model adapted in {result.adapt_ms:.0f} ms"
    if result.drift:
        msg += "; drift detected, re-adapted on recent examples"
    console.print(msg + f"; answering with: {result.variant}")


@app.command()
def chat(
    data_dir: DataDir,
    key_file: KeyFile = None,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length limit")] = 96,
    candidates: Annotated[
        int, typer.Option(help="Samples to rerank (1: the answer appears as it is written)")
    ] = 1,
    retention_days: Retention = DEFAULT_RETENTION_DAYS,
) -> None:
    """Interactive chat that remembers the conversation. After an answer: /rate N,
    /prefer TEXT, /edit TEXT, /bad; /new starts over; /quit."""
    assistant = _assistant(data_dir, key_file, retention_days)
    last = None
    turns: list[dict[str, str]] = []
    with assistant.store:
        while True:
            try:
                line = console.input("[bold]you>[/bold] ").strip()
            except (EOFError, KeyboardInterrupt):
                break
            if not line:
                continue
            if line in ("/quit", "/exit"):
                break
            if line == "/new":
                turns, last = [], None
                continue
            try:
                if line.startswith("/"):
                    cmd, _, arg = line.partition(" ")
                    if last is None:
                        raise ValueError("ask something first")
                    kw = {
                        "/rate": lambda a: {"rating": float(a)},
                        "/prefer": lambda a: {"preferred": a},
                        "/edit": lambda a: {"edit": a},
                        "/bad": lambda a: {"reject": True},
                    }.get(cmd)
                    if kw is None:
                        raise ValueError(
                            "commands: /rate N, /prefer TEXT, /edit TEXT, /bad, /new, /quit"
                        )
                    result = assistant.feedback(last, **kw(arg))
                    if cmd == "/edit":  # the conversation goes on from the edited answer
                        turns[-1]["content"] = arg
                    adapted = f"; adapted in {result.adapt_ms:.0f} ms" if result.adapted else ""
                    console.print(f"[dim]noted{adapted} · model: {result.variant}[/dim]")
                    continue
                answer = assistant.ask(
                    [*turns, {"role": "user", "content": line}],
                    n=candidates,
                    max_new_tokens=max_new_tokens,
                    on_text=lambda piece: console.out(piece, end="", highlight=False),
                )
            except ValueError as err:
                console.print(f"[red]{err}[/red]")
                continue
            console.out("")
            last = answer.interaction_id
            turns += [
                {"role": "user", "content": line},
                {"role": "assistant", "content": answer.text},
            ]
            console.print(f"[dim]#{last} · {answer.variant}[/dim]")


@app.command()
def profile(
    data_dir: DataDir,
    key_file: KeyFile = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="key=value, e.g. tone=poetic (repeatable)")
    ] = None,
    retention_days: Retention = DEFAULT_RETENTION_DAYS,
) -> None:
    """Show the profile, or change explicit preferences with --set."""
    from client.assistant.profile import CHOICES, Profile

    with _open(data_dir, key_file, retention_days) as store:
        try:
            current = Profile.from_dict(store.get_profile() or {})
            if set_:
                from common.config import parse_set

                current = current.updated(parse_set(set_))
                store.put_profile(current.to_dict())
        except ValueError as err:
            raise _fail(err) from None
    table = Table(title="profile")
    table.add_column("key")
    table.add_column("value")
    table.add_column("choices")
    for key, choices in CHOICES.items():
        table.add_row(key, str(getattr(current, key)), " | ".join(choices))
    table.add_row("domains", ", ".join(current.domains), "comma-separated")
    console.print(table)
    console.print(f"[dim]{current.describe()}[/dim]")


@app.command()
def status(
    data_dir: DataDir,
    key_file: KeyFile = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    retention_days: Retention = DEFAULT_RETENTION_DAYS,
) -> None:
    """Profile, history, personal adapter, ε spent / cap and retention."""
    from client.store.status import status as device_status

    with _open(data_dir, key_file, retention_days) as store:
        try:
            info = device_status(store)
        except ValueError as err:
            raise _fail(err) from None
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
    console.print(table)


@app.command()
def budget(
    data_dir: DataDir,
    key_file: KeyFile = None,
    retention_days: Retention = DEFAULT_RETENTION_DAYS,
) -> None:
    """The privacy ledger: ε spent, cap, rounds charged/declined, what ε assumes."""
    from client.store.status import budget as device_budget

    with _open(data_dir, key_file, retention_days) as store:
        try:
            info = device_budget(store)
        except ValueError as err:
            raise _fail(err) from None
    print(json.dumps(info, indent=1))


privacy_app = typer.Typer(
    help="The device's own privacy policy: what it accepts from a federation's server.",
    no_args_is_help=True,
)
app.add_typer(privacy_app, name="privacy")


def _policy_dict(policy) -> dict:  # type: ignore[no-untyped-def]
    return {k.replace("_", "-"): v for k, v in policy.to_dict().items() if k != "version"}


@privacy_app.command("show")
def privacy_show(data_dir: DataDir, key_file: KeyFile = None) -> None:
    """Print the policy every round's instructions are checked against."""
    from client.federation.policy import DevicePolicy

    with _open(data_dir, key_file, DEFAULT_RETENTION_DAYS) as store:
        try:
            policy = DevicePolicy.of(store)
        except ValueError as err:
            raise _fail(err) from None
    print(json.dumps(_policy_dict(policy), indent=1))


@privacy_app.command("set")
def privacy_set(
    data_dir: DataDir,
    key_file: KeyFile = None,
    epsilon_cap: Annotated[float | None, typer.Option(help="Lifetime ε cap (each kind)")] = None,
    delta: Annotated[float | None, typer.Option(help="δ of every ε (fixed once charged)")] = None,
    min_noise_multiplier: Annotated[
        float | None, typer.Option(help="Least noise multiplier σ accepted (0: allow none)")
    ] = None,
    min_cohort: Annotated[
        int | None, typer.Option(help="Least m_min a round may size the noise share by")
    ] = None,
    require_secagg: Annotated[
        bool | None, typer.Option(help="Distributed noise only under SecAgg+ masking")
    ] = None,
    trust_server_noise: Annotated[
        bool | None, typer.Option(help="Accept central noise the server adds (unverifiable)")
    ] = None,
    trust_server_sampling: Annotated[
        bool | None, typer.Option(help="Credit the server's claimed sampling rate")
    ] = None,
    period_days: Annotated[float | None, typer.Option(help="Budget period (0: none)")] = None,
    period_epsilon_cap: Annotated[float | None, typer.Option(help="ε cap per period")] = None,
) -> None:
    """Change the policy (the options given); print the result."""
    from client.federation.ledger import LEDGER_BLOB
    from client.federation.policy import DevicePolicy

    changes = {
        k: v
        for k, v in {
            "epsilon_cap": epsilon_cap,
            "delta": delta,
            "min_noise_multiplier": min_noise_multiplier,
            "min_cohort": min_cohort,
            "require_secagg": require_secagg,
            "trust_server_noise": trust_server_noise,
            "trust_server_sampling": trust_server_sampling,
            "period_days": period_days,
            "period_epsilon_cap": period_epsilon_cap,
        }.items()
        if v is not None
    }
    with _open(data_dir, key_file, DEFAULT_RETENTION_DAYS) as store:
        try:
            policy = DevicePolicy.of(store)
            new = policy.with_changes(**changes)
            ledger = store.get_json(LEDGER_BLOB)
            if new.delta != policy.delta and isinstance(ledger, dict) and ledger.get("events"):
                raise ValueError(
                    f"the ledger holds charges at δ = {policy.delta:g}; δ cannot change now"
                )
            new.save(store)
        except ValueError as err:
            raise _fail(err) from None
    print(json.dumps(_policy_dict(new), indent=1))


@app.command()
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

    with _open(data_dir, key_file, DEFAULT_RETENTION_DAYS) as store:
        print(rotate_api_token(store) if rotate else store.get_meta(API_TOKEN))


@app.command()
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
        raise _fail(err) from None
    if adapter is not None:
        assistant = _assistant(data_dir, key_file, retention_days)
        with assistant.store:
            data = assistant.store.export()
            assistant.export_adapter(adapter, force=force)
    else:
        with _open(data_dir, key_file, retention_days) as store:
            data = store.export()
    atomic_write_bytes(out, json.dumps(data, indent=1).encode())
    os.chmod(out, 0o600)
    console.print(f"exported {len(data['interactions'])} interactions to {out} (mode 0600)")


@app.command()
def forget(
    data_dir: DataDir,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation")] = False,
) -> None:
    """Erase everything: shred the wrapped key (crypto-erase), then delete the database."""
    if not LocalStore.exists(data_dir):
        raise _fail(StoreError(f"no device store in {data_dir}"))
    if not yes and not typer.confirm(f"Erase the device store in {data_dir} for good?"):
        raise typer.Exit(1)
    removed = LocalStore.forget(data_dir)
    console.print(f"erased: {', '.join(removed)}")


@app.command()
def serve(
    data_dir: DataDir,
    key_file: KeyFile = None,
    host: Annotated[str, typer.Option(help="Loopback only")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8765,
    ab_test: Annotated[
        bool, typer.Option(help="Join the federated A/B test (coin-chosen model)")
    ] = False,
    retention_days: Retention = DEFAULT_RETENTION_DAYS,
    dev_docs: Annotated[
        bool,
        typer.Option(help="Also serve /docs, /redoc and /openapi.json (open, no token)"),
    ] = False,
) -> None:
    """Serve the local HTTP API (OpenAI-compatible chat) on 127.0.0.1."""
    import uvicorn

    from client.api.app import check_loopback, create_app

    try:
        check_loopback(host)
    except ValueError as err:
        raise _fail(err) from None
    from client.assistant.model_thread import MODEL_THREAD

    # Built on the thread that will answer: one OpenMP team for all model work.
    assistant = MODEL_THREAD.call(_assistant, data_dir, key_file, retention_days, ab_test=ab_test)
    with assistant.store:
        token_ = assistant.store.get_meta(API_TOKEN)
        if not token_:
            raise _fail(StoreError("no API token in the store; run `fedpersona device init`"))
        console.print(f"serving on http://{host}:{port} (bearer token: `fedpersona device token`)")
        uvicorn.run(
            create_app(assistant, token=token_, docs=dev_docs),
            host=host,
            port=port,
            log_level="info",
        )


@app.command("expert-add")
def expert_add(
    name: Annotated[str, typer.Argument(help="Expert name")],
    adapter_dir: Annotated[Path, typer.Argument(help="A peft adapter dir (same base and LoRA)")],
    data_dir: DataDir,
    about: Annotated[str, typer.Option(help="What the expert is good at (embedded)")],
    key_file: KeyFile = None,
    retention_days: Retention = DEFAULT_RETENTION_DAYS,
) -> None:
    """Install an expert adapter for the router (e.g. a federation cluster's adapter)."""
    assistant = _assistant(data_dir, key_file, retention_days)
    with assistant.store:
        try:
            gates = assistant.add_expert(name, adapter_dir, about=about)
        except (ValueError, FileNotFoundError) as err:
            raise _fail(err) from None
    console.print("router gates for you: " + ", ".join(f"{k}={v:.2f}" for k, v in gates.items()))


@app.command()
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

    secret = _secret(key_file)
    if secret.passphrase is not None:  # typed at the prompt: this process alone keeps it
        os.environ[PASSPHRASE_ENV] = secret.passphrase
    try:  # unlock (creating on first use) now, or fail before any ClientApp waits on it
        LocalStore.open(data_dir, secret, retention_days=retention_days, create=True).close()
    except (StoreError, StoreKeyError, FileNotFoundError, ValueError) as err:
        raise _fail(err) from None
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
        raise _fail(err) from None
