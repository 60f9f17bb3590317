"""The one CPU capability check: native or emulated bf16, answered from /proc/cpuinfo's text
or the override, whatever machine the test runs on."""

from __future__ import annotations

import pytest

from common import cpu, serving, train
from tests.conftest import cpu_bf16

AVX2_ONLY = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma bmi2 avx512f_not_really
"""
SAPPHIRE_RAPIDS = """processor\t: 0
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile
"""
AMX_ONLY = "flags\t: avx2 amx_tile amx_bf16 amx_int8\n"
GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp sve i8mm bf16
CPU implementer\t: 0x41
"""
GRAVITON2 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics\n"


@pytest.mark.parametrize(
    ("text", "native"),
    [
        (AVX2_ONLY, False),
        (SAPPHIRE_RAPIDS, True),
        (AMX_ONLY, True),
        (GRAVITON3, True),
        (GRAVITON2, False),
        ("", False),
        # A flag's name inside another word, or a flag on another line, is not the flag.
        ("model name : a bf16 story\nflags : avx2\n", False),
        ("flags : avx2 xavx512_bf16\n", False),
    ],
)
def test_cpuinfo_text_answers_native_or_emulated(text: str, native: bool) -> None:
    assert cpu.native_bf16_in(text) is native


def test_the_check_reads_the_machine_s_cpuinfo_when_not_overridden(monkeypatch) -> None:
    # Prepare: a machine whose /proc/cpuinfo is an AVX2-only CPU's, then a bf16 one's
    monkeypatch.delenv(cpu.CPU_BF16_ENV, raising=False)
    for text, native in ((AVX2_ONLY, False), (GRAVITON3, True)):
        monkeypatch.setattr(cpu.Path, "read_text", lambda self, *a, _t=text, **k: _t)
        cpu.cpu_has_native_bf16.cache_clear()

        # Execute / Assert
        assert cpu.cpu_has_native_bf16() is native
        assert ("native" if native else "emulated") in cpu.describe_bf16()
    cpu.cpu_has_native_bf16.cache_clear()


def test_no_cpuinfo_counts_as_emulated(monkeypatch) -> None:
    monkeypatch.delenv(cpu.CPU_BF16_ENV, raising=False)

    def unreadable(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise FileNotFoundError(self)

    monkeypatch.setattr(cpu.Path, "read_text", unreadable)
    cpu.cpu_has_native_bf16.cache_clear()
    try:
        assert cpu.cpu_has_native_bf16() is False
    finally:
        cpu.cpu_has_native_bf16.cache_clear()


@pytest.mark.parametrize("kind", ["native", "emulated"])
def test_the_override_is_what_training_and_serving_ask(kind: str) -> None:
    # One check: the training, serving and benchmark modules all hold the same function.
    assert train.cpu_has_native_bf16 is cpu.cpu_has_native_bf16
    assert serving.cpu_has_native_bf16 is cpu.cpu_has_native_bf16
    with cpu_bf16(kind):
        assert cpu.cpu_has_native_bf16() is (kind == "native")
        assert f": {kind} (from ${cpu.CPU_BF16_ENV})" in cpu.describe_bf16()


def test_a_wrong_override_is_refused_with_the_choices() -> None:
    with cpu_bf16("fast"), pytest.raises(ValueError, match="native, emulated"):
        cpu.cpu_has_native_bf16()
