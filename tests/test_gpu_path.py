"""The GPU path: bf16 and 4-bit (QLoRA) bases, their config keys, and what the federation sees.

CPU-testable parts run everywhere: a bf16 base trains with fp32 LoRA tensors identical in name,
shape and dtype to the fp32 path's, and ``model.quantization = "4bit"`` without CUDA fails fast
with the fix in the message, before bitsandbytes is imported. The 4-bit and CUDA-bf16 training
tests run only on a CUDA machine.
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.config import ModelConfig, parse_run_config
from common.data import IGNORE_INDEX, Encoded
from common.lora import build_peft_model, get_lora_tensors, load_lora_tensors, lora_shapes
from common.model import (
    QuantizationUnavailable,
    compute_dtype,
    load_base_for,
    load_base_model,
    resolve_dtype,
)
from common.personalization import get_strategy
from common.train import autocast_for, evaluate_loss, train_steps

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PAD = 2


def _samples(n: int = 4, length: int = 24) -> list[Encoded]:
    """Fixed random-token samples; the first 4 tokens are an unscored prompt."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 2000, (length,), generator=gen).tolist()
        out.append(Encoded(tuple(ids), tuple([IGNORE_INDEX] * 4 + ids[4:])))
    return out


def _trainable(model: torch.nn.Module, strategy: str) -> list[str]:
    strat = get_strategy(strategy)
    return [n for n in lora_shapes(model) if strat.is_trainable(n)]


def _signature(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {n: (tuple(t.shape), str(t.dtype)) for n, t in tensors.items()}


def _run_python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (clean ``sys.modules``); it prints one JSON line."""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "stderr": proc.stderr}


# --- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"), [("model.quantization", "8bit"), ("model.dtype", "float16")]
)
def test_config_rejects_unknown_dtype_or_quantization(key: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"`{key}`"):
        parse_run_config({key: value})


def test_config_parses_and_round_trips_gpu_keys() -> None:
    # Execute
    cfg = parse_run_config({"model.quantization": "4bit", "model.dtype": "bfloat16"})

    # Assert
    assert (cfg.model.quantization, cfg.model.dtype) == ("4bit", "bfloat16")
    flat = cfg.to_flat()
    assert (flat["model.quantization"], flat["model.dtype"]) == ("4bit", "bfloat16")
    assert parse_run_config(flat).model == cfg.model
    assert parse_run_config({}).model.quantization == "none"
    assert parse_run_config({}).model.dtype == "auto"


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("auto", torch.float32), ("float32", torch.float32), ("bfloat16", torch.bfloat16)],
)
def test_resolve_dtype_on_cpu(dtype: str, expected: torch.dtype) -> None:
    assert resolve_dtype(dtype, CPU) == expected


def test_resolve_dtype_rejects_unknown_value() -> None:
    with pytest.raises(ValueError, match="`model.dtype`"):
        resolve_dtype("float8", CPU)


# --- 4-bit without CUDA ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def fresh_interpreter() -> dict:
    """One fresh interpreter (clean ``sys.modules``): a 4-bit load on a CPU, then importing
    ``benchmarks.gpu_check``; records the error and what each step imported."""
    code = """
import json, sys, torch
from common.model import QuantizationUnavailable, load_base_model
try:
    load_base_model("tiny", device=torch.device("cpu"), quantization="4bit")
    message = None
except QuantizationUnavailable as err:
    message = str(err)
def imported(names):
    return sorted({m.split(".")[0] for m, mod in sys.modules.items() if mod} & names)
after_error = imported({"bitsandbytes", "peft"})
import benchmarks.gpu_check
app_deps = imported({"flwr", "opacus"})
from common.config import ModelConfig
from common.lora import build_peft_model
from common.model import load_base_for
from common.personalization import get_strategy
build_peft_model(load_base_for(ModelConfig(name="tiny")), ModelConfig(name="tiny"),
                 get_strategy("dual"))
after_lora = imported({"bitsandbytes"})
print(json.dumps({"message": message, "after_error": after_error,
                  "gpu_check": app_deps, "after_lora": after_lora}))
"""
    return _run_python(code)


def test_4bit_on_cpu_fails_before_bitsandbytes_or_weights_are_touched(
    fresh_interpreter: dict,
) -> None:
    # Prepare
    out = fresh_interpreter

    # Assert
    assert out["message"] is not None
    assert "`model.quantization" in out["message"]
    assert "requires CUDA" in out["message"]
    assert 'model.quantization = "none"' in out["message"]
    assert out["after_error"] == []  # neither bitsandbytes nor peft was imported


def test_gpu_check_imports_neither_flwr_nor_opacus(fresh_interpreter: dict) -> None:
    assert fresh_interpreter["gpu_check"] == []


def test_a_full_precision_lora_never_imports_bitsandbytes(fresh_interpreter: dict) -> None:
    # Installed, bitsandbytes would be imported by peft for every LoRA and warn on CPUs.
    assert fresh_interpreter["after_lora"] == []
    assert "bitsandbytes" not in fresh_interpreter["stderr"]
    assert "kernels" not in fresh_interpreter["stderr"]


def test_4bit_check_runs_before_the_model_is_looked_up() -> None:
    # A model that does not exist: the quantization error, not FileNotFoundError, comes first.
    cfg = ModelConfig(name="/nonexistent/model", quantization="4bit")
    with pytest.raises(QuantizationUnavailable, match="requires CUDA"):
        load_base_for(cfg, device=CPU)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the default device without CUDA")
def test_4bit_without_cuda_fails_with_default_device() -> None:
    with pytest.raises(QuantizationUnavailable, match="this machine has no CUDA GPU"):
        load_base_for(ModelConfig(name="tiny", quantization="4bit"))


def test_4bit_names_missing_bitsandbytes(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: pretend CUDA is present and bitsandbytes is not installed.
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # blocked again afterwards
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a),
    )

    # Execute / Assert
    with pytest.raises(QuantizationUnavailable, match="pip install 'bitsandbytes"):
        load_base_model("tiny", device=torch.device("cuda"), quantization="4bit")


# --- bf16 base on a CPU ---------------------------------------------------------------------


def test_bf16_base_on_cpu_trains_with_fp32_lora_and_decreasing_loss() -> None:
    # Prepare
    base = load_base_for(ModelConfig(name="tiny", dtype="bfloat16"), device=CPU)
    cfg = ModelConfig(name="tiny", dtype="bfloat16")
    model = build_peft_model(base, cfg, get_strategy("fedsa"))
    samples = _samples(n=2, length=16)  # small: bf16 matmuls are slow on a CPU
    before = evaluate_loss(model, samples, batch_size=2)

    # Execute
    mean = train_steps(
        model,
        _trainable(model, "fedsa"),
        samples,
        steps=5,
        batch_size=2,
        learning_rate=0.05,
        seed=0,
        pad_id=PAD,
    )
    after = evaluate_loss(model, samples, batch_size=2)

    # Assert
    assert compute_dtype(model) == torch.bfloat16
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    assert math.isfinite(mean) and math.isfinite(after)
    assert after < before - 0.05


@pytest.mark.parametrize("strategy", ["fedsa", "dual"])
def test_bf16_base_exports_the_same_tensors_as_fp32(strategy: str) -> None:
    # Prepare
    strat = get_strategy(strategy)
    fp32 = build_peft_model(load_base_model("tiny", device=CPU), ModelConfig(name="tiny"), strat)
    bf16 = build_peft_model(
        load_base_model("tiny", device=CPU, dtype="bfloat16"),
        ModelConfig(name="tiny", dtype="bfloat16"),
        strat,
    )
    gen = torch.Generator().manual_seed(3)
    incoming = {n: torch.randn(t.shape, generator=gen) for n, t in get_lora_tensors(fp32).items()}

    # Execute
    init_fp32, init_bf16 = get_lora_tensors(fp32), get_lora_tensors(bf16)
    load_lora_tensors(bf16, incoming)
    back = get_lora_tensors(bf16)

    # Assert: same names, shapes, fp32 dtype and initial values; a global update lands exactly.
    assert _signature(init_bf16) == _signature(init_fp32)
    assert {str(t.dtype) for t in init_bf16.values()} == {"torch.float32"}
    assert all(torch.equal(init_bf16[n], init_fp32[n]) for n in init_fp32)
    assert all(torch.equal(back[n], incoming[n]) for n in incoming)


def test_compute_dtype_follows_the_weights() -> None:
    # Prepare
    base = load_base_model("tiny", device=CPU)
    before = compute_dtype(base)

    # Execute
    model = build_peft_model(base.to(torch.bfloat16), ModelConfig(name="tiny"), get_strategy("ffa"))

    # Assert
    assert before == torch.float32
    assert compute_dtype(model) == torch.bfloat16


def test_unknown_quantization_is_rejected_before_loading() -> None:
    with pytest.raises(ValueError, match="`model.quantization`"):
        load_base_model("/nonexistent/model", device=CPU, quantization="8bit")


def test_autocast_is_a_no_op_on_cpu() -> None:
    # Prepare
    model = build_peft_model(
        load_base_model("tiny", device=CPU, dtype="bfloat16"),
        ModelConfig(name="tiny"),
        get_strategy("fedsa"),
    )

    # Execute / Assert: the CPU paths (fp32 and bf16) run unwrapped.
    assert isinstance(autocast_for(model), contextlib.nullcontext)


# --- self-contained GPU check ---------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_gpu_check_refuses_cpu_without_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import gpu_check

    assert gpu_check.main(["--model", "tiny"]) == gpu_check.EXIT_NO_CUDA
    assert "--allow-cpu" in capsys.readouterr().err


@pytest.mark.parametrize("native_bf16", [True, False])
def test_gpu_check_cpu_smoke(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native_bf16: bool
) -> None:
    # Prepare: the CPU's bf16 answered both ways, whatever this machine has
    from benchmarks import gpu_check

    monkeypatch.setattr(gpu_check, "cpu_has_native_bf16", lambda: native_bf16)

    # Execute
    code = gpu_check.main(
        [
            "--allow-cpu",
            "--model",
            "tiny",
            "--steps",
            "1",
            "--seq-len",
            "16",
            "--out",
            str(tmp_path),
        ]
    )

    # Assert
    slug = gpu_check.device_slug(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    result = json.loads((tmp_path / f"gpu_check_{slug}.json").read_text())
    assert code == 0 and result["ok"]
    if torch.cuda.is_available():
        expected = {"fp32", "bf16", "4bit"}
    else:
        expected = {"fp32", "bf16"} if native_bf16 else {"fp32"}
    assert set(result["variants"]) == expected
    assert all(v["tokens_per_s"] > 0 for v in result["variants"].values())
    report = (tmp_path / f"gpu_check_{slug}.md").read_text()
    assert "| train tokens/s |" in report
    emulated = not torch.cuda.is_available() and not native_bf16
    assert ("bf16: emulated on this CPU, not measured" in report) == emulated


# --- CUDA only ------------------------------------------------------------------------------


@CUDA_ONLY
def test_cuda_auto_dtype_trains_in_bf16_with_fp32_lora() -> None:
    # Prepare
    cuda = torch.device("cuda")
    model = build_peft_model(
        load_base_for(ModelConfig(name="tiny"), device=cuda),
        ModelConfig(name="tiny"),
        get_strategy("fedsa"),
    )
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    # Execute
    mean = train_steps(
        model,
        _trainable(model, "fedsa"),
        _samples(),
        steps=2,
        batch_size=2,
        learning_rate=0.05,
        seed=0,
        pad_id=PAD,
    )

    # Assert
    assert compute_dtype(model) == expected
    assert isinstance(autocast_for(model), torch.autocast)
    assert math.isfinite(mean)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}


@CUDA_ONLY
def test_4bit_base_trains_a_step_and_exports_fp32_tensors() -> None:
    # Prepare
    import bitsandbytes as bnb

    strat = get_strategy("fedsa")
    cfg = ModelConfig(name="tiny", quantization="4bit")
    model = build_peft_model(load_base_for(cfg, device=torch.device("cuda")), cfg, strat)
    reference = get_lora_tensors(build_peft_model(load_base_model("tiny"), cfg, strat))
    before = get_lora_tensors(model)

    # Execute
    mean = train_steps(
        model,
        _trainable(model, "fedsa"),
        _samples(),
        steps=1,
        batch_size=2,
        learning_rate=0.05,
        seed=0,
        pad_id=PAD,
    )
    after = get_lora_tensors(model)

    # Assert
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert math.isfinite(mean)
    assert _signature(after) == _signature(reference)
    assert any(not torch.equal(after[n], before[n]) for n in after)
