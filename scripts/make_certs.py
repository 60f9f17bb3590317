"""Make the key material of a fedpersona deployment in one folder: a CA, the SuperLink's TLS
certificate, one authentication key pair per SuperNode, and the SuperExec shared secret (see
:mod:`common.keys`)::

    python scripts/make_certs.py --out certs --nodes 3 --host superlink

Needs only ``cryptography``: it runs from a checkout whether or not the project is installed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.keys import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
