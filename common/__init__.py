"""Code shared by the fedpersona ServerApp, ClientApp and simulations.

Importing any fedpersona package blocks ``bitsandbytes`` until a 4-bit base is asked for
(:func:`common.model.enable_bitsandbytes`): installed, it would otherwise be imported by peft
for every LoRA model and warn about CPU kernels on machines where it can never be used.
"""

import sys as _sys

_sys.modules.setdefault("bitsandbytes", None)  # type: ignore[arg-type]
