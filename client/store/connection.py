"""One open SQLCipher connection behind a lock: transactions, queries, small metadata strings,
closing.

The store's parts (:mod:`client.store.blobs`, :mod:`client.store.history`) are mixins over
this; :class:`~client.store.LocalStore` opens the connection and combines them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from client.store.errors import StoreError


class Connection:
    """An open store database. All methods are thread-safe (one connection behind a lock): the
    local API serves requests from a thread pool."""

    def __init__(self, root: Path, conn: Any, *, retention_days: float) -> None:
        self.root = Path(root)
        self._conn = conn
        self._lock = threading.RLock()
        # Blobs of an open batch(): bytes, or a function of the current value (put_blob_with).
        self._pending: dict[str, Any] | None = None
        self.retention_days = retention_days

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

    def __enter__(self) -> Self:
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

    def set_meta(self, key: str, value: str) -> None:
        """Store a small string value."""
        with self.transaction() as cur:
            cur.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        """A value stored with :meth:`set_meta`, or ``default``."""
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else default
