"""``fedpersona bench``: the benchmark suite — every figure a ratio measured in one run.

1. **privacy** — round time with SecAgg+ + distributed DP / plain FedAvg (tiny federation),
   and one Opacus DP-SGD step / one plain step on SmolLM2 (``simulations.bench_privacy``);
2. **throughput** — a device's full federated round (ledger check, local training, clipping,
   noise, A/B counts, encrypted store writes) in training tokens/s against a bare peft
   training loop on the same model, batches and steps;
3. **device** — adapter hot-swap, one-feedback adaptation and encrypted bytes per user
   (``simulations.bench_device``); answering through the real local API: first streamed
   token against the model alone, the whole answer, 3 candidates, one feedback
   (``simulations.bench_chat``);
4. **scaling** — simulated federations of 100 and 1,000 users (tiny model) with 10–100
   sampled per round: peak memory of the whole process tree (must stay flat in the number
   of users) and seconds per round against clients per round; the same engine with SmolLM2
   (100 users, 10–100 per round) for growth with model size; ``bench_growth.png`` plots both.

Prints JSON and a Markdown table and writes both under ``--out``. ``--device cuda`` runs the
model benchmarks on a GPU (the scaling part stays on the CPU simulation engine).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from simulations.simulate import simulate


def throughput(model: str, device_name: str, *, steps: int = 6) -> dict:
    """Tokens/s of a fedpersona device round vs a bare peft loop (same batches)."""
    import random
    import zlib

    from client.device import Device
    from client.runtime import get_runtime
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


class PeakRSS:
    """Polls the summed RSS of this process and all its descendants (Ray workers included)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def engine_overhead(run_dir: Path, *, actors: int) -> dict:
    """The simulation engine's per-client overhead in a finished run, rounds ≥ 2 (round 1
    loads the model into every worker process).

    Each simulated node logs, per train message, how long it answered (``node_s``: store open,
    device set-up, decoding and encoding) and how much of that the devices' own rounds took
    (``device_s``: :meth:`client.device.Device.train`); the server records each training
    phase's wall time (every SecAgg+ stage included). With ``actors`` workers running in
    parallel the engine had ``wall × actors`` worker-seconds: **overhead** is the share of
    them not spent in ``Device.train`` (actor hops, Flower's messages, SecAgg+'s other stages,
    store opens, encoding, idle workers); **node** the part spent in the node around it.
    """
    from client.handlers import ENGINE_TIMINGS

    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [r for r in summary["rounds"] if "train_seconds" in r]
    later = [r for r in rounds if r["round"] >= 2] or rounds
    keep = {r["round"] for r in later}
    path = run_dir / ENGINE_TIMINGS
    lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    lines = [x for x in lines if x["round"] in keep]
    device = sum(x["device_s"] for x in lines)
    node = sum(x["node_s"] for x in lines)
    worker_s = sum(r["train_seconds"] for r in later) * actors
    return {
        "client_rounds": sum(x["users"] for x in lines),
        "device_s_per_client": device / max(1, sum(x["users"] for x in lines)),
        "node_overhead": 1 - device / node if node else None,
        "engine_overhead": 1 - device / worker_s if worker_s else None,
        "actors": actors,
    }


def scaling(
    out: Path, grid: list[tuple[int, int]], *, rounds: int = 2, model: str = "tiny"
) -> list[dict]:
    """Seconds per round and peak memory for (population, clients per round) pairs."""
    rows = []
    for population, per_round in grid:
        shares = per_round if per_round <= 11 else 11
        overrides = {
            "data.num-users": population,
            "data.min-lines": 5,
            "data.max-test-samples": 2,
            "train.local-steps": 2,
            "fraction-train": per_round / population,
            "fraction-evaluate": min(10, per_round) / population,
            "num-server-rounds": rounds,
            "privacy.epsilon-cap": 100.0,
            "dp.min-clients": max(2, per_round // 2),
            # SecAgg+ as designed for large rounds: each client shares its keys with a
            # neighbourhood (Shamir reconstruction is quadratic in the share count).
            # (Flower's neighbourhoods need an odd share count.)
            "secagg.num-shares": float(shares),
            "secagg.reconstruction-threshold": float(shares // 2 + 1),
        }
        if model != "tiny":
            overrides["model.name"] = model
        start = time.perf_counter()
        with PeakRSS() as mem:
            run_dir = simulate(
                "tiny", overrides, out, run_name=f"scale-{model}-{population}-{per_round}"
            )
        summary = json.loads((run_dir / "summary.json").read_text())
        later = summary["rounds"][1:] or summary["rounds"]
        rows.append(
            {
                "model": model,
                "population": population,
                "clients_per_round": per_round,
                "updates_last_round": summary["rounds"][-1].get("updates"),
                "seconds_per_round": statistics.fmean(r["seconds"] for r in later),
                "peak_rss_mib": mem.peak / 2**20,
                "wall_s": time.perf_counter() - start,
                "engine": engine_overhead(run_dir, actors=simulation_actors()),
            }
        )
    return rows


def simulation_actors(cpus_per_client: int = 1) -> int:
    """How many ClientApps Flower's simulation runs at once here (its Ray backend gives every
    core to the run and each ClientApp ``cpus_per_client`` of them)."""
    return max(1, (os.cpu_count() or 1) // cpus_per_client)


def growth_plot(rows: list[dict], path: Path) -> None:
    """Seconds per round and peak memory against clients per round, one line per model and
    population, on one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, mem_ax) = plt.subplots(1, 2, figsize=(10, 4))
    series: dict[str, list[dict]] = {}
    for row in rows:
        series.setdefault(f"{row.get('model', 'tiny')}, {row['population']} users", []).append(row)
    for label, points in series.items():
        points.sort(key=lambda p: p["clients_per_round"])
        x = [p["clients_per_round"] for p in points]
        time_ax.plot(x, [p["seconds_per_round"] for p in points], marker="o", label=label)
        mem_ax.plot(x, [p["peak_rss_mib"] / 1024 for p in points], marker="o", label=label)
    time_ax.set(xlabel="clients per round", ylabel="seconds per round", title="round time")
    mem_ax.set(xlabel="clients per round", ylabel="peak RSS, all processes (GiB)", title="memory")
    mem_ax.set_ylim(bottom=0)
    for ax in (time_ax, mem_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# What run_suite writes into its folder (an earlier suite's folder may be written again).
SUITE_FILES = frozenset({"bench.json", "bench.md", "bench_growth.png", "runs"})


def run_suite(out: Path, *, model: str, device: str, quick_scaling: bool = False) -> dict:
    """Every benchmark; returns the JSON-serializable results."""
    from simulations import bench_chat, bench_device, bench_privacy, bench_train

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


def markdown(r: dict) -> str:
    """The suite as one Markdown table (+ the scaling table)."""
    p, o = r["privacy_round"], r["privacy_opacus"]
    d = r["device_bench"] if "device_bench" in r else r["device"]
    rows = [
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
    if "training" in r:
        t = r["training"]
        best = t["paths"]["packed, bf16" if t["auto_precision"] == "bfloat16" else "packed, fp32"]
        old = t["paths"]["old loop (padded, fp32, full logits)"]
        rows += [
            (
                "training, real tokens/s: packed + auto precision / old bare loop",
                f"{best['real_tokens_per_s']:.0f} / {old['real_tokens_per_s']:.0f} = "
                f"**{best['ratio_to_old_loop']:.2f}×** ({best['of_fp32_peak']:.0%} of the fp32 "
                f"matmul peak, {best['of_bf16_peak']:.0%} of bf16's)",
            ),
            (
                "device round / the same bare loop",
                f"{t['paths']['device round (auto)']['real_tokens_per_s']:.0f} / "
                f"{best['real_tokens_per_s']:.0f} = **{t['device_over_bare']:.2f}×**",
            ),
        ]
    else:
        t = r["throughput"]
        rows.append(
            (
                "device round / bare peft loop, tokens/s",
                f"{t['device_tokens_per_s']:.0f} / {t['bare_tokens_per_s']:.0f} = "
                f"**{t['ratio_device_over_bare']:.2f}×**",
            )
        )
    rows += [
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
    if "chat" in r:
        from simulations import bench_chat

        rows += bench_chat.suite_rows(r["chat"])
    lines = ["| benchmark | result |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    if "training" in r:
        from simulations import bench_train

        lines += ["", bench_train.markdown(r["training"])]
    lines += [
        "",
        "| model | users | clients/round | s/round | peak RSS (MiB) | Device.train s/client "
        "| engine overhead (of which in the node) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {s.get('model', 'tiny')} | {s['population']} | {s['clients_per_round']} | "
        f"{s['seconds_per_round']:.1f} | {s['peak_rss_mib']:.0f} | {_engine_cells(s)} |"
        for s in r["scaling"]
    ]
    where = r["device"] if isinstance(r["device"], str) else d["device"]
    lines.append(f"\n{where} · {r['threads']} threads · total {r['total_s'] / 60:.1f} min")
    return "\n".join(lines)
