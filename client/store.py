"""LocalStore: everything a device knows about its user, in one encrypted SQLCipher database.

The data dir holds two files (plus SQLite's ``-wal``/``-shm`` while open, also encrypted):

``store.db``
    SQLCipher 4 database — every page AES-256 encrypted and HMAC-SHA512 authenticated, schema
    and metadata included. Holds the profile, interactions (with their 384-d embeddings),
    feedback, and named blobs: the personal adapter, the latest global shared tensors, the
    device record and the privacy ledger.
``store.key``
    The database's random data key, wrapped with AES-GCM under the passphrase (scrypt) or a
    key file (see :mod:`common.crypto`).

Guarantees:

* **Tamper-evident.** A wrong passphrase, a flipped byte anywhere in the database or in the
  wrapped key raises :class:`StoreCorrupted` / :class:`~common.crypto.WrongKey` on open
  (``PRAGMA cipher_integrity_check`` checks every page's HMAC), never silently accepted.
* **Transactional.** WAL journal with ``synchronous=FULL``: a process killed mid-write keeps
  every committed transaction.
* **Scrubbed.** Text is passed through :func:`common.pii.scrub` inside
  :meth:`LocalStore.add_interaction` / :meth:`LocalStore.add_feedback`: no caller can store
  raw PII.
* **Retention.** Interactions (and their feedback) older than ``retention_days`` are purged on
  open and at most daily after that (:meth:`LocalStore.maybe_purge`).
* **Forget.** :meth:`LocalStore.forget` shreds the wrapped key first (crypto-erase: the
  database is unreadable from then on), then deletes the database files.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sqlcipher3

from common.crypto import (
    Secret,
    shred,
    unwrap_data_key,
    wrap_new_data_key,
    write_wrapped_key,
)
from common.pii import scrub

logger = logging.getLogger(__name__)

DB_FILE = "store.db"
KEY_FILE = "store.key"
DEFAULT_RETENTION_DAYS = 28.0
DAY = 86_400.0

# Each entry migrates the schema from version i to i + 1 (``PRAGMA user_version``).
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE profile(id INTEGER PRIMARY KEY CHECK (id = 1), data TEXT NOT NULL,
                         updated REAL NOT NULL);
    CREATE TABLE interactions(id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL,
                              prompt TEXT NOT NULL, response TEXT NOT NULL,
                              context TEXT NOT NULL DEFAULT '{}', embedding BLOB,
                              variant TEXT);
    CREATE TABLE feedback(id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL,
                          interaction_id INTEGER REFERENCES interactions(id) ON DELETE CASCADE,
                          kind TEXT NOT NULL, value REAL, text TEXT);
    CREATE TABLE blobs(name TEXT PRIMARY KEY, data BLOB NOT NULL, updated REAL NOT NULL);
    """,
    # v2: retention purges by time and feedback is read per interaction; index both.
    """
    CREATE INDEX interactions_ts ON interactions(ts);
    CREATE INDEX feedback_interaction ON feedback(interaction_id);
    """,
    # v3: the user's own examples (imported writing; a simulated device's replayed role), the
    # training data of federated rounds together with the endorsed interactions.
    """
    CREATE TABLE examples(id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL,
                          source TEXT NOT NULL, prompt TEXT NOT NULL, reply TEXT NOT NULL);
    CREATE INDEX examples_ts ON examples(ts);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
EXAMPLES_SCHEMA = 3
FEEDBACK_KINDS = ("rating", "preferred", "edit", "reject")


class StoreError(Exception):
    """The device store cannot be used as asked."""


class StoreCorrupted(StoreError):
    """The database failed its integrity check (tampering, or a damaged disk)."""


class StoreNotFound(StoreError):
    """There is no store in this data dir (never created, or forgotten)."""


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


class LocalStore:
    """An open device store. Use :meth:`create` / :meth:`open`; close it (or use ``with``).

    All methods are thread-safe (one connection behind a lock): the local API serves requests
    from a thread pool.
    """

    def __init__(self, root: Path, conn: Any, *, retention_days: float) -> None:
        self.root = Path(root)
        self._conn = conn
        self._lock = threading.RLock()
        self._pending: dict[str, bytes] | None = None  # blobs of an open batch()
        self.retention_days = retention_days

    # ---- opening -------------------------------------------------------------------------

    @staticmethod
    def exists(root: Path) -> bool:
        """Whether ``root`` holds a store (database and wrapped key)."""
        return (Path(root) / DB_FILE).exists() and (Path(root) / KEY_FILE).exists()

    @classmethod
    def create(
        cls,
        root: Path,
        secret: Secret,
        *,
        retention_days: float = DEFAULT_RETENTION_DAYS,
        migrations: tuple[str, ...] = MIGRATIONS,
    ) -> LocalStore:
        """Create a new, empty store in ``root``.

        Raises:
            StoreError: If a store already exists there.
        """
        root = Path(root)
        if (root / DB_FILE).exists() or (root / KEY_FILE).exists():
            raise StoreError(f"a device store already exists in {root}; open it or forget it")
        root.mkdir(parents=True, exist_ok=True)
        data_key = wrap_new_data_key(root / KEY_FILE, secret)
        store = cls._connect(
            root, data_key, retention_days=retention_days, migrations=migrations, new=True
        )
        store.set_meta("created", str(time.time()))
        return store

    @classmethod
    def open(
        cls,
        root: Path,
        secret: Secret,
        *,
        create: bool = False,
        retention_days: float = DEFAULT_RETENTION_DAYS,
        migrations: tuple[str, ...] = MIGRATIONS,
    ) -> LocalStore:
        """Unlock, verify, migrate and purge the store in ``root``.

        Args:
            root: The device's data dir.
            secret: Passphrase or key file.
            create: Create the store if there is none.
            retention_days: Interactions older than this are deleted.
            migrations: Schema migrations to apply (tests pass a prefix to build old stores).

        Raises:
            StoreNotFound: No store and ``create`` is false.
            WrongKey: Wrong passphrase/key file, or the wrapped key was altered (absurd scrypt
                parameters included, refused before any key derivation).
            StoreCorrupted: The database is missing or empty beside its key, or failed its
                integrity check.
        """
        root = Path(root)
        if not (root / KEY_FILE).exists():
            if (root / DB_FILE).exists():
                raise StoreCorrupted(
                    f"{root / DB_FILE} exists but its wrapped key {KEY_FILE} is missing; the "
                    "store was forgotten or the key file was deleted — restore it from a backup"
                )
            if create:
                return cls.create(
                    root, secret, retention_days=retention_days, migrations=migrations
                )
            raise StoreNotFound(f"no device store in {root}; run `fedpersona device init`")
        data_key = unwrap_data_key(root / KEY_FILE, secret)
        return cls._connect(root, data_key, retention_days=retention_days, migrations=migrations)

    @classmethod
    def _connect(
        cls,
        root: Path,
        data_key: bytes,
        *,
        retention_days: float,
        migrations: tuple[str, ...],
        new: bool = False,
    ) -> LocalStore:
        path = root / DB_FILE
        # SQLite would silently start an empty database in place of a deleted one.
        if not new and not path.exists():
            raise StoreCorrupted(
                f"{path} is missing but its wrapped key {KEY_FILE} is there; restore the "
                "database from a backup or run `fedpersona device forget`"
            )
        conn = sqlcipher3.connect(str(path), check_same_thread=False, isolation_level=None)
        try:
            conn.execute("PRAGMA cipher_log_level = NONE")
            conn.execute(f"PRAGMA key = \"x'{data_key.hex()}'\"")
            try:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
                problems = conn.execute("PRAGMA cipher_integrity_check").fetchall()
            except sqlcipher3.DatabaseError as err:
                raise StoreCorrupted(
                    f"{path} cannot be decrypted ({err}): it was altered or damaged; restore "
                    "it from a backup or run `fedpersona device forget`"
                ) from None
            if problems:
                raise StoreCorrupted(
                    f"{path} failed its integrity check ({len(problems)} bad page(s), first: "
                    f"{problems[0][0]}); it was altered or damaged — restore it from a backup"
                )
            # An emptied or truncated-to-nothing file reads as a fresh database (schema v0);
            # every store this code wrote is at v1 or later.
            if not new and int(conn.execute("PRAGMA user_version").fetchone()[0]) == 0:
                raise StoreCorrupted(
                    f"{path} is empty or holds no device store (schema v0): it was altered or "
                    "damaged; restore it from a backup or run `fedpersona device forget`"
                )
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA busy_timeout = 10000")
            store = cls(root, conn, retention_days=retention_days)
            store._migrate(migrations)
        except BaseException:
            conn.close()
            raise
        path.chmod(0o600)
        store.purge_expired()
        return store

    def _migrate(self, migrations: tuple[str, ...]) -> None:
        version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
        if version > len(MIGRATIONS):
            raise StoreError(
                f"store schema v{version} is newer than this fedpersona (v{SCHEMA_VERSION}); "
                "upgrade fedpersona"
            )
        for target in range(version + 1, len(migrations) + 1):
            with self.transaction() as cur:
                for statement in migrations[target - 1].split(";"):
                    if statement.strip():
                        cur.execute(statement)
                cur.execute(f"PRAGMA user_version = {target}")
            logger.info("device store %s migrated to schema v%d", self.root, target)

    @property
    def schema_version(self) -> int:
        """The database's schema version."""
        with self._lock:
            return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        """Checkpoint the WAL and close the connection."""
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                finally:
                    self._conn.close()
                    self._conn = None

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A cursor inside ``BEGIN IMMEDIATE … COMMIT`` (rolled back on any exception)."""
        with self._lock:
            if self._conn is None:
                raise StoreError("the device store is closed")
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            if self._conn is None:
                raise StoreError("the device store is closed")
            return self._conn.execute(sql, args).fetchall()

    def change_secret(self, current: Secret, new: Secret) -> None:
        """Re-wrap the data key under a new passphrase or key file."""
        data_key = unwrap_data_key(self.root / KEY_FILE, current)
        write_wrapped_key(self.root / KEY_FILE, new, data_key)

    # ---- key/value and blobs -------------------------------------------------------------

    def set_meta(self, key: str, value: str) -> None:
        """Store a small string value."""
        with self.transaction() as cur:
            cur.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        """A value stored with :meth:`set_meta`, or ``default``."""
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else default

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group the blob writes made inside into one transaction: all of them land, or (on
        an exception or a crash) none. Reads inside see the blobs as they were before."""
        with self._lock:
            if self._pending is not None:
                raise StoreError("batches do not nest")
            self._pending = {}
            try:
                yield
                pending = self._pending
            finally:
                self._pending = None
            with self.transaction() as cur:
                now = time.time()
                for name, data in pending.items():
                    cur.execute(
                        "INSERT OR REPLACE INTO blobs(name, data, updated) VALUES (?, ?, ?)",
                        (name, data, now),
                    )

    def put_blob(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name`` (replacing it) in one transaction (or in the open
        :meth:`batch`)."""
        with self._lock:
            if self._pending is not None:
                self._pending[name] = bytes(data)
                return
        with self.transaction() as cur:
            cur.execute(
                "INSERT OR REPLACE INTO blobs(name, data, updated) VALUES (?, ?, ?)",
                (name, bytes(data), time.time()),
            )

    def get_blob(self, name: str) -> bytes | None:
        """The blob stored under ``name``, or ``None``."""
        rows = self._query("SELECT data FROM blobs WHERE name = ?", (name,))
        return bytes(rows[0][0]) if rows else None

    def put_json(self, name: str, obj: Any) -> None:
        """Store a JSON-serializable object as a blob."""
        self.put_blob(name, json.dumps(obj).encode())

    def get_json(self, name: str) -> Any | None:
        """A JSON blob, or ``None``.

        Raises:
            StoreCorrupted: If the blob is not valid JSON (bad UTF-8 and runaway nesting
                included).
        """
        data = self.get_blob(name)
        if data is None:
            return None
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError
            raise StoreCorrupted(f"blob {name!r} in {self.root} is not valid JSON: {err}") from None

    def blob_sizes(self) -> dict[str, int]:
        """Bytes per stored blob."""
        return dict(self._query("SELECT name, length(data) FROM blobs ORDER BY name"))

    # ---- profile -------------------------------------------------------------------------

    def get_profile(self) -> dict[str, Any] | None:
        """The stored profile (a plain dict), or ``None``."""
        rows = self._query("SELECT data FROM profile WHERE id = 1")
        return json.loads(rows[0][0]) if rows else None

    def put_profile(self, data: dict[str, Any]) -> None:
        """Replace the profile."""
        with self.transaction() as cur:
            cur.execute(
                "INSERT OR REPLACE INTO profile(id, data, updated) VALUES (1, ?, ?)",
                (json.dumps(data), time.time()),
            )

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

    # ---- retention, export, forget -------------------------------------------------------

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
        if removed:
            logger.info(
                "retention: purged %d interaction(s) and example(s) older than %g days",
                removed,
                self.retention_days,
            )
        return int(removed)

    def maybe_purge(self, *, now: float | None = None) -> int:
        """:meth:`purge_expired` if the last purge is more than a day old."""
        now = time.time() if now is None else now
        last = float(self.get_meta("last_purge", "0") or 0)
        return self.purge_expired(now=now) if now - last >= DAY else 0

    EXPORT_KEYS = frozenset(
        {"schema_version", "meta", "profile", "interactions", "feedback", "examples", "blobs"}
    )

    @classmethod
    def is_export(cls, path: Path) -> bool:
        """Whether ``path`` is a file :meth:`export` wrote (so a new export may replace it)."""
        path = Path(path)
        try:
            if path.is_symlink() or not path.is_file() or path.stat().st_size > 1 << 30:
                return False
            data = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and set(data) == cls.EXPORT_KEYS

    def export(self) -> dict[str, Any]:
        """Everything in the store as plain JSON (embeddings and tensors summarized)."""
        blobs = {}
        for name, size in self.blob_sizes().items():
            data = self.get_blob(name) or b""
            try:
                blobs[name] = json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError):
                blobs[name] = {"binary_bytes": size}
        return {
            "schema_version": self.schema_version,
            "meta": {k: v for k, v in self._query("SELECT key, value FROM meta")},
            "profile": self.get_profile(),
            "interactions": [
                {
                    "id": i.id,
                    "ts": i.ts,
                    "prompt": i.prompt,
                    "response": i.response,
                    "context": i.context,
                    "variant": i.variant,
                    "embedding_dim": None if i.embedding is None else int(i.embedding.size),
                }
                for i in reversed(self.interactions())
            ],
            "feedback": [vars(f) for f in self.feedback()],
            "examples": [vars(e) for e in self.examples()],
            "blobs": blobs,
        }

    def size_bytes(self) -> int:
        """Bytes on disk of the database (after a WAL checkpoint) and the wrapped key."""
        with self._lock:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return sum(
            p.stat().st_size for p in self.root.iterdir() if p.name.startswith((DB_FILE, KEY_FILE))
        )

    @staticmethod
    def forget(root: Path) -> list[str]:
        """Crypto-erase and delete the store in ``root``; return the names removed.

        The wrapped key is shredded first, so the data is unrecoverable even if deleting the
        database files fails afterwards.
        """
        root = Path(root)
        removed = []
        key = root / KEY_FILE
        if key.exists():
            shred(key)
            removed.append(KEY_FILE)
        for suffix in ("", "-wal", "-shm", "-journal"):
            path = root / f"{DB_FILE}{suffix}"
            if path.exists():
                shred(path)
                removed.append(path.name)
        return removed
