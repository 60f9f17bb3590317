"""The two layouts of a per-user corpus, read into each user's ``(request, reply)`` pairs: a
folder with one file or sub-folder per user, or one JSONL whose records carry a user id
(:mod:`common.corpus` says what a corpus is and who of its users may join)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from common.formats import BadImport, Pair, pairs_from_conversation, read_file

USER_KEYS = ("user", "user_id")
TIME_KEY = "timestamp"


class CorpusError(ValueError):
    """A corpus that cannot be used at all (missing, empty, or no user eligible)."""


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def folder_users(
    root: Path, max_bytes: int
) -> tuple[dict[str, tuple[list[Pair], list[str]]], list[tuple[str, str]]]:
    """Each user's pairs and files in a folder corpus, and the users that failed to read."""
    files: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            found = sorted(p for p in entry.rglob("*") if p.is_file() and not _hidden(p, root))
            files.setdefault(entry.name, []).extend(found)
        elif entry.is_file():
            files.setdefault(entry.stem, []).append(entry)
    users: dict[str, tuple[list[Pair], list[str]]] = {}
    failed: list[tuple[str, str]] = []
    for raw, paths in files.items():
        if not paths:
            failed.append((raw, "a folder with no file in it"))
            continue
        try:
            pairs = [pair for p in paths for pair in read_file(p, max_bytes=max_bytes).pairs]
        except BadImport as err:
            failed.append((raw, str(err).replace(str(root) + "/", "")))
            continue
        users[raw] = (pairs, [str(p) for p in paths])
    return users, failed


def _timestamp(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            stamp = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=datetime.UTC)
        return stamp.timestamp()
    return None


def jsonl_users(
    path: Path,
) -> tuple[dict[str, tuple[list[Pair], list[str]]], list[tuple[str, str]]]:
    """Each user's pairs in a JSONL corpus (records ordered by timestamp, else file order),
    and the records that were skipped."""
    records: dict[str, list[tuple[float, int, list[Pair]]]] = {}
    failed: list[tuple[str, str]] = []
    try:
        handle = path.open("rb")
    except OSError as err:
        raise CorpusError(f"cannot read corpus {path}: {err.strerror or err}") from None
    with handle:
        for n, raw in enumerate(handle, start=1):
            where = f"line {n}"
            if b"\x00" in raw:
                raise CorpusError(f"corpus {path} looks binary (NUL bytes on line {n})")
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as err:
                failed.append((where, f"not UTF-8 (invalid byte at offset {err.start})"))
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                failed.append((where, f"not JSON ({err.msg})"))
                continue
            if not isinstance(record, dict):
                failed.append((where, "not a JSON object"))
                continue
            raw_id = next((record[k] for k in USER_KEYS if k in record), None)
            if not isinstance(raw_id, str | int) or isinstance(raw_id, bool) or str(raw_id) == "":
                failed.append((where, f"no user id (a string {' or '.join(USER_KEYS)})"))
                continue
            try:
                pairs = pairs_from_conversation(record.get("messages"), where)
            except BadImport as err:
                failed.append(
                    (where, str(err).removeprefix(f"{where}: ").removeprefix(f"{where}, "))
                )
                continue
            stamp = _timestamp(record.get(TIME_KEY))
            records.setdefault(str(raw_id), []).append(
                (stamp if stamp is not None else float("-inf"), n, pairs)
            )
    users: dict[str, tuple[list[Pair], list[str]]] = {}
    for raw_id, rows in records.items():
        if any(s != float("-inf") for s, _, _ in rows):  # by time; undated rows first, in order
            rows.sort(key=lambda r: (r[0], r[1]))
        users[raw_id] = ([pair for _, _, pairs in rows for pair in pairs], [])
    return users, failed
