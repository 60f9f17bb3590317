"""The device store: everything a device knows about its user, in one encrypted SQLCipher
database (see :mod:`client.store.local_store` for the files and guarantees).

``LocalStore`` is the open store; its parts live beside it by what they hold: the connection
and its metadata strings (``connection.py``), blobs and the profile (``blobs.py``), the user's
history —
interactions, feedback, examples, retention — (``history.py``), and opening, keys,
migrations, export and forgetting (``local_store.py``).
"""

from client.store.errors import StoreCorrupted, StoreError, StoreNotFound
from client.store.history import (
    DAY,
    FEEDBACK_KINDS,
    Feedback,
    Interaction,
    StoredExample,
)
from client.store.local_store import (
    API_TOKEN,
    DB_FILE,
    DEFAULT_RETENTION_DAYS,
    FEDERATION_FILES,
    KEY_FILE,
    MIGRATIONS,
    NODE_KEY_FILE,
    SCHEMA_VERSION,
    LocalStore,
    key_beside,
    open_beside_key,
)

__all__ = [
    "API_TOKEN",
    "DAY",
    "DB_FILE",
    "DEFAULT_RETENTION_DAYS",
    "FEDERATION_FILES",
    "FEEDBACK_KINDS",
    "KEY_FILE",
    "MIGRATIONS",
    "NODE_KEY_FILE",
    "SCHEMA_VERSION",
    "Feedback",
    "Interaction",
    "LocalStore",
    "StoreCorrupted",
    "StoreError",
    "StoreNotFound",
    "StoredExample",
    "key_beside",
    "open_beside_key",
]
