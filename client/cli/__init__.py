"""``fedpersona device …``: the user's side of the device, one module per command group — the
store (:mod:`client.cli.store`), the assistant (:mod:`client.cli.assistant`), the privacy policy
(:mod:`client.cli.privacy`) and the federation worker (:mod:`client.cli.federation`), all on
the one ``device`` app of :mod:`client.cli.options`.

Every command works on one device data dir (``--data-dir`` or ``$FEDPERSONA_DATA_DIR``) and
unlocks its encrypted store with ``--key-file`` or a passphrase (``$FEDPERSONA_PASSPHRASE``, or
typed when asked). Nothing here talks to any server; ``serve`` binds 127.0.0.1 only.
"""

from client.cli import assistant, federation, privacy, store  # noqa: F401  (they register)
from client.cli.options import app

__all__ = ["app"]
