"""Local multi-client simulations: presets and the `fedpersona simulate` driver."""

import common  # noqa: E402,F401  (blocks bitsandbytes until 4-bit is asked for)
