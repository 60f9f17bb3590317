"""The user's history in the store: interactions (with their embeddings), feedback on them,
the user's own examples (imported writing, a simulated device's replayed role), and the
retention window over all three.

Text is passed through :func:`common.pii.scrub` here, on the way in — the one place stored text
is scrubbed: no caller can store raw PII.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from client.store.connection import Connection
from common.pii import scrub

logger = logging.getLogger(__name__)

DAY = 86_400.0
EXAMPLES_SCHEMA = 3  # the schema version that added the examples table
FEEDBACK_KINDS = ("rating", "preferred", "edit", "reject")


@dataclass
class Interaction:
    """One exchange between the user and the assistant (text already scrubbed)."""

    id: int
    ts: float
    prompt: str
    response: str
    context: dict[str, Any] = field(default_factory=dict)
    embedding: np.ndarray | None = None
    variant: str | None = None


@dataclass
class StoredExample:
    """One example of the user's own writing: a request and the user's reply (scrubbed)."""

    id: int
    ts: float
    source: str
    prompt: str
    reply: str


@dataclass
class Feedback:
    """One piece of explicit feedback on an interaction."""

    id: int
    ts: float
    interaction_id: int | None
    kind: str
    value: float | None
    text: str | None


def _float_blob(vec: np.ndarray | None) -> bytes | None:
    return None if vec is None else np.asarray(vec, dtype=np.float32).tobytes()


class History(Connection):
    """Interactions, feedback, examples and retention of a :class:`~client.store.LocalStore`."""

    # ---- interactions and feedback -------------------------------------------------------

    def add_interaction(
        self,
        prompt: str,
        response: str,
        *,
        context: dict[str, Any] | None = None,
        embedding: np.ndarray | None = None,
        variant: str | None = None,
        ts: float | None = None,
    ) -> int:
        """Store one exchange, PII-scrubbed; return its id."""
        with self.transaction() as cur:
            cur.execute(
                "INSERT INTO interactions(ts, prompt, response, context, embedding, variant) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    time.time() if ts is None else ts,
                    scrub(prompt),
                    scrub(response),
                    json.dumps(context or {}),
                    _float_blob(embedding),
                    variant,
                ),
            )
            return int(cur.lastrowid)

    def update_response(self, interaction_id: int, response: str) -> None:
        """Replace an interaction's response (the user edited it), scrubbed."""
        with self.transaction() as cur:
            cur.execute(
                "UPDATE interactions SET response = ? WHERE id = ?",
                (scrub(response), interaction_id),
            )

    def get_interaction(self, interaction_id: int) -> Interaction | None:
        """One interaction by id, or ``None`` (also when purged)."""
        rows = self._query(
            "SELECT id, ts, prompt, response, context, embedding, variant FROM interactions "
            "WHERE id = ?",
            (interaction_id,),
        )
        return self._interaction(rows[0]) if rows else None

    def interactions(self, *, limit: int | None = None, since: float = 0.0) -> list[Interaction]:
        """Interactions newest first."""
        rows = self._query(
            "SELECT id, ts, prompt, response, context, embedding, variant FROM interactions "
            "WHERE ts >= ? ORDER BY ts DESC, id DESC LIMIT ?",
            (since, -1 if limit is None else limit),
        )
        return [self._interaction(r) for r in rows]

    @staticmethod
    def _interaction(row: tuple) -> Interaction:
        emb = None if row[5] is None else np.frombuffer(row[5], dtype=np.float32).copy()
        return Interaction(row[0], row[1], row[2], row[3], json.loads(row[4]), emb, row[6])

    def count_interactions(self) -> int:
        """Number of stored interactions."""
        return int(self._query("SELECT count(*) FROM interactions")[0][0])

    def add_feedback(
        self,
        interaction_id: int | None,
        kind: str,
        *,
        value: float | None = None,
        text: str | None = None,
        ts: float | None = None,
    ) -> int:
        """Store feedback on an interaction (``kind`` in :data:`FEEDBACK_KINDS`); return its id.

        Raises:
            ValueError: Unknown kind, or no such interaction.
        """
        if kind not in FEEDBACK_KINDS:
            raise ValueError(f"feedback kind must be one of {FEEDBACK_KINDS}, got {kind!r}")
        with self.transaction() as cur:
            if interaction_id is not None:
                found = cur.execute(
                    "SELECT 1 FROM interactions WHERE id = ?", (interaction_id,)
                ).fetchone()
                if not found:
                    raise ValueError(f"no interaction {interaction_id} (purged or never stored)")
            cur.execute(
                "INSERT INTO feedback(ts, interaction_id, kind, value, text) VALUES (?,?,?,?,?)",
                (
                    time.time() if ts is None else ts,
                    interaction_id,
                    kind,
                    value,
                    None if text is None else scrub(text),
                ),
            )
            return int(cur.lastrowid)

    def feedback(self, *, interaction_id: int | None = None) -> list[Feedback]:
        """Feedback, oldest first (all, or for one interaction)."""
        sql = "SELECT id, ts, interaction_id, kind, value, text FROM feedback"
        args: tuple = ()
        if interaction_id is not None:
            sql += " WHERE interaction_id = ?"
            args = (interaction_id,)
        return [Feedback(*r) for r in self._query(sql + " ORDER BY id", args)]

    def rated_variants(self, *, after_feedback_id: int = 0) -> list[tuple[int, str, float]]:
        """``(feedback id, variant, rating)`` of rated interactions that recorded a variant."""
        return [
            (int(r[0]), str(r[1]), float(r[2]))
            for r in self._query(
                "SELECT f.id, i.variant, f.value FROM feedback f JOIN interactions i "
                "ON f.interaction_id = i.id WHERE f.kind = 'rating' AND f.value IS NOT NULL "
                "AND i.variant IS NOT NULL AND f.id > ? ORDER BY f.id",
                (after_feedback_id,),
            )
        ]

    # ---- the user's own examples ---------------------------------------------------------

    def add_examples(
        self, pairs: list[tuple[str, str]], *, source: str, ts: float | None = None
    ) -> int:
        """Store ``(request, reply)`` pairs, PII-scrubbed, in one transaction; return how many.

        They keep their order: the i-th pair is stamped ``ts + i`` microseconds, so the newest
        examples (a device's held-out slice) are the last ones given.

        Raises:
            ValueError: An empty source, or a pair whose reply is empty (nothing is stored).
        """
        return self.add_example_batches([(source, pairs)], ts=ts)

    def add_example_batches(
        self, batches: list[tuple[str, list[tuple[str, str]]]], *, ts: float | None = None
    ) -> int:
        """:meth:`add_examples` for several ``(source, pairs)`` batches in one transaction."""
        start = time.time() if ts is None else ts
        rows = []
        for source, pairs in batches:
            if not source:
                raise ValueError("an example needs a source (e.g. 'import:text')")
            for prompt, reply in pairs:
                if not reply.strip():
                    raise ValueError(f"example {len(rows)} has an empty reply")
                rows.append((start + len(rows) * 1e-6, source, scrub(prompt), scrub(reply)))
        with self.transaction() as cur:
            cur.executemany(
                "INSERT INTO examples(ts, source, prompt, reply) VALUES (?, ?, ?, ?)", rows
            )
        return len(rows)

    def examples(self) -> list[StoredExample]:
        """Every stored example, oldest first."""
        return [
            StoredExample(int(r[0]), float(r[1]), str(r[2]), str(r[3]), str(r[4]))
            for r in self._query(
                "SELECT id, ts, source, prompt, reply FROM examples ORDER BY ts, id"
            )
        ]

    def example_counts(self) -> dict[str, int]:
        """Number of stored examples per source."""
        return {
            str(s): int(n)
            for s, n in self._query("SELECT source, count(*) FROM examples GROUP BY source")
        }

    def delete_examples(self, *, source: str) -> int:
        """Delete every example from ``source``; return how many."""
        with self.transaction() as cur:
            cur.execute("DELETE FROM examples WHERE source = ?", (source,))
            return int(cur.rowcount)

    # ---- retention ---------------------------------------------------------------------

    def purge_expired(self, *, now: float | None = None) -> int:
        """Delete interactions and examples older than the retention window (feedback
        cascades); return how many interactions and examples went."""
        now = time.time() if now is None else now
        cutoff = now - self.retention_days * DAY
        with self.transaction() as cur:
            cur.execute("DELETE FROM interactions WHERE ts < ?", (cutoff,))
            removed = cur.rowcount
            if self.schema_version >= EXAMPLES_SCHEMA:  # an older schema (tests) has none
                cur.execute("DELETE FROM examples WHERE ts < ?", (cutoff,))
                removed += cur.rowcount
            cur.execute("DELETE FROM feedback WHERE ts < ?", (cutoff,))
            cur.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('last_purge', ?)", (str(now),)
            )
        removed += self._purge_chats(cutoff)
        if removed:
            logger.info(
                "retention: purged %d interaction(s) and example(s) older than %g days",
                removed,
                self.retention_days,
            )
        return int(removed)

    def _purge_chats(self, cutoff: float) -> int:
        """Drop the web app's chat turns older than ``cutoff`` (:mod:`client.store.chats`);
        return how many went."""
        from client.store.chats import CHATS_BLOB, without_older

        chats = self.get_json(CHATS_BLOB)  # type: ignore[attr-defined]
        if not isinstance(chats, dict):
            return 0
        kept, removed = without_older(chats, cutoff)
        if kept != chats:
            self.put_json(CHATS_BLOB, kept)  # type: ignore[attr-defined]
        return removed

    def maybe_purge(self, *, now: float | None = None) -> int:
        """:meth:`purge_expired` if the last purge is more than a day old."""
        now = time.time() if now is None else now
        last = float(self.get_meta("last_purge", "0") or 0)
        return self.purge_expired(now=now) if now - last >= DAY else 0
