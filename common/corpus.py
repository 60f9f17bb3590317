"""A per-user corpus for simulation: any people's writing, one simulated device per person.

``fedpersona simulate --corpus PATH`` (run config ``data.corpus``) reads PATH as one of:

* **a folder** with one entry per user: a file (``alice.md``, ``bob.jsonl``, ``carol.mbox``;
  the user is the name without its suffix) or a sub-folder (``dave/``, every file under it in
  path order). Each file is read by the parser ``fedpersona device import`` uses
  (:mod:`common.formats`: text/Markdown, chat JSONL in the OpenAI ``messages`` shape, mbox),
  so a user's order is file order: oldest first.
* **one JSONL file** whose records each carry a user id and a conversation:
  ``{"user": "alice", "messages": [...], "timestamp": "2018-04-20T01:57:41"}`` (``user_id``
  for ``user``; ``timestamp``, a number or an ISO date, optional). A user's records are
  ordered by timestamp where they have one, else by their place in the file.

Each user's examples are the ``(request, reply)`` pairs those parsers make; the newest
``data.test-fraction`` of them are the held-out slice (:func:`common.data.held_out_count`), as
on a device. A user is **skipped**, with the reason, when a file cannot be imported (binary,
not UTF-8, malformed), or when after holding out it has fewer than ``data.min-examples``
examples to train on or fewer than two held-out ones (one to report on, one for the device's
own decisions). A JSONL record without a user id or with a broken ``messages`` shape is
skipped with its line number. The eligible users, sorted by id and shuffled with the run's
seed, are the federation's in that order (the first ``data.num-users`` join; the next ones
are the newcomers a cold-start measurement uses) — the same order in every process.

The simulated device of a user imports its data through the device's own import path
(:func:`client.store.ingest.import_corpus_user`): PII-scrubbed, into its encrypted store.
"""

from __future__ import annotations

import functools
import random
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import DataConfig
from common.corpus_layouts import CorpusError, folder_users, jsonl_users
from common.data import Sample, UserData, select_users
from common.formats import DEFAULT_MAX_BYTES, Pair
from common.split import held_out_count

MAX_USER_ID_CHARS = 64
# Skipped users listed on screen (all of them are in the run's corpus.json).
SHOWN_SKIPS = 12
_UNSAFE = re.compile(r"[^A-Za-z0-9._@+-]+")


@dataclass(frozen=True)
class Corpus:
    """The users of a corpus: eligible ones in the federation's order, skipped ones with why.

    Attributes:
        path: The corpus (a folder or one JSONL file).
        layout: ``"folder"`` or ``"jsonl"``.
        users: The eligible users, in the federation's seeded order.
        skipped: ``(user or record, why)`` for everything left out.
    """

    path: Path
    layout: str
    users: tuple[UserData, ...]
    skipped: tuple[tuple[str, str], ...]

    def example_counts(self) -> list[int]:
        """Examples (train + held out) of each eligible user, in federation order."""
        return [len(u.train) + len(u.test) for u in self.users]

    def describe(self, *, joined: int | None = None) -> list[str]:
        """Lines for a person starting a run: how much data users have, who was skipped."""
        counts = sorted(self.example_counts())
        lines = [
            f"corpus {self.path} ({self.layout}): {len(self.users)} users"
            + (f", {joined} join the federation" if joined is not None else "")
            + f"; examples per user {quantile_line(counts)}"
        ]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)}:")
            lines += [f"  {who}: {why}" for who, why in self.skipped[:SHOWN_SKIPS]]
            if len(self.skipped) > SHOWN_SKIPS:
                reasons = _reason_counts(self.skipped[SHOWN_SKIPS:])
                lines.append(
                    f"  … and {len(self.skipped) - SHOWN_SKIPS} more ("
                    + ", ".join(f"{n} {why}" for why, n in reasons)
                    + ")"
                )
        return lines

    def to_json(self) -> dict[str, Any]:
        """The corpus's users and skips, for the run folder's ``corpus.json``."""
        return {
            "path": str(self.path),
            "layout": self.layout,
            "users": [
                {"user": u.user, "id": u.role, "examples": len(u.train) + len(u.test)}
                for u in self.users
            ],
            "skipped": [{"user": who, "why": why} for who, why in self.skipped],
        }


def quantile_line(counts: list[int]) -> str:
    """``min / q1 / median / q3 / max`` of ``counts`` as one short string."""
    if not counts:
        return "none"
    if len(counts) == 1:
        return f"{counts[0]} (one user)"
    q1, q2, q3 = statistics.quantiles(counts, n=4, method="inclusive")
    return f"min {min(counts)} / q1 {q1:g} / median {q2:g} / q3 {q3:g} / max {max(counts)}"


def _kind(who: str, why: str) -> str:
    """What kind of skip a reason is, for counting them."""
    if "data.min-examples" in why:
        return "below data.min-examples"
    if "held out, fewer than" in why:
        return "too few to hold out"
    if who.startswith("line "):
        return "bad JSONL records"
    return "files that do not import"


def _reason_counts(skipped: tuple[tuple[str, str], ...]) -> list[tuple[str, int]]:
    """The skips counted by kind, most first."""
    kinds: dict[str, int] = {}
    for who, why in skipped:
        kind = _kind(who, why)
        kinds[kind] = kinds.get(kind, 0) + 1
    return sorted(kinds.items(), key=lambda kv: -kv[1])


def safe_user_id(raw: str, taken: set[str]) -> str:
    """A user id usable as a folder name (its device's store), unique among ``taken``."""
    base = _UNSAFE.sub("-", raw).strip(".-")[:MAX_USER_ID_CHARS] or "user"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    taken.add(name)
    return name


def _eligible(n: int, *, min_examples: int, test_fraction: float) -> str | None:
    """Why a user with ``n`` examples cannot join (``None``: it can)."""
    held = held_out_count(n, test_fraction)
    if n - held < min_examples:
        return (
            f"{_examples(n)}: {n - held} to train on after holding out the newest {held}, "
            f"fewer than data.min-examples = {min_examples}"
        )
    if held < 2:
        return f"{_examples(n)}: {held} held out, fewer than the 2 a device needs"
    return None


def _examples(n: int) -> str:
    return f"{n} example" if n == 1 else f"{n} examples"


def _user_data(
    user: str, raw_id: str, pairs: list[Pair], test_fraction: float, files=()
) -> UserData:  # type: ignore[no-untyped-def]
    samples = [Sample(prompt=p, reply=r) for p, r in pairs]
    held = held_out_count(len(samples), test_fraction)
    cut = len(samples) - held
    return UserData(
        user=user,
        play="",
        role=raw_id,
        n_lines=len(samples),
        train=tuple(samples[:cut]),
        test=tuple(samples[cut:]),
        files=tuple(files),
        kind="corpus",
    )


def _signature(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def load_corpus(
    path: str | Path,
    *,
    min_examples: int,
    test_fraction: float,
    seed: int,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Corpus:
    """Read a corpus's users (cached per process; see the module docstring).

    Raises:
        CorpusError: If the path does not exist, holds no user, or no user is eligible.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise CorpusError(f"corpus {root} does not exist")
    root = root.resolve()
    return _load(root, _signature(root), min_examples, test_fraction, seed, max_bytes)


@functools.lru_cache(maxsize=2)
def _load(
    root: Path,
    signature: tuple[int, int],
    min_examples: int,
    test_fraction: float,
    seed: int,
    max_bytes: int,
) -> Corpus:
    del signature  # part of the cache key only: a changed corpus is read again
    if root.is_dir():
        layout = "folder"
        raw_users, skipped = folder_users(root, max_bytes)
        if not raw_users and not skipped:
            raise CorpusError(
                f"corpus {root} holds no user: put one file or sub-folder per user in it "
                "(text/Markdown, chat JSONL, mbox), or pass one JSONL of records with a user id"
            )
    elif root.is_file():
        layout = "jsonl"
        raw_users, skipped = jsonl_users(root)
        if not raw_users and not skipped:
            raise CorpusError(f"corpus {root} is empty: expected one JSON record per line")
    else:
        raise CorpusError(f"corpus {root} is neither a folder nor a file")
    taken: set[str] = set()
    users: list[UserData] = []
    for raw_id in sorted(raw_users):
        pairs, files = raw_users[raw_id]
        why = _eligible(len(pairs), min_examples=min_examples, test_fraction=test_fraction)
        if why is not None:
            skipped.append((raw_id, why))
            continue
        users.append(_user_data(safe_user_id(raw_id, taken), raw_id, pairs, test_fraction, files))
    if not users:
        reasons = ", ".join(f"{n} {why}" for why, n in _reason_counts(tuple(skipped)))
        raise CorpusError(
            f"no user of corpus {root} can join ({len(skipped)} skipped: {reasons}); "
            f"each needs data.min-examples = {min_examples} examples to train on and 2 to hold "
            "out"
        )
    random.Random(seed).shuffle(users)
    return Corpus(path=root, layout=layout, users=tuple(users), skipped=tuple(skipped))


def corpus_of(data: DataConfig, seed: int) -> Corpus:
    """The run's corpus (``data.corpus``), read with its eligibility rules.

    Raises:
        CorpusError: See :func:`load_corpus`.
    """
    return load_corpus(
        data.corpus,
        min_examples=data.min_examples,
        test_fraction=data.test_fraction,
        seed=seed,
    )


def simulation_users(data: DataConfig, *, seed: int, count: int) -> tuple[UserData, ...]:
    """The first ``count`` users of a simulation, in its order: the corpus's
    (``data.corpus``), else the seeded Shakespeare roles. The order is the same for every
    ``count``: users ``count``, ``count + 1``, … are the newcomers after a federation of
    ``count``.

    Raises:
        ValueError: If fewer than ``count`` users are eligible.
    """
    if not data.corpus:
        return select_users(
            count, min_lines=data.min_lines, seed=seed, test_fraction=data.test_fraction
        )
    users = corpus_of(data, seed).users
    if count > len(users):
        raise ValueError(
            f"{count} users requested but corpus {data.corpus} has {len(users)} eligible; "
            "lower data.num-users (or data.min-examples)"
        )
    return users[:count]


def user_for_partition(
    data: DataConfig, *, seed: int, partition_id: int, num_partitions: int
) -> UserData:
    """The user a simulated device with ``partition_id`` plays.

    Raises:
        ValueError: If the partition id is outside ``[0, num_partitions)`` or too few users
            are eligible.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} not in [0, {num_partitions})")
    return simulation_users(data, seed=seed, count=num_partitions)[partition_id]
