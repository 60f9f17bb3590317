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
* **Scrubbed.** Text is passed through :func:`common.pii.scrub` where the history is written
  (:mod:`client.store.history`: interactions, feedback, examples): no caller can store raw PII.
* **Retention.** Interactions (and their feedback) and examples older than ``retention_days``
  are purged on open and at most daily after that (:meth:`LocalStore.maybe_purge`).
* **Forget.** :meth:`LocalStore.forget` shreds the wrapped key first (crypto-erase: the
  database is unreadable from then on), then deletes the database files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import sqlcipher3

from client.store.blobs import Blobs
from client.store.errors import StoreCorrupted, StoreError, StoreNotFound
from client.store.history import History
from common.crypto import (
    Secret,
    create_key_file,
    shred,
    unwrap_data_key,
    wrap_new_data_key,
    write_wrapped_key,
)

logger = logging.getLogger(__name__)

DB_FILE = "store.db"
KEY_FILE = "store.key"
# What `fedpersona device join` keeps beside the store (client/federation/join.py): the
# device's SuperNode key pair, its log, lock and state, and Flower's own folder. Forgetting
# the store removes them too (the private key shredded).
NODE_KEY_FILE = "node.key"
FEDERATION_FILES = (
    NODE_KEY_FILE,
    f"{NODE_KEY_FILE}.pub",
    "join.log",
    "join.lock",
    "federation.json",
)
FEDERATION_DIRS = ("flwr",)
DEFAULT_RETENTION_DAYS = 28.0
# The local API's bearer token (metadata): a credential, never in an export.
API_TOKEN = "api_token"
SECRET_META = frozenset({API_TOKEN})

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


def key_beside(data_dir: Path | str, *, create: bool = False) -> Path:
    """The key file a simulated or test device keeps beside its data dir, ``<data_dir>.key``
    (0600; made when ``create`` and missing). A real device keeps its key elsewhere."""
    key = Path(data_dir).with_name(Path(data_dir).name + ".key")
    if create and not key.exists():
        create_key_file(key)
    return key


def open_beside_key(data_dir: Path | str, **kwargs: Any) -> LocalStore:
    """:meth:`LocalStore.open` with the key file beside the data dir (:func:`key_beside`; made
    with the store when ``create``)."""
    key = key_beside(data_dir, create=bool(kwargs.get("create")))
    return LocalStore.open(Path(data_dir), Secret(key_file=key), **kwargs)


def _make_private(root: Path) -> None:
    """The store's own folder: 0700, nobody else lists or enters it. A folder this process
    does not own (a mount point given to it) keeps its mode, with a warning."""
    try:
        root.chmod(0o700)
    except PermissionError:
        logger.warning("cannot make %s private (0700): it is not this user's folder", root)


class LocalStore(History, Blobs):
    """An open device store. Use :meth:`create` / :meth:`open`; close it (or use ``with``).

    Its parts: the connection (:mod:`client.store.connection`), metadata, blobs and the
    profile (:mod:`client.store.blobs`), the user's history (:mod:`client.store.history`); this
    module opens, verifies, migrates, exports and forgets it.
    """

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
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        _make_private(root)
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
        shred(root / f"{KEY_FILE}.old")  # left by a passphrase change that was interrupted
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
        if root.stat().st_mode & 0o077:  # a store made before 0700 folders, or loosened
            _make_private(root)
        # Files SQLite creates (the database, -wal, -shm) are 0600 from their first moment:
        # the umask is tightened while the connection opens and switches to WAL. (The umask is
        # per process: a file another thread creates meanwhile is only made more private.)
        saved_umask = os.umask(0o077)
        try:
            conn = sqlcipher3.connect(str(path), check_same_thread=False, isolation_level=None)
        except BaseException:
            os.umask(saved_umask)
            raise
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
        finally:
            os.umask(saved_umask)
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

    def change_secret(self, current: Secret, new: Secret) -> None:
        """Re-wrap the data key under a new passphrase or key file; the file that held it
        under the old secret is shredded (its inode kept aside by a hard link while the new
        one is written atomically), so the old passphrase unlocks nothing left behind."""
        key = self.root / KEY_FILE
        data_key = unwrap_data_key(key, current)
        old = self.root / f"{KEY_FILE}.old"
        shred(old)  # a previous change interrupted before its shred
        os.link(key, old)
        write_wrapped_key(key, new, data_key)
        shred(old)

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
        """Everything in the store as plain JSON (embeddings and tensors summarized) — but the
        credentials in :data:`SECRET_META` (an export outlives ``forget``; a token in it would
        open a later store's API to whoever holds the file)."""
        blobs = {}
        for name, size in self.blob_sizes().items():
            data = self.get_blob(name) or b""
            try:
                blobs[name] = json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError):
                blobs[name] = {"binary_bytes": size}
        return {
            "schema_version": self.schema_version,
            "meta": {
                k: v for k, v in self._query("SELECT key, value FROM meta") if k not in SECRET_META
            },
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
        names = [KEY_FILE, f"{KEY_FILE}.old"]
        names += [f"{DB_FILE}{suffix}" for suffix in ("", "-wal", "-shm", "-journal")]
        for name in [*names, *FEDERATION_FILES]:  # the wrapped key first; links never followed
            path = root / name
            if os.path.lexists(path):
                shred(path)
                removed.append(name)
        for name in FEDERATION_DIRS:
            path = root / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(f"{name}/")
        return removed
