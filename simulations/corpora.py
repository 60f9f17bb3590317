"""Per-user corpora for simulation: real ones, written in the shape ``fedpersona simulate
--corpus`` reads, and how a corpus sizes a run (who joins, who stays a newcomer, m_min).

``chitchat`` — the BYU Chit-Chat Challenge (``chitchat-dataset`` 0.9.0 on PyPI, MIT; installed
by ``scripts/setup.sh``, read offline from the package): 7,168 typed conversations between
people, each message with its sender's id and time. Every participant is a user; a
conversation, seen from one participant, is a chat whose ``user`` turns are the other
person's messages and whose ``assistant`` turns are the participant's own (consecutive
messages of one person joined into one turn), so a user's examples are their replies to what
was said to them. Users' amounts of data are very unequal (a handful of replies for most, over
ten thousand for a few), as in real deployments.

    python -m simulations.corpora chitchat --out runs/corpora/chitchat.jsonl
    fedpersona simulate --preset population --corpus runs/corpora/chitchat.jsonl \
        --set data.num-users=200
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

from common.config import parse_run_config
from common.corpus import Corpus, corpus_of

CHITCHAT = "chitchat-dataset==0.9.0"


def chitchat_path() -> Path:
    """The dataset file inside the installed ``chitchat_dataset`` package.

    Raises:
        FileNotFoundError: If the package is not installed.
    """
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the Chit-Chat corpus needs `pip install --no-deps {CHITCHAT}` "
            "(scripts/setup.sh installs it)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall {CHITCHAT}")
    return path


def _turns(conversation: dict[str, Any]) -> list[tuple[str, str]]:
    """``(sender, text)`` per turn: a turn is one person's consecutive messages, joined."""
    turns: list[tuple[str, str]] = []
    for group in conversation.get("messages") or []:
        for message in group or []:
            sender, text = message.get("sender"), (message.get("text") or "").strip()
            if not sender or not text:
                continue
            if turns and turns[-1][0] == sender:
                turns[-1] = (sender, f"{turns[-1][1]}\n{text}")
            else:
                turns.append((sender, text))
    return turns


def chitchat_records(dataset: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per (conversation, participant): the conversation from that participant's
    side, with its start time; in the corpus's JSONL shape (:mod:`common.corpus`)."""
    records = []
    for conversation in dataset.values():
        turns = _turns(conversation)
        for person in sorted({sender for sender, _ in turns}):
            messages = [
                {"role": "assistant" if sender == person else "user", "content": text}
                for sender, text in turns
            ]
            if not any(m["role"] == "assistant" for m in messages[1:]):
                continue  # the person never answered anyone
            records.append(
                {"user": person, "timestamp": conversation.get("start"), "messages": messages}
            )
    records.sort(key=lambda r: (str(r["timestamp"]), r["user"]))
    return records


def write_chitchat(out: Path) -> int:
    """Write the Chit-Chat corpus as one JSONL at ``out``; returns the number of records."""
    dataset = json.loads(chitchat_path().read_text(encoding="utf-8"))
    records = chitchat_records(dataset)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return len(records)


# At most this share of a corpus's users are kept apart as newcomers (users who never join)
# when a preset measures the released model on them: 1 in 5.
NEWCOMER_SHARE_DIVISOR = 5


def scaled_min_clients(run_config: dict[str, Any], preset_users: int, users: int) -> int:
    """A preset's m_min (``dp.min-clients``) for a federation of ``users`` instead of its own
    ``preset_users``: the same share of the expected cohort, never more than the preset's.

    Only how the noise is split changes: each device adds N(0, (σC)²/m_min), so a smaller
    m_min adds more noise in all, never less (σ, and so ε, are the preset's).
    """
    m_min = int(run_config.get("dp.min-clients") or 0)
    if m_min <= 0 or users >= preset_users:
        return m_min
    q = float(run_config.get("fraction-train", 1.0))
    share = m_min / max(1.0, preset_users * q)
    return max(1, min(m_min, int(users * q * share)))


def corpus_federation(run_config: dict[str, Any], cold_start_users: int) -> tuple[Corpus, int, int]:
    """A corpus run's users: ``(corpus, users who join, newcomers measured after)``.

    The users who join are ``data.num-users`` when set, else all eligible users but the
    newcomers; the newcomers are the preset's count, at most a fifth of the corpus.

    Raises:
        ValueError: If the corpus cannot be read, no user is eligible, or ``data.num-users``
            asks for more users than are eligible.
    """
    cfg = parse_run_config({**run_config, "data.num-users": 1})  # its data rules and seed
    corpus = corpus_of(cfg.data, cfg.seed)
    eligible = len(corpus.users)
    asked = int(run_config.get("data.num-users") or 0)
    if asked > eligible:
        raise ValueError(
            f"data.num-users = {asked}, but corpus {corpus.path} has {eligible} eligible users"
        )
    cold = min(cold_start_users, eligible // NEWCOMER_SHARE_DIVISOR)
    joined = asked or eligible - cold
    cold = min(cold, eligible - joined)
    if joined < 2:
        raise ValueError(
            f"corpus {corpus.path} has {eligible} eligible user(s); a federation needs 2"
        )
    return corpus, joined, cold


CORPORA = {"chitchat": write_chitchat}


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=sorted(CORPORA))
    parser.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    args = parser.parse_args(argv)
    n = CORPORA[args.name](args.out)
    print(f"{args.out}: {n} conversations, one JSON record per (conversation, participant)")


if __name__ == "__main__":
    main()
