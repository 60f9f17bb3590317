"""``fedpersona device ask|chat|feedback|profile|expert-add|serve``: the user's assistant —
answers, conversations, what the user thinks of them, the profile, expert adapters, and the
local web app + OpenAI-compatible API (127.0.0.1 only)."""

from __future__ import annotations

import json
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
)
from client.store import API_TOKEN, DEFAULT_RETENTION_DAYS, StoreError


@app.command(rich_help_panel="Your assistant")
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
    assistant = open_assistant(data_dir, key_file, retention_days, ab_test=ab_test)
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
            raise fail(err) from None
    if as_json:
        print(json.dumps(vars(answer), indent=1))
        return
    console.print(answer.text, markup=False, highlight=False)
    console.print(
        f"[dim]#{answer.interaction_id} · model: {answer.variant} · "
        f"{answer.timings_ms['generate']:.0f} ms[/dim]"
    )


@app.command(rich_help_panel="Your assistant")
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
    assistant = open_assistant(data_dir, key_file, retention_days)
    with assistant.store:
        try:
            result = assistant.feedback(
                interaction_id, rating=rating, preferred=preferred, edit=edit, reject=reject
            )
        except ValueError as err:
            raise fail(err) from None
    msg = f"feedback #{result.feedback_id} stored"
    if result.adapted:
        msg += f"; personal model adapted in {result.adapt_ms:.0f} ms"
    if result.drift:
        msg += "; drift detected, re-adapted on recent examples"
    console.print(msg + f"; answering with: {result.variant}")


@app.command(rich_help_panel="Your assistant")
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
    assistant = open_assistant(data_dir, key_file, retention_days)
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


@app.command(rich_help_panel="Your assistant")
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

    with open_store(data_dir, key_file, retention_days) as store:
        try:
            current = Profile.from_dict(store.get_profile() or {})
            if set_:
                from common.config import parse_set

                current = current.updated(parse_set(set_))
                store.put_profile(current.to_dict())
        except ValueError as err:
            raise fail(err) from None
    table = Table(title="profile")
    table.add_column("key")
    table.add_column("value")
    table.add_column("choices")
    for key, choices in CHOICES.items():
        table.add_row(key, str(getattr(current, key)), " | ".join(choices))
    table.add_row("domains", ", ".join(current.domains), "comma-separated")
    console.print(table)
    console.print(f"[dim]{current.describe()}[/dim]")


@app.command("expert-add", rich_help_panel="Your assistant")
def expert_add(
    name: Annotated[str, typer.Argument(help="Expert name")],
    adapter_dir: Annotated[Path, typer.Argument(help="A peft adapter dir (same base and LoRA)")],
    data_dir: DataDir,
    about: Annotated[str, typer.Option(help="What the expert is good at (embedded)")],
    key_file: KeyFile = None,
    retention_days: Retention = DEFAULT_RETENTION_DAYS,
) -> None:
    """Install an expert adapter for the router (e.g. a federation cluster's adapter)."""
    assistant = open_assistant(data_dir, key_file, retention_days)
    with assistant.store:
        try:
            gates = assistant.add_expert(name, adapter_dir, about=about)
        except (ValueError, FileNotFoundError) as err:
            raise fail(err) from None
    console.print("router gates for you: " + ", ".join(f"{k}={v:.2f}" for k, v in gates.items()))


@app.command(rich_help_panel="Your assistant")
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

    from client.cli.options import passphrase_out_of_environment

    passphrase_out_of_environment()

    from client.api.app import check_loopback, create_app

    try:
        check_loopback(host)
    except ValueError as err:
        raise fail(err) from None
    from client.assistant.model_thread import MODEL_THREAD

    # Built on the thread that will answer: one OpenMP team for all model work.
    assistant = MODEL_THREAD.call(
        open_assistant, data_dir, key_file, retention_days, ab_test=ab_test
    )
    with assistant.store:
        token_ = assistant.store.get_meta(API_TOKEN)
        if not token_:
            raise fail(StoreError("no API token in the store; run `fedpersona device init`"))
        console.print(f"serving on http://{host}:{port} (bearer token: `fedpersona device token`)")
        uvicorn.run(
            create_app(assistant, token=token_, docs=dev_docs),
            host=host,
            port=port,
            log_level="info",
        )
