"""Bring the user's own writing into the device store as training examples.

The formats (text/Markdown, chat JSONL in the OpenAI ``messages`` shape, mbox of sent mail)
are parsed by :mod:`common.formats`; every pair then goes through
:meth:`client.store.LocalStore.add_examples`: PII-scrubbed, kept only in the encrypted store,
purged with the retention window, erased by ``forget``. A simulated device is filled the same
way: its Shakespeare role's turns become a chat conversation parsed by the same code as an
imported JSONL file (:func:`replay_role`), a per-user corpus's files are imported as a user's
own would be (:func:`import_corpus_user`).

A file that cannot be read as what it claims to be is refused with the reason and nothing of
any file in the same import is stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.store import LocalStore
from common.formats import (  # noqa: F401  (the import path's names, re-exported)
    DEFAULT_MAX_BYTES,
    FORMATS,
    MAX_REPLY_CHARS,
    MAX_REQUEST_CHARS,
    BadImport,
    Pair,
    Parsed,
    detect_format,
    pairs_from_conversation,
    parse_chat,
    parse_mbox,
    parse_text,
    read_file,
)

if TYPE_CHECKING:  # common.data imports torch: `device import` and `status` must not
    from common.data import UserData

REPLAY_SOURCE = "replay"


def import_files(
    store: LocalStore,
    paths: Sequence[Path],
    *,
    fmt: str = "auto",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> list[Parsed]:
    """Parse every file, then store all their examples in one transaction.

    Raises:
        BadImport: If any file cannot be imported (then nothing is stored).
    """
    parsed = [read_file(p, fmt=fmt, max_bytes=max_bytes) for p in paths]
    store.add_example_batches([(p.source, list(p.pairs)) for p in parsed])
    return parsed


# ---- simulated devices ----------------------------------------------------------------------


def fill_simulated_store(store: LocalStore, user: UserData) -> int:
    """Fill a simulated device's store with its user's data, once, through the import path: a
    Shakespeare role (:func:`replay_role`) or a corpus user (:func:`import_corpus_user`).

    Returns:
        The number of examples added (0 if the store already had some).
    """
    if store.example_counts():
        return 0
    if user.kind == "corpus":
        return import_corpus_user(store, user)
    return replay_role(store, user)


def import_corpus_user(store: LocalStore, user: UserData) -> int:
    """Import a corpus user's data as the user would: its files with :func:`import_files` (a
    folder corpus), else its records' conversations, parsed by the chat format's code
    (a JSONL corpus; :mod:`common.corpus`), in one transaction.

    Raises:
        BadImport: If a file changed since the corpus was read and no longer imports.
    """
    if user.files:
        return sum(len(p.pairs) for p in import_files(store, [Path(f) for f in user.files]))
    pairs = [(s.prompt, s.reply) for s in (*user.train, *user.test)]
    return store.add_examples(pairs, source="import:chat")


def replay_role(store: LocalStore, user: Any) -> int:
    """Fill a simulated device's store with its Shakespeare role, through the import path.

    The role's turns (the speech before as the request, the role's reply as the endorsed
    answer), in play order, become one chat conversation parsed like an imported JSONL file;
    the last ones are the newest examples, i.e. the device's held-out slice.

    Args:
        store: The simulated device's store (filled once: a store with examples is left as is).
        user: A :class:`common.data.UserData`.

    Returns:
        The number of examples added (0 if the store already had some).
    """
    if store.example_counts():
        return 0
    messages = []
    for sample in (*user.train, *user.test):
        messages += [
            {"role": "user", "content": sample.prompt},
            {"role": "assistant", "content": sample.reply},
        ]
    pairs = pairs_from_conversation(messages, f"role {user.user}")
    return store.add_examples(pairs, source=REPLAY_SOURCE)
