"""The fedpersona coordinator: Flower ServerApp, strategy and run outputs."""

import common  # noqa: E402,F401  (blocks bitsandbytes until 4-bit is asked for)
