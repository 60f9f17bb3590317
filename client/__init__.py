"""The fedpersona device side: Flower ClientApp and the device's own state."""

import common  # noqa: E402,F401  (blocks bitsandbytes until 4-bit is asked for)
