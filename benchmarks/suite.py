"""``fedpersona bench``: the benchmark suite — every figure a ratio measured in one run.

1. **privacy** — round time with SecAgg+ + distributed DP / plain FedAvg (tiny federation),
   and one Opacus DP-SGD step / one plain step on SmolLM2 (``benchmarks.privacy``);
2. **throughput** — a device's full federated round (ledger check, local training, clipping,
   noise, A/B counts, encrypted store writes) in training tokens/s against a bare peft
   training loop on the same model, batches and steps;
3. **device** — adapter hot-swap, one-feedback adaptation and encrypted bytes per user
   (``benchmarks.device``); answering through the real local API: first streamed
   token against the model alone, the whole answer, 3 candidates, one feedback
   (``benchmarks.chat``);
4. **scaling** — simulated federations of 100 and 1,000 users (tiny model) with 10–100
   sampled per round: peak memory of the whole process tree (must stay flat in the number
   of users) and seconds per round against clients per round; the same engine with SmolLM2
   (100 users, 10–100 per round) for growth with model size; ``bench_growth.png`` plots both.

Prints JSON and a Markdown table and writes both under ``--out``. ``--device cuda`` runs the
model benchmarks on a GPU (the scaling part stays on the CPU simulation engine).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch


def throughput(model: str, device_name: str, *, steps: int = 6) -> dict:
    """Tokens/s of a fedpersona device round vs a bare peft loop (same batches)."""
    import random
    import zlib

    from client.federation.device import Device
    from client.federation.runtime import get_runtime
    from client.store import LocalStore
    from common.config import parse_run_config
    from common.crypto import Secret, create_key_file
    from common.data import collate
    from common.train import unfreeze_only

    raw = {
        "model.name": model,
        "data.num-users": 8,
        "train.local-steps": steps,
        "train.batch-size": 4,
        "data.max-seq-len": 96,
        "privacy.epsilon-cap": 100.0,  # a throughput run must not be declined
    }
    cfg = parse_run_config(raw)
    rt = get_runtime(cfg)
    if device_name != "cpu":
        rt.model.to(device_name)
    with tempfile.TemporaryDirectory() as tmp:
        key = create_key_file(Path(tmp) / "k.key")
        store = LocalStore.create(Path(tmp) / "dev", Secret(key_file=key))
        device = Device.simulated(cfg, store=store, partition_id=0, num_partitions=8)
        g = {n: rt.init[n] for n in rt.shared_names}
        device.train(g, server_round=1)  # warm-up (first-call allocations)
        # Tokens the round trains on: the same seeded batches train_steps draws.
        seed = zlib.crc32(f"{cfg.seed}:2:{device.user}".encode())
        rng = random.Random(seed)
        batches = [
            collate(
                [device.train_set[rng.randrange(len(device.train_set))] for _ in range(4)],
                device.pad_id,
            )
            for _ in range(steps)
        ]
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        start = time.perf_counter()
        device.train(g, server_round=2)
        ours = time.perf_counter() - start
        store.close()

    # The bare loop: peft model, AdamW on the same parameters, the same batches.
    from common.lora import load_lora_tensors

    load_lora_tensors(rt.model, rt.init)
    params = unfreeze_only(rt.model, rt.trainable_names)
    opt = torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=0.0)
    dev = next(rt.model.parameters()).device
    rt.model.train()
    start = time.perf_counter()
    for b in batches:
        b = {k: v.to(dev) for k, v in b.items()}
        loss = rt.model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    bare = time.perf_counter() - start
    rt.model.eval()
    return {
        "model": model,
        "steps": steps,
        "tokens": tokens,
        "device_round_s": ours,
        "bare_loop_s": bare,
        "device_tokens_per_s": tokens / ours,
        "bare_tokens_per_s": tokens / bare,
        "ratio_device_over_bare": (tokens / ours) / (tokens / bare),
    }


# What run_suite writes into its folder (an earlier suite's folder may be written again).
SUITE_FILES = frozenset({"bench.json", "bench.md", "bench_growth.png", "runs"})


def run_suite(out: Path, *, model: str, device: str, quick_scaling: bool = False) -> dict:
    """Every benchmark; returns the JSON-serializable results."""
    from benchmarks import chat as bench_chat
    from benchmarks import device as bench_device
    from benchmarks import privacy as bench_privacy
    from benchmarks import train as bench_train
    from benchmarks.scaling import growth_plot, scaling

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict = {"model": model, "device": device, "threads": torch.get_num_threads()}
    results["privacy_round"] = bench_privacy.round_times("tiny", out / "runs", rounds=4)
    results["privacy_opacus"] = bench_privacy.step_times(model, steps=3)
    if device == "cpu":  # real tokens/s of every training path against the cores' peak
        results["training"] = bench_train.bench(model)
    else:
        results["throughput"] = throughput(model, device)
    results["device_bench"] = bench_device.bench(
        "smollm2-shape" if device == "cuda" and model == "smollm2" else model,
        device,
        store=True,
    )
    results["chat"] = bench_chat.bench_in_fresh_process(model)  # a process like `device serve`
    grid = (
        [(100, 10), (1000, 10)]
        if quick_scaling
        else [(100, 10), (1000, 10), (1000, 30), (1000, 100)]
    )
    results["scaling"] = scaling(out / "runs", grid)
    if not quick_scaling:  # the same engine with the real model: growth with model size
        results["scaling"] += scaling(
            out / "runs", [(100, 10), (100, 30), (100, 100)], model="smollm2"
        )
    growth_plot(results["scaling"], out / "bench_growth.png")
    results["total_s"] = time.perf_counter() - t0
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    (out / "bench.md").write_text(markdown(results) + "\n")
    return results


def _engine_cells(row: dict) -> str:
    e = row.get("engine")
    if not e or e.get("engine_overhead") is None:
        return "– | –"
    return (
        f"{e['device_s_per_client']:.2f} | **{e['engine_overhead']:.0%}** "
        f"({e['node_overhead']:.0%})"
    )


def _privacy_rows(r: dict) -> list[tuple[str, str]]:
    """The privacy rows: SecAgg+ + DP round time and the Opacus step, each against plain."""
    p, o = r["privacy_round"], r["privacy_opacus"]
    return [
        (
            "round time, SecAgg+ + DP / plain FedAvg (tiny)",
            f"{p['secagg_dp']:.2f} s / {p['plain']:.2f} s = **{p['ratio']:.2f}×**",
        ),
        (
            f"Opacus DP-SGD step / plain step ({r['model']})",
            f"{o['opacus_step_s'] * 1000:.0f} ms / {o['plain_step_s'] * 1000:.0f} ms = "
            f"**{o['ratio']:.2f}×**",
        ),
    ]


def _training_rows(r: dict) -> list[tuple[str, str]]:
    """The training rows: every path's benchmark (CPU) or the throughput one (GPU)."""
    if "training" not in r:
        t = r["throughput"]
        return [
            (
                "device round / bare peft loop, tokens/s",
                f"{t['device_tokens_per_s']:.0f} / {t['bare_tokens_per_s']:.0f} = "
                f"**{t['ratio_device_over_bare']:.2f}×**",
            )
        ]
    t = r["training"]
    best = t["paths"]["packed, bf16" if t["auto_precision"] == "bfloat16" else "packed, fp32"]
    old = t["paths"]["old loop (padded, fp32, full logits)"]
    bf16_share = (
        t.get("bf16_note")
        if best.get("of_bf16_peak") is None
        else f"{best['of_bf16_peak']:.0%} of bf16's"
    )
    return [
        (
            "training, real tokens/s: packed + auto precision / old bare loop",
            f"{best['real_tokens_per_s']:.0f} / {old['real_tokens_per_s']:.0f} = "
            f"**{best['ratio_to_old_loop']:.2f}×** ({best['of_fp32_peak']:.0%} of the fp32 "
            f"matmul peak, {bf16_share})",
        ),
        (
            "device round / the same bare loop",
            f"{t['paths']['device round (auto)']['real_tokens_per_s']:.0f} / "
            f"{best['real_tokens_per_s']:.0f} = **{t['device_over_bare']:.2f}×**",
        ),
    ]


def _device_rows(d: dict) -> list[tuple[str, str]]:
    """The device rows: hot-swap against reload, feedback steps, encrypted state per user."""
    rows = [
        (
            "adapter hot-swap (in place) vs reload",
            f"{d['swap_inplace_ms']:.1f} ms vs "
            f"{d['swap_reload_base_ms']:.0f} ms (**{d['ratio_reload_over_inplace']:.0f}×**)",
        ),
        (
            "engine: feedback steps alone (3, 1×64 tokens, all layers)",
            f"{d['one_feedback_ms']:.0f} ms",
        ),
    ]
    if "store_bytes_100_interactions" in d:
        rows.append(
            (
                "encrypted state per user (0 / 100 interactions)",
                f"{d['store_bytes_0_interactions']:,} / {d['store_bytes_100_interactions']:,} B",
            )
        )
    return rows


def _scaling_lines(scaling: list[dict]) -> list[str]:
    """The scaling table's lines, a blank line first."""
    lines = [
        "",
        "| model | users | clients/round | s/round | peak RSS (MiB) | Device.train s/client "
        "| engine overhead (of which in the node) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {s.get('model', 'tiny')} | {s['population']} | {s['clients_per_round']} | "
        f"{s['seconds_per_round']:.1f} | {s['peak_rss_mib']:.0f} | {_engine_cells(s)} |"
        for s in scaling
    ]
    return lines


def markdown(r: dict) -> str:
    """The suite as one Markdown table (+ the scaling table)."""
    d = r["device_bench"] if "device_bench" in r else r["device"]
    rows = _privacy_rows(r) + _training_rows(r) + _device_rows(d)
    if "chat" in r:
        from benchmarks import chat as bench_chat

        rows += bench_chat.suite_rows(r["chat"])
    lines = ["| benchmark | result |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    if "training" in r:
        from benchmarks import train as bench_train

        lines += ["", bench_train.markdown(r["training"])]
    lines += _scaling_lines(r["scaling"])
    where = r["device"] if isinstance(r["device"], str) else d["device"]
    lines.append(f"\n{where} · {r['threads']} threads · total {r['total_s'] / 60:.1f} min")
    return "\n".join(lines)
