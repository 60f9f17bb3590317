"""Training speed against what the hardware allows: real tokens/s, model FLOPs, matmul peak.

One run, the same seeded batches (4 samples of the user's text, ≤ 96 tokens) for every path,
three times over (each time the batches of one more federated round, the paths interleaved in a
rotated order, so that a slow spell of a shared machine does not fall on one path):

* **old loop** — the bare peft loop as it was: right-padded rows, fp32, ``model(**batch).loss``
  (logits over the whole vocabulary at every position);
* **padded / packed, fp32 / bf16** — :func:`common.train.train_steps`' own step (the output
  layer on reply tokens only), on padded rows or one packed row (per-sample attention,
  :mod:`common.packed_attention`), in fp32 or under CPU bf16 autocast with the frozen base
  cast to bf16 once for the run (:func:`common.train.frozen_weights_in`);
* **device round** — a device's whole federated round (policy and ledger, training in
  ``train.precision = "auto"``, clipping, noise, encrypted store writes) as a deployed device
  runs it: A/B counts come from ratings stored in its store (a simulated user's ratings cost
  three forward passes a real device never makes, so ``ab.simulate-ratings`` is off).

**Real tokens** are the samples' tokens (padding excluded). **Model FLOPs per real token**
for LoRA training: every decoder layer's linear maps forward (2 FLOPs per weight), the layers
from the first LoRA layer up backward once more (gradients of their inputs; frozen weights need
no weight gradient), attention's score and value products (causal, per sample), and the output
layer forward + backward on reply tokens only; LoRA's own matmuls (rank 8) are left out (< 1 %).
**Peak** is a 2048³ matmul on the same cores, fp32 and bf16, measured in the same run; the
utilisation is achieved model FLOP/s over that peak.

bf16 is timed only where the CPU computes it natively (:func:`common.cpu.cpu_has_native_bf16`):
elsewhere a bf16 matmul is emulated, ~40× slower than fp32's, and no path would choose it; the
bf16 paths and the bf16 peak are then left out and the table says so.

``python -m benchmarks.train --model smollm2`` prints JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import tempfile
import time
import zlib
from pathlib import Path

import torch

from common.cpu import EMULATED_NOTE, cpu_has_native_bf16

BATCH = 4
SEQ = 96
MATMUL_N = 2048


def matmul_peak(dtype: torch.dtype, *, n: int = MATMUL_N, repeats: int = 8) -> float:
    """FLOP/s of an ``n``³ matmul in ``dtype`` on this process's threads (best of 3)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start))
    return best


def model_flops(model: torch.nn.Module, batches: list[list], *, first_lora_layer: int) -> float:
    """Model FLOPs of one LoRA training step per batch, summed (see the module docstring)."""
    from common.train import causal_lm

    lm = causal_lm(model)
    layers = lm.get_decoder().layers
    # The base's linear maps (peft's wrappers hold them as ``base_layer``; LoRA's own skipped).
    per_layer = sum(
        m.weight.numel()
        for name, m in layers[0].named_modules()
        if isinstance(m, torch.nn.Linear) and "lora_" not in name
    )
    head = lm.get_output_embeddings().weight.numel()
    hidden = lm.config.hidden_size
    n_layers, trained = len(layers), len(layers) - first_lora_layer
    total = 0.0
    for batch in batches:
        for e in batch:
            n = len(e.input_ids)
            replies = sum(1 for t in e.labels[1:] if t != -100)
            linear = 2 * per_layer * n * (n_layers + trained)
            # QK^T and AV: 2 products of 2·ctx·d FLOPs per token, ctx ≈ n/2 on average
            # (causal); backward twice that in the trained layers.
            attention = 2 * n * n * hidden * (n_layers + 2 * trained)
            total += linear + attention + 4 * head * replies
    return total


def _bare(model, names, batches, *, lr: float, step, hold_bf16: bool = False) -> float:  # type: ignore[no-untyped-def]
    """Seconds for one AdamW step per batch with ``step(batch) -> loss`` (with ``hold_bf16``,
    the frozen base cast to bf16 once, inside the timed span, as train_steps does)."""
    from common.train import frozen_weights_in, unfreeze_only

    params = unfreeze_only(model, names)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    start = time.perf_counter()
    with frozen_weights_in(model, torch.bfloat16) if hold_bf16 else contextlib.nullcontext():
        for batch in batches:
            loss = step(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return seconds


def _speed_config(model_name: str, steps: int):  # type: ignore[no-untyped-def]
    """The run config of a speed run: 8 users, ``steps`` local steps, never declined."""
    from common.config import parse_run_config

    return parse_run_config(
        {
            "model.name": model_name,
            "data.num-users": 8,
            "train.local-steps": steps,
            "train.batch-size": BATCH,
            "data.max-seq-len": SEQ,
            "privacy.epsilon-cap": 100.0,  # a speed run must not be declined
            "ab.simulate-ratings": False,
        }
    )


def _our_step(model, batch_of, dtype: str):  # type: ignore[no-untyped-def]
    """``step(batch) -> loss`` of train_steps' own step (reply tokens only) under ``dtype``."""
    from common.train import reply_token_losses, training_autocast

    def step(batch: list) -> torch.Tensor:
        b = batch_of(batch)
        with training_autocast(model, dtype, b):
            return reply_token_losses(model, b)[0].mean()

    return step


def _bare_paths(model, pad: int, native_bf16: bool) -> dict:  # type: ignore[no-untyped-def]
    """The bare paths by table name: ``(step, dtype)``; the bf16 ones only where native."""
    from common.data import collate, pack

    def old_step(b: list) -> torch.Tensor:
        return model(**collate(b, pad)).loss

    paths = {
        "old loop (padded, fp32, full logits)": (old_step, "float32"),
        "padded, fp32": (_our_step(model, lambda b: collate(b, pad), "float32"), "float32"),
        "packed, fp32": (_our_step(model, pack, "float32"), "float32"),
    }
    if native_bf16:
        paths["padded, bf16"] = (
            _our_step(model, lambda b: collate(b, pad), "bfloat16"),
            "bfloat16",
        )
        paths["packed, bf16"] = (_our_step(model, pack, "bfloat16"), "bfloat16")
    return paths


def _run_bare(rt, lr: float, path: tuple, batches: list) -> float:  # type: ignore[no-untyped-def]
    """Seconds of the bare path ``(step, dtype)`` on ``batches``, from the LoRA init."""
    from common.lora import load_lora_tensors

    step, dtype = path
    load_lora_tensors(rt.model, rt.init)
    return _bare(
        rt.model, rt.trainable_names, batches, lr=lr, step=step, hold_bf16=dtype == "bfloat16"
    )


def _round_batches(cfg, device, server_round: int, steps: int) -> list[list]:  # type: ignore[no-untyped-def]
    """The batches train_steps draws on ``device`` in ``server_round``."""
    rng = random.Random(zlib.crc32(f"{cfg.seed}:{server_round}:{device.user}".encode()))
    samples = device.train_set
    return [[samples[rng.randrange(len(samples))] for _ in range(BATCH)] for _ in range(steps)]


def _time_paths(  # type: ignore[no-untyped-def]
    cfg, rt, *, steps: int, repeats: int, native_bf16: bool
) -> tuple[dict[str, list[float]], list[int], list[int], list[float], list[str]]:
    """Seconds of every path by name, real/padded tokens and FLOPs per repeat, table order."""
    from client.federation.device import Device
    from client.store import LocalStore
    from common.crypto import Secret, create_key_file

    model, lr = rt.model, cfg.train.learning_rate
    layers = cfg.model.layer_range()
    seconds: dict[str, list[float]] = {}
    real, padded, flops = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        key = create_key_file(Path(tmp) / "k.key")
        store = LocalStore.create(Path(tmp) / "dev", Secret(key_file=key))
        device = Device.simulated(cfg, store=store, partition_id=0, num_partitions=8)
        paths = _bare_paths(model, device.pad_id, native_bf16)
        g = {n: rt.init[n] for n in rt.shared_names}
        device.train(g, server_round=1)  # warm-up; makes the precision choice
        for i in range(repeats):
            server_round = 2 + i
            batches = _round_batches(cfg, device, server_round, steps)
            if i == 0 and native_bf16:
                _run_bare(rt, lr, paths["packed, bf16"], batches)  # warm-up of the bf16 kernels
            start = time.perf_counter()
            result = device.train(g, server_round=server_round)
            seconds.setdefault("device round (auto)", []).append(time.perf_counter() - start)
            if result.declined:
                raise RuntimeError(f"the device declined round {server_round}: {result.metrics}")
            rotated = list(paths.items())
            rotated = rotated[i % len(rotated) :] + rotated[: i % len(rotated)]
            for name, path in rotated:
                seconds.setdefault(name, []).append(_run_bare(rt, lr, path, batches))
            real.append(sum(len(e.input_ids) for b in batches for e in b))
            padded.append(sum(len(b) * max(len(e.input_ids) for e in b) for b in batches))
            flops.append(model_flops(model, batches, first_lora_layer=layers[0] if layers else 0))
        store.close()
    return seconds, real, padded, flops, [*paths, "device round (auto)"]


def _path_rows(  # type: ignore[no-untyped-def]
    seconds: dict[str, list[float]], table: list[str], real: int, flops: float, peak: dict
) -> dict:
    """Each path's figures over all its runs, by name, in ``table``'s order."""
    old = seconds["old loop (padded, fp32, full logits)"]
    return {
        name: {
            "seconds": sum(seconds[name]),
            "real_tokens_per_s": real / sum(seconds[name]),
            "ratio_to_old_loop": sum(old) / sum(seconds[name]),
            "ratio_each": [o / x for o, x in zip(old, seconds[name], strict=True)],
            "model_tflops": flops / sum(seconds[name]) / 1e12,
            "of_fp32_peak": flops / sum(seconds[name]) / peak["float32"],
            "of_bf16_peak": (
                flops / sum(seconds[name]) / peak["bfloat16"] if "bfloat16" in peak else None
            ),
        }
        for name in table
    }


def bench(model_name: str, *, steps: int = 6, repeats: int = 3, peak_n: int = MATMUL_N) -> dict:
    """Every path on the same batches; tokens/s, ratios and utilisation (CPU).

    ``repeats`` times, on the batches of one more federated round each: the device's round,
    then every bare path, in an order rotated each time (a slow spell of a shared machine
    then falls on different paths). Each path's figures are over all its runs (total real
    tokens / total seconds); ``ratio_each`` keeps each repeat's ratio to the old loop, paired
    on the same batches, to show the spread."""
    from client.federation.runtime import get_runtime
    from common.train import cpu_training_dtype, forget_precision_choice

    native_bf16 = cpu_has_native_bf16()
    cfg = _speed_config(model_name, steps)
    rt = get_runtime(cfg)
    model = rt.model
    forget_precision_choice(model)  # the device round below chooses on this CPU, now
    seconds, real, padded, flops, table = _time_paths(
        cfg, rt, steps=steps, repeats=repeats, native_bf16=native_bf16
    )
    peak = {"float32": matmul_peak(torch.float32, n=peak_n)}
    if native_bf16:
        peak["bfloat16"] = matmul_peak(torch.bfloat16, n=peak_n)
    auto = cpu_training_dtype(model) == torch.bfloat16
    chosen = "packed, bf16" if auto else "packed, fp32"
    total_real, total_flops = sum(real), sum(flops)
    rows = _path_rows(seconds, table, total_real, total_flops, peak)
    return {
        "model": model_name,
        "threads": torch.get_num_threads(),
        "cpu_native_bf16": native_bf16,
        "bf16_note": None if native_bf16 else EMULATED_NOTE,
        "steps": steps,
        "batch": BATCH,
        "repeats": repeats,
        "real_tokens": total_real,
        "padded_tokens": sum(padded),
        "model_flops_per_real_token": total_flops / total_real,
        "matmul_peak_tflops": {k: v / 1e12 for k, v in peak.items()},
        "auto_precision": "bfloat16" if auto else "float32",
        "paths": rows,
        "device_over_bare": sum(seconds[chosen]) / sum(seconds["device round (auto)"]),
        "device_over_bare_each": [
            b / d for b, d in zip(seconds[chosen], seconds["device round (auto)"], strict=True)
        ],
        "best_over_old": max(p["ratio_to_old_loop"] for p in rows.values()),
    }


def _share(x: float | None) -> str:
    return "—" if x is None else f"{x:.0%}"


def markdown(r: dict) -> str:
    """The paths as one Markdown table."""
    lines = [
        "| path | real tokens/s | × old loop (each repeat) | model TFLOP/s | of fp32 peak "
        "| of bf16 peak |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in r["paths"].items():
        each = ", ".join(f"{x:.2f}" for x in p.get("ratio_each", []))
        lines.append(
            f"| {name} | {p['real_tokens_per_s']:.0f} | **{p['ratio_to_old_loop']:.2f}×** "
            f"({each}) | {p['model_tflops']:.3f} | {p['of_fp32_peak']:.0%} | "
            f"{_share(p['of_bf16_peak'])} |"
        )
    peak = r["matmul_peak_tflops"]
    bf16_peak = f"{peak['bfloat16']:.2f} bf16" if "bfloat16" in peak else r["bf16_note"]
    each = ", ".join(f"{x:.2f}" for x in r.get("device_over_bare_each", []))
    lines.append(
        f"\n{r['model']} · {r['threads']} threads · {r.get('repeats', 1)} × {r['steps']} "
        f"steps × {r['batch']} samples, paths interleaved · {r['real_tokens']} real tokens "
        f"({r['padded_tokens']} padded) · "
        f"{r['model_flops_per_real_token'] / 1e9:.2f} GFLOP per real token · matmul peak "
        f"{peak['float32']:.2f} TFLOP/s fp32, {bf16_peak} · auto precision: "
        f"{r['auto_precision']} · device round / its bare loop **{r['device_over_bare']:.2f}×** "
        f"({each})"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of every path")
    parser.add_argument("--out", type=Path, default=None, help="write JSON + Markdown here")
    args = parser.parse_args()
    r = bench(args.model, steps=args.steps, repeats=args.repeats)
    print(json.dumps(r, indent=1))
    print(markdown(r))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_train.json").write_text(json.dumps(r, indent=1))
        (args.out / "bench_train.md").write_text(markdown(r) + "\n")


if __name__ == "__main__":
    main()
