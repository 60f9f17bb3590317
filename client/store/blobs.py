"""The store's named values: blobs (adapters, ledger, device record, JSON documents) and the
profile — each written in one transaction, or several in one
:meth:`Blobs.batch`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from client.store.connection import Connection
from client.store.errors import StoreCorrupted, StoreError


def _current(cur: Any, name: str) -> bytes | None:
    row = cur.execute("SELECT data FROM blobs WHERE name = ?", (name,)).fetchone()
    return None if row is None else bytes(row[0])


class Blobs(Connection):
    """Blobs and the profile of a :class:`~client.store.LocalStore`."""

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
                    if callable(data):  # put_blob_with: computed from what is there now
                        data = data(_current(cur, name))
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

    def put_blob_with(self, name: str, update: Callable[[bytes | None], bytes]) -> None:
        """Replace blob ``name`` by ``update(its current value)``, read and written in one
        write transaction (``BEGIN IMMEDIATE``: no other process or connection writes in
        between) — or at the commit of the open :meth:`batch`. Two writers that each started
        from an older value both land, if ``update`` merges."""
        with self._lock:
            if self._pending is not None:
                self._pending[name] = update
                return
        with self.transaction() as cur:
            cur.execute(
                "INSERT OR REPLACE INTO blobs(name, data, updated) VALUES (?, ?, ?)",
                (name, bytes(update(_current(cur, name))), time.time()),
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
