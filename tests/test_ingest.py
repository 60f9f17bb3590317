"""Importing a user's own writing: each format, bad files, and what the store keeps."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from client.store import LocalStore
from client.store.examples import device_examples, split
from client.store.ingest import (
    BadImport,
    import_files,
    parse_chat,
    parse_mbox,
    parse_text,
    read_file,
)
from simulations.cli import app
from tests.conftest import open_test_store

PASSPHRASE = "a passphrase for import tests"

MARKDOWN = """# Mornings

I take my tea strong, and I drink it at seven sharp, before anyone else is awake.

Then a walk by the river, rain or shine; the herons know me by now.

## Evenings

Supper is soup. Always soup.
"""

CHATS = [
    {
        "messages": [
            {"role": "system", "content": "You are my assistant."},
            {"role": "user", "content": "Draft a note to the plumber."},
            {"role": "assistant", "content": "Hi Sam, the kitchen tap drips again. Tuesday?"},
            {"role": "user", "content": "Shorter."},
            {"role": "assistant", "content": [{"type": "text", "text": "Sam: tap drips. Tue?"}]},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Say hi to Ana."},
            {"role": "assistant", "content": "skip me", "weight": 0},
            {"role": "assistant", "content": "Hi Ana! Coffee soon?"},
        ]
    },
]

MBOX = """From me@example.org Mon Jan  1 10:00:00 2026
From: Me <me@example.org>
To: Bo <bo@example.org>
Subject: Re: the garden
Content-Type: text/plain; charset=utf-8

Yes, plant the beans by the fence; they like the morning sun.

On Sun, Bo wrote:
> Where should the beans go?
>
> Bo

--\x20
Me, from my phone

From me@example.org Tue Jan  2 10:00:00 2026
From: Me <me@example.org>
To: Cy <cy@example.org>
Subject: Saturday
Content-Type: text/plain; charset=utf-8

Count me in for Saturday.
>From the station I can walk.
"""


def test_text_paragraphs_answer_the_paragraph_or_heading_before() -> None:
    pairs = parse_text(MARKDOWN)
    assert [r for _, r in pairs] == [
        "I take my tea strong, and I drink it at seven sharp, before anyone else is awake.",
        "Then a walk by the river, rain or shine; the herons know me by now.",
        "Supper is soup. Always soup.",
    ]
    assert pairs[0][0] == "Mornings" and pairs[1][0] == pairs[0][1] and pairs[2][0] == "Evenings"


def test_long_paragraphs_are_cut_at_sentence_ends() -> None:
    paragraph = " ".join(f"Sentence number {i} is here." for i in range(300))
    pairs = parse_text(paragraph)
    assert len(pairs) > 1 and all(len(r) <= 2000 for _, r in pairs)
    assert all(r.endswith(".") for _, r in pairs)
    assert " ".join(r for _, r in pairs) == paragraph


def test_chat_assistant_turns_answer_the_user_turn_before() -> None:
    pairs = parse_chat("\n".join(json.dumps(c) for c in CHATS) + "\n")
    assert pairs == [
        ("Draft a note to the plumber.", "Hi Sam, the kitchen tap drips again. Tuesday?"),
        ("Shorter.", "Sam: tap drips. Tue?"),
        ("Say hi to Ana.", "Hi Ana! Coffee soon?"),
    ]


def test_mbox_keeps_the_senders_own_words() -> None:
    pairs = parse_mbox(MBOX)
    assert pairs[0] == (
        "Where should the beans go?\nBo",
        "Yes, plant the beans by the fence; they like the morning sun.",
    )
    assert pairs[1] == (
        "Write an email about: Saturday",
        "Count me in for Saturday.\nFrom the station I can walk.",
    )


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("photo.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
        ("latin1.txt", "café au lait, s'il vous plaît".encode("latin-1"), "not UTF-8"),
        ("big.md", b"word " * 300, "over the 1,000-byte limit"),
        (
            "chat.jsonl",
            b'{"messages": [{"role": "user", "content": "hi"}]}\n{"text": "x"}\n',
            "line 2",
        ),
        ("chat2.jsonl", b'{"messages": [{"role": "robot", "content": "hi"}]}\n', "unknown role"),
        ("chat3.jsonl", b'{"messages": [{"role": "user", "content": 7}]}\n', "content"),
        ("broken.jsonl", b'{"messages": [\n', "line 1 is not JSON"),
        ("mail.mbox", b"Subject: no From_ line\n\nhello\n", "From "),
        ("empty.md", b"\n\n   \n", "no example"),
    ],
)
def test_bad_files_are_refused_and_nothing_is_stored(tmp_path, name, content, message) -> None:
    # Prepare: a good file beside the bad one, in the same import.
    good = tmp_path / "good.md"
    good.write_text(MARKDOWN)
    bad = tmp_path / name
    bad.write_bytes(content)

    # Execute / Assert
    with open_test_store(tmp_path / "dev") as store:
        with pytest.raises(BadImport, match=message) as err:
            import_files(store, [good, bad], max_bytes=1000)
        assert str(bad) in str(err.value)
        assert store.examples() == []


def test_format_detection_and_override(tmp_path) -> None:
    notes = tmp_path / "notes"  # no suffix: sniffed from the content
    notes.write_text(json.dumps(CHATS[0]) + "\n")
    assert read_file(notes).fmt == "chat"
    mail = tmp_path / "sent"
    mail.write_text(MBOX)
    assert read_file(mail).fmt == "mbox"
    assert read_file(mail, fmt="text").fmt == "text"
    with pytest.raises(BadImport, match="unknown format"):
        read_file(mail, fmt="docx")


def test_cli_import_scrubs_counts_splits_and_forget_erases(tmp_path, monkeypatch) -> None:
    # Prepare: a device, and the user's files (one with an e-mail address in it).
    monkeypatch.setenv("FEDPERSONA_PASSPHRASE", PASSPHRASE)
    runner = CliRunner()
    d = tmp_path / "dev"
    files = {
        "notes.md": MARKDOWN + "\nWrite to me at jane.doe@example.com any time.\n",
        "chats.jsonl": "\n".join(json.dumps(c) for c in CHATS),
        "sent.mbox": MBOX,
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert (
        runner.invoke(app, ["device", "init", "--data-dir", str(d), "--model", "tiny"]).exit_code
        == 0
    )

    # Execute
    out = runner.invoke(
        app, ["device", "import", *(str(tmp_path / n) for n in files), "--data-dir", str(d)]
    )
    status = json.loads(
        runner.invoke(app, ["device", "status", "--json", "--data-dir", str(d)]).output
    )

    # Assert: every format counted; PII scrubbed; the newest held out; nothing else on disk.
    assert out.exit_code == 0, out.output
    assert "4 examples (text)" in out.output and "3 examples (chat)" in out.output
    assert "2 examples (mbox)" in out.output and "holds 9 examples" in out.output
    assert status["examples"]["by_source"] == {"import:text": 4, "import:chat": 3, "import:mbox": 2}
    assert (status["examples"]["train"], status["examples"]["held_out"]) == (7, 2)
    with LocalStore.open(d, _secret()) as store:
        examples = device_examples(store)
        train, held_out = split(examples, 0.2)
    assert "[EMAIL]" in examples[3].reply and "jane.doe" not in examples[3].reply
    assert [e.source for e in held_out] == ["import:mbox"] * 2
    assert sorted(p.name for p in d.iterdir()) == ["store.db", "store.key"]
    for path in d.iterdir():
        assert b"herons" not in path.read_bytes() and b"plumber" not in path.read_bytes()

    # forget takes the imported writing with everything else.
    assert runner.invoke(app, ["device", "forget", "--yes", "--data-dir", str(d)]).exit_code == 0
    assert not any(p.name.startswith("store.") for p in d.iterdir())


def _secret():  # type: ignore[no-untyped-def]
    from common.crypto import Secret

    return Secret(passphrase=PASSPHRASE)


def test_a_simulated_device_is_filled_through_the_same_path(tmp_path) -> None:
    # Prepare
    from client.federation.simulated import simulated_user
    from client.store.ingest import REPLAY_SOURCE, replay_role
    from common.config import parse_run_config
    from common.pii import scrub
    from tests.conftest import tiny_run_config

    cfg = parse_run_config(tiny_run_config())
    user = simulated_user(cfg, 1, 4)

    # Execute: twice (a resumed run must not add the role again).
    with open_test_store(tmp_path / "sim") as store:
        added = replay_role(store, user)
        again = replay_role(store, user)
        train, held_out = split(device_examples(store), cfg.data.test_fraction)

    # Assert: the role's turns in play order, its last ones held out, as the role data split.
    assert added == len(user.train) + len(user.test) and again == 0
    assert [e.reply for e in held_out] == [scrub(s.reply) for s in user.test]
    assert [e.prompt for e in train] == [scrub(s.prompt) for s in user.train]
    assert {e.source for e in train} == {REPLAY_SOURCE}


def test_paths_that_are_not_files_are_refused(tmp_path) -> None:
    with pytest.raises(BadImport, match="not a regular file"):
        read_file(tmp_path)
    with pytest.raises(BadImport, match="cannot read"):
        read_file(tmp_path / "missing.md")


def test_endorsed_interactions_join_the_examples(tmp_path) -> None:
    with open_test_store(tmp_path / "dev") as store:
        kept = store.add_interaction("Name a fish.", "A trout.", ts=10.0)
        store.add_feedback(kept, "rating", value=5)
        edited = store.add_interaction("Name a bird.", "A crow.", ts=20.0)
        store.add_feedback(edited, "edit", text="A heron, of course.")
        store.update_response(edited, "A heron, of course.")
        dropped = store.add_interaction("Name a tree.", "An oak.", ts=30.0)
        store.add_feedback(dropped, "rating", value=5)
        store.add_feedback(dropped, "reject")
        store.add_interaction("Unrated", "no feedback", ts=40.0)
        store.add_examples([("q", "imported")], source="import:text", ts=15.0)
        examples = device_examples(store)
    assert [(e.reply, e.source) for e in examples] == [
        ("A trout.", "endorsed"),
        ("imported", "import:text"),
        ("A heron, of course.", "endorsed"),
    ]


def test_parsers_never_return_empty_replies() -> None:
    assert all(r.strip() for _, r in parse_text("a\n\n\n\nb\n\n# H\n\n"))
    assert (
        parse_chat('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}') == []
    )
