"""What this CPU computes natively: the one place that answers "is bf16 fast here?".

bf16 is worth using on a CPU only where the hardware computes bf16 dot products: x86-64 with
``avx512_bf16`` or ``amx_bf16`` (Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and
later), aarch64 with the ``bf16`` feature (Armv8.6: Graviton 3, Neoverse V1/N2, Apple M2).
Elsewhere torch emulates it — on an AVX2-only CPU a bf16 matmul is ~40× slower than fp32's —
so training, serving and the benchmarks stay in fp32 there and say so.

Every caller asks :func:`cpu_has_native_bf16`; ``$FEDPERSONA_CPU_BF16`` (``native`` or
``emulated``) overrides what ``/proc/cpuinfo`` says, e.g. to run a bf16-capable machine as an
AVX2-only one would.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

CPU_BF16_ENV = "FEDPERSONA_CPU_BF16"
CPU_BF16_CHOICES = ("native", "emulated")
# The /proc/cpuinfo flags (x86: "flags", aarch64: "Features") that mean hardware bf16 dot
# products.
X86_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
ARM_BF16_FEATURES = frozenset({"bf16"})
EMULATED_NOTE = "bf16: emulated on this CPU, not measured"


def native_bf16_in(cpuinfo: str) -> bool:
    """Whether a ``/proc/cpuinfo`` text lists a hardware bf16 dot product on any core.

    x86 lists its flags on ``flags`` lines, aarch64 on ``Features`` lines.
    """
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & (X86_BF16_FLAGS | ARM_BF16_FEATURES))


def _override() -> bool | None:
    value = os.environ.get(CPU_BF16_ENV, "").strip().lower()
    if not value:
        return None
    if value not in CPU_BF16_CHOICES:
        raise ValueError(
            f"${CPU_BF16_ENV}={value!r}: expected one of {', '.join(CPU_BF16_CHOICES)} "
            "(or unset it to read /proc/cpuinfo)"
        )
    return value == "native"


@functools.cache
def cpu_has_native_bf16() -> bool:
    """The CPU computes bf16 dot products in hardware (see the module docstring).

    ``$FEDPERSONA_CPU_BF16`` decides when set; else ``/proc/cpuinfo``. A system without one
    (macOS, Windows) counts as emulated: fp32 is the safe choice there.

    Raises:
        ValueError: If ``$FEDPERSONA_CPU_BF16`` is set to something else than ``native`` or
            ``emulated``.
    """
    forced = _override()
    if forced is not None:
        return forced
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return native_bf16_in(text)


def describe_bf16() -> str:
    """One line for logs and benchmark tables: native or emulated, and why."""
    source = f"${CPU_BF16_ENV}" if _override() is not None else "/proc/cpuinfo"
    kind = "native" if cpu_has_native_bf16() else "emulated"
    return f"bf16 on this CPU ({platform.machine() or 'unknown'}): {kind} (from {source})"
