"""GPU path check: LoRA training speed and peak memory on fp32, bf16 and 4-bit (QLoRA) bases.

Loads the same base three ways through :func:`common.model.load_base_model` (``model.dtype =
"float32"``, ``model.dtype = "bfloat16"``, ``model.quantization = "4bit"``), wraps each with the
federation's LoRA (fedsa, r=4 on q,v) and trains it with :func:`common.train.train_steps` on the
same synthetic batches, side by side in one run. It reports tokens/s and peak GPU memory
(``torch.cuda.max_memory_allocated``), and checks that

* every loss is finite;
* at step 0 (LoRA B = 0, so the base alone speaks) the 4-bit loss is within ``--tolerance``
  (relative) of the bf16 loss, and the bf16 loss of the fp32 loss;
* every variant exports the same LoRA tensors: names, shapes and fp32 dtype.

Results go to stdout (JSON, then a Markdown table) and to
``benchmarks/results/gpu_check_<device>.json`` / ``.md``. The exit code is 0 when all checks
pass, 1 when one fails and 2 on a machine without CUDA (``--allow-cpu`` runs fp32 and bf16 for a
few steps instead, to smoke-test this script).

Self-contained for a bare GPU machine: it needs torch, transformers, peft, accelerate and
bitsandbytes, not Flower or Opacus. ``--model smollm2-shape`` and ``--model tiny`` are random
models (seed 0) saved to a temporary directory, so no model file has to be carried;
``--model smollm2`` loads the real embedded model.

    python -m benchmarks.gpu_check --model smollm2-shape --steps 30
    python -m benchmarks.gpu_check --allow-cpu --model tiny --steps 2 --out /tmp/gpu-check

(One file on purpose, over the usual length: it is a self-contained script for a bare GPU machine,
runnable without the rest of the project's dependencies.)
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.device import SMOLLM2_SHAPE
from common.config import ModelConfig
from common.cpu import EMULATED_NOTE, cpu_has_native_bf16
from common.data import IGNORE_INDEX, Encoded
from common.lora import build_peft_model, get_lora_tensors, load_lora_tensors, lora_shapes
from common.model import (
    TINY_CONFIG,
    QuantizationUnavailable,
    compute_dtype,
    load_base_model,
    model_dir,
)
from common.personalization import get_strategy
from common.train import evaluate_loss, train_steps

# Variant -> (model.dtype, model.quantization).
VARIANTS: dict[str, tuple[str, str]] = {
    "fp32": ("float32", "none"),
    "bf16": ("bfloat16", "none"),
    "4bit": ("auto", "4bit"),
}
CPU_VARIANTS = ("fp32", "bf16")
STRATEGY = "fedsa"
PAD_ID = 2
LEARNING_RATE = 5e-3
N_SAMPLES = 32
EXIT_NO_CUDA = 2


def device_slug(device: torch.device) -> str:
    """Short name for result files: ``h100`` for "NVIDIA H100 80GB HBM3", ``cpu`` on a CPU."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "")
    for word in name.split():
        if re.fullmatch(r"[a-z]+\d+[a-z]*", word):
            return word
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"


def _save_random_model(shape: dict[str, Any], out: Path) -> Path:
    """A random Llama of ``shape`` (seed 0) saved as a local model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**shape))
    model.save_pretrained(out)
    return out


def base_source(model: str, tmp: Path) -> Path:
    """Local directory of the base for ``--model`` (random ones are written under ``tmp``).

    Raises:
        ValueError: For an unknown ``--model``.
    """
    if model == "smollm2-shape":
        return _save_random_model(SMOLLM2_SHAPE, tmp / "smollm2-shape")
    if model == "tiny":
        shape = {
            **TINY_CONFIG,
            "vocab_size": SMOLLM2_SHAPE["vocab_size"],
            "bos_token_id": 1,
            "eos_token_id": PAD_ID,
            "pad_token_id": PAD_ID,
        }
        return _save_random_model(shape, tmp / "tiny")
    if model == "smollm2":
        return model_dir("smollm2")
    raise ValueError(f"--model must be smollm2-shape, smollm2 or tiny; got {model!r}")


def synthetic_samples(n: int, seq_len: int, vocab: int, *, seed: int = 0) -> list[Encoded]:
    """``n`` fixed-length samples of random tokens; the first quarter is an unscored prompt."""
    gen = torch.Generator().manual_seed(seed)
    prompt = seq_len // 4
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (seq_len,), generator=gen).tolist()
        out.append(Encoded(tuple(ids), tuple([IGNORE_INDEX] * prompt + ids[prompt:])))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mib(n_bytes: int) -> float:
    return n_bytes / 2**20


def _train(  # type: ignore[no-untyped-def]
    model, names: list[str], samples: list[Encoded], *, steps: int, batch_size: int, seed: int
) -> float:
    """Mean loss of ``steps`` :func:`common.train.train_steps` at the check's rate and pad id."""
    return train_steps(
        model,
        names,
        samples,
        steps=steps,
        batch_size=batch_size,
        learning_rate=LEARNING_RATE,
        seed=seed,
        pad_id=PAD_ID,
    )


def run_variant(
    variant: str,
    source: Path,
    device: torch.device,
    samples: list[Encoded],
    *,
    steps: int,
    batch_size: int,
) -> dict[str, Any]:
    """Load one base variant, wrap it with LoRA and train ``steps`` timed steps.

    Returns:
        Timings, memory, losses and the exported LoRA tensors' signature.
    """
    dtype, quantization = VARIANTS[variant]
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else 0
    cfg = ModelConfig(name=str(source), dtype=dtype, quantization=quantization)
    strategy = get_strategy(STRATEGY)

    start = time.perf_counter()
    base = load_base_model(str(source), device=device, dtype=dtype, quantization=quantization)
    model = build_peft_model(base, cfg, strategy)
    _sync(device)
    load_s = time.perf_counter() - start
    weights_mib = _mib(torch.cuda.memory_allocated(device) - before) if cuda else None

    names = [n for n in lora_shapes(model) if strategy.is_trainable(n)]
    init = get_lora_tensors(model)
    eval_batch = samples[:batch_size]
    loss_step0 = evaluate_loss(model, eval_batch, batch_size=batch_size)
    # Warm-up (kernels, cuBLAS handles, allocator), then restart from the same LoRA init.
    _train(model, names, samples, steps=2, batch_size=batch_size, seed=0)
    load_lora_tensors(model, init)
    _sync(device)
    start = time.perf_counter()
    train_loss = _train(model, names, samples, steps=steps, batch_size=batch_size, seed=1)
    _sync(device)
    train_s = time.perf_counter() - start
    loss_after = evaluate_loss(model, eval_batch, batch_size=batch_size)
    exported = get_lora_tensors(model)
    tokens = steps * batch_size * len(samples[0].input_ids)
    result = {
        "model.dtype": dtype,
        "model.quantization": quantization,
        "compute_dtype": str(compute_dtype(model)).replace("torch.", ""),
        "load_s": load_s,
        "train_s": train_s,
        "tokens_per_s": tokens / train_s,
        "ms_per_step": 1000 * train_s / steps,
        "weights_mib": weights_mib,
        "peak_mib": _mib(torch.cuda.max_memory_allocated(device)) if cuda else None,
        "loss_step0": loss_step0,
        "train_mean_loss": train_loss,
        "loss_after": loss_after,
        "lora_signature": {n: [list(t.shape), str(t.dtype)] for n, t in exported.items()},
    }
    del model, base
    return result


def checks(variants: dict[str, dict[str, Any]], *, tolerance: float) -> dict[str, bool]:
    """Pass/fail of each check over the measured variants."""
    out = {
        "losses_finite": all(
            math.isfinite(v[k])
            for v in variants.values()
            for k in ("loss_step0", "train_mean_loss", "loss_after")
        ),
        "lora_tensors_identical_shapes_fp32": all(
            v["lora_signature"] == variants["fp32"]["lora_signature"] for v in variants.values()
        )
        and all(d == "torch.float32" for _, d in variants["fp32"]["lora_signature"].values()),
    }
    pairs = [("bf16", "fp32"), ("4bit", "bf16")]
    for a, b in pairs:
        if a in variants and b in variants:
            ref = variants[b]["loss_step0"]
            rel = abs(variants[a]["loss_step0"] - ref) / abs(ref)
            out[f"{a}_step0_loss_within_{tolerance:g}_of_{b}"] = rel <= tolerance
    return out


def _versions() -> dict[str, str | None]:
    """Installed versions, read from metadata (nothing is imported for it)."""
    out: dict[str, str | None] = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def markdown(result: dict[str, Any]) -> str:
    """A Markdown table: one column per base variant."""
    variants: dict[str, dict[str, Any]] = result["variants"]
    fp32 = variants["fp32"]

    def mem(v: float | None) -> str:
        return "n/a" if v is None else f"{v:,.0f} MiB"

    rows: list[tuple[str, list[str]]] = [
        ("compute dtype", [v["compute_dtype"] for v in variants.values()]),
        (
            "train tokens/s",
            [
                f"{v['tokens_per_s']:,.0f} ({v['tokens_per_s'] / fp32['tokens_per_s']:.2f}×)"
                for v in variants.values()
            ],
        ),
        ("ms / step", [f"{v['ms_per_step']:.1f}" for v in variants.values()]),
        ("weights on GPU", [mem(v["weights_mib"]) for v in variants.values()]),
        ("peak GPU memory", [mem(v["peak_mib"]) for v in variants.values()]),
        ("loss at step 0", [f"{v['loss_step0']:.4f}" for v in variants.values()]),
        ("mean train loss", [f"{v['train_mean_loss']:.4f}" for v in variants.values()]),
        ("loss after training", [f"{v['loss_after']:.4f}" for v in variants.values()]),
    ]
    head = (
        f"{result['model']} on {result['device']}: {result['steps']} steps × "
        f"{result['batch_size']} × {result['seq_len']} tokens, LoRA r=4 ({STRATEGY})"
    )
    lines = [
        f"| {head} | " + " | ".join(variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]
    lines.append("")
    lines += [f"- {'PASS' if ok else 'FAIL'} {name}" for name, ok in result["checks"].items()]
    lines += [f"- {name} did not run: {why}" for name, why in result["errors"].items()]
    lines += [f"- {name}: {why}" for name, why in result.get("skipped", {}).items()]
    return "\n".join(lines)


def run(
    model: str,
    device: torch.device,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    tolerance: float,
) -> dict[str, Any]:
    """Measure every variant that ``device`` supports; returns a JSON-serializable dict."""
    names = list(VARIANTS) if device.type == "cuda" else list(CPU_VARIANTS)
    skipped: dict[str, str] = {}
    if device.type != "cuda" and not cpu_has_native_bf16():
        names.remove("bf16")
        skipped["bf16"] = EMULATED_NOTE
    with tempfile.TemporaryDirectory() as tmp:
        source = base_source(model, Path(tmp))
        vocab = json.loads((source / "config.json").read_text())["vocab_size"]
        samples = synthetic_samples(max(N_SAMPLES, batch_size), seq_len, vocab)
        variants: dict[str, dict[str, Any]] = {}
        errors: dict[str, str] = {}
        for name in names:
            try:
                variants[name] = run_variant(
                    name, source, device, samples, steps=steps, batch_size=batch_size
                )
            except QuantizationUnavailable as err:  # e.g. bitsandbytes missing on this machine
                errors[name] = str(err)
    result: dict[str, Any] = {
        "model": model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": _versions(),
        "steps": steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "tolerance": tolerance,
        "variants": variants,
        "errors": errors,
        "skipped": skipped,
        "checks": {"all_variants_ran": not errors, **checks(variants, tolerance=tolerance)},
    }
    result["ok"] = all(result["checks"].values())
    return result


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 pass, 1 a check failed, 2 no CUDA)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-shape", help="smollm2-shape | smollm2 | tiny")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (20 CUDA, 2 CPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="8 on CUDA, 2 on a CPU")
    parser.add_argument("--seq-len", type=int, default=None, help="128 on CUDA, 32 on a CPU")
    parser.add_argument("--tolerance", type=float, default=0.03, help="relative, step-0 loss")
    parser.add_argument("--allow-cpu", action="store_true", help="smoke-test fp32/bf16 on CPU")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print(
            "gpu_check: no CUDA device here; it measures fp32/bf16/4-bit training on a GPU. "
            "Run it on a CUDA machine, or pass --allow-cpu to smoke-test fp32 and bf16 on "
            "this CPU.",
            file=sys.stderr,
        )
        return EXIT_NO_CUDA
    from common.model import quiet_transformers

    quiet_transformers()
    device = torch.device("cuda" if cuda else "cpu")
    result = run(
        args.model,
        device,
        steps=args.steps or (20 if cuda else 2),
        batch_size=args.batch_size or (8 if cuda else 2),
        seq_len=args.seq_len or (128 if cuda else 32),
        tolerance=args.tolerance,
    )
    table = markdown(result)
    stem = f"gpu_check_{device_slug(device)}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(table + "\n")
    shown = {
        **result,
        "variants": {
            k: {f: x for f, x in v.items() if f != "lora_signature"}
            for k, v in result["variants"].items()
        },
    }
    print(json.dumps(shown, indent=1))
    print(table)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
