"""Make the key material of a fedpersona deployment in one folder: a CA, the SuperLink's TLS
certificate, one authentication key pair per SuperNode, and the SuperExec shared secret (see
:mod:`common.keys`)::

    python scripts/make_certs.py --out certs --nodes 3 --host superlink
"""

import sys

from common.keys import main

if __name__ == "__main__":
    sys.exit(main())
