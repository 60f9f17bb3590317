"""The README and ``docs/`` name only what exists: every repository file path they cite, and
every ``fedpersona …`` command they show parses (its sub-commands and flags exist)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import typer.main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Folders of the repository a cited path may start with (anything else — runs/, RUN_DIR/,
# ~/.cache, a device's data dir — is a place a command writes, not a file of the project).
TOP = ("client", "common", "server", "simulations", "scripts", "docs", "deploy", "tests")
TOP += ("benchmarks", ".ci")
# A path written with a placeholder is a pattern, not a file.
PLACEHOLDER = re.compile(r"[<>*{}]|\bN+\b|NNNN|X{3,}|\.\.\.|…")
# Files a documented command writes, named where the docs say so (not committed).
WRITTEN = {"deploy/images.env"}  # deploy/pin_images.sh, on a machine that reaches a registry
# What a cited path may end with; ``client/assistant/engine.rerank`` is the module
# client/assistant/engine.py.
SUFFIXES = {".py", ".md", ".json", ".sh", ".toml", ".yml", ".yaml", ".lock", ".png", ".html"}
SUFFIXES |= {".js", ".css", ".txt", ".npz", ".jsonl", ".csv", ".env", ".Dockerfile", ".key"}


def cited_paths(text: str) -> set[str]:
    """Repository paths a Markdown text cites in code spans (``client/federation/device.py``,
    ``docs/deploy.md``, ``benchmarks/results/x.json``; a trailing ``/`` is a folder)."""
    out = set()
    for span in re.findall(r"`([^`\n]+)`", text):
        for word in span.split():
            word = word.strip(",;:()'\"")
            first = word.split("/", 1)[0]
            if "/" in word and first in TOP and not PLACEHOLDER.search(word):
                path = word.split(":", 1)[0].split("#", 1)[0].split("(", 1)[0]
                stem, dot, suffix = path.rpartition(".")
                if dot and "/" not in suffix and f".{suffix}" not in SUFFIXES:
                    path = f"{stem}.py"  # module.attribute
                out.add(path)
    return out


def shown_commands(text: str) -> list[str]:
    """Every ``fedpersona …`` command line a Markdown text shows (in code spans or in code
    blocks, continuation lines joined; usage lines with ``[…]`` or ``|`` alternatives
    included)."""
    text = text.replace("\\\n", " ")
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("fedpersona "):
                commands.append(line.split(" #", 1)[0].strip())
    for span in re.findall(r"`(fedpersona [^`\n]+)`", text):
        commands.append(span)
    return commands


def _root_command() -> click.Group:
    from simulations.cli import app

    command = typer.main.get_command(app)
    assert isinstance(command, click.Group)
    return command


def check_command(line: str, root: click.Group) -> str | None:
    """Why ``line`` does not parse as a ``fedpersona`` command, or ``None``: its sub-commands
    must exist, and every ``--flag`` must be an option of the command it reaches."""
    line = re.sub(r"\[([^\]]*)\]", r"\1", line)  # usage: optional parts are still flags
    try:
        words = shlex.split(line)[1:]
    except ValueError as err:
        return f"{line!r}: {err}"
    command: click.Command = root
    path = ["fedpersona"]
    words = [w for w in words if w not in ("…", "...")]  # "fedpersona device …": the group
    while isinstance(command, click.Group) and words and not words[0].startswith("-"):
        name = words[0].split("|", 1)[0]
        sub = command.get_command(click.Context(command), name)
        if sub is None:
            return f"{line!r}: `{' '.join(path)}` has no command {name!r}"
        command, path, words = sub, [*path, name], words[1:]
    if isinstance(command, click.Group) and not words:
        return None  # `fedpersona device` alone: the group's help
    known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    known |= {"--help"}
    for word in words:
        for alt in word.split("|"):
            flag = alt.split("=", 1)[0]
            if flag.startswith("--") and flag not in known:
                return f"{line!r}: `{' '.join(path)}` has no option {flag}"
    return None


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_path_exists(doc: Path) -> None:
    cited = cited_paths(doc.read_text()) - WRITTEN
    missing = sorted(p for p in cited if not (ROOT / p).exists())
    assert not missing, f"{doc.relative_to(ROOT)} cites paths that do not exist: {missing}"


def broken_links(doc: Path) -> list[str]:
    """Relative Markdown links and images of ``doc`` whose target does not exist."""
    targets = re.findall(r"\]\(([^)\s]+)\)", doc.read_text())
    local = [t.split("#", 1)[0] for t in targets if not re.match(r"[a-z]+:", t)]
    return [t for t in local if t and not (doc.parent / t).exists()]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc: Path) -> None:
    broken = broken_links(doc)
    assert not broken, f"{doc.relative_to(ROOT)} links to what does not exist: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_fedpersona_command_shown_parses(doc: Path) -> None:
    root = _root_command()
    problems = [
        why for line in shown_commands(doc.read_text()) if (why := check_command(line, root))
    ]
    assert not problems, "\n".join(problems)


def test_the_checks_can_fail(tmp_path: Path) -> None:
    root = _root_command()
    assert check_command("fedpersona simulate --preset quick", root) is None
    assert check_command("fedpersona simulate --no-such-flag 1", root) is not None
    assert check_command("fedpersona no-such-command", root) is not None
    assert check_command("fedpersona device status --data-dir D", root) is None
    assert "client/no_such_file.py" in cited_paths("see `client/no_such_file.py`")
    assert not cited_paths("`runs/<run-name>/summary.json` and `RUN_DIR/devices/`")
    assert cited_paths("`client/assistant/engine.rerank` `common/x.sample(a, b)`") == {
        "client/assistant/engine.py",
        "common/x.py",
    }
    block = "```bash\nfedpersona simulate \\\n  --preset tiny  # a comment\n```"
    assert shown_commands(block) == ["fedpersona simulate    --preset tiny"]
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md#x) ![img](img/none.png) [web](https://flower.ai)")
    assert broken_links(page) == ["img/none.png"]
