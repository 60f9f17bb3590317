"""K clients' training rounds batched through one base against the same rounds one by one.

``python -m benchmarks.batched --model smollm2 --clients 8`` (on the GPU where there
is one) trains K simulated users' personal tensors (their own Shakespeare roles, batches and
seeds) for a few steps, first each alone with :func:`common.train.train_steps`, then all at
once with :func:`common.multi_lora.train_steps_batched`, and prints real training tokens/s
of both, their ratio, and how far each client's batched update is from its solo one (cosine
and relative L2 gap: the same steps to ~1e-6 in fp32; under bf16 rounding, Adam's ±lr steps
on elements with near-zero gradients may go either way, so the gap is larger there). Both
paths run in ``train.precision = "auto"`` on the same model.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch


def _client_jobs(cfg, rt, clients: int) -> list:  # type: ignore[no-untyped-def]
    """One job per simulated user: its own samples, perturbed start tensors and seed."""
    from common.data import encode, user_for_partition
    from common.multi_lora import ClientJob

    jobs = []
    for k in range(clients):
        user = user_for_partition(
            k,
            clients,
            min_lines=cfg.data.min_lines,
            seed=cfg.seed,
            test_fraction=cfg.data.test_fraction,
        )
        samples = [encode(s, rt.tokenizer, cfg.data.max_seq_len) for s in user.train]
        gen = torch.Generator().manual_seed(k)
        tensors = {n: t + 0.01 * torch.randn(t.shape, generator=gen) for n, t in rt.init.items()}
        jobs.append(
            ClientJob(tensors=tensors, samples=samples, seed=random.Random(k).randrange(1 << 30))
        )
    return jobs


def _sync(device: str) -> None:
    """Wait for the GPU's queued work where ``device`` is CUDA; returns nothing."""
    if device == "cuda":
        torch.cuda.synchronize()


def _solo_rounds(  # type: ignore[no-untyped-def]
    model, trainable: list[str], jobs: list, *, steps: int, bs: int, lr: float, pad_id: int
) -> list[dict]:
    """Each job's LoRA tensors after its round trained alone with ``train_steps``."""
    from common.lora import get_lora_tensors, load_lora_tensors
    from common.train import train_steps

    solo = []
    for job in jobs:
        load_lora_tensors(model, job.tensors)
        train_steps(
            model,
            trainable,
            job.samples,
            steps=steps,
            batch_size=bs,
            learning_rate=lr,
            seed=job.seed,
            pad_id=pad_id,
        )
        solo.append(get_lora_tensors(model, trainable))
    return solo


def _real_tokens(jobs: list, *, steps: int, bs: int) -> int:
    """The tokens both paths trained on (the batches each client's seed draws)."""
    tokens = 0
    for job in jobs:
        rng = random.Random(job.seed)
        for _ in range(steps * bs):
            tokens += len(job.samples[rng.randrange(len(job.samples))].input_ids)
    return tokens


def _update_agreement(  # type: ignore[no-untyped-def]
    jobs: list, solo: list[dict], batched: list[dict], trainable: list[str]
) -> tuple[list[float], list[float]]:
    """Each client's update (after − before), batched against solo: cosines, relative gaps."""
    cosines, gaps = [], []
    for k, job in enumerate(jobs):
        start_k = torch.cat([job.tensors[n].flatten() for n in trainable])
        d_solo = torch.cat([solo[k][n].flatten() for n in trainable]) - start_k
        d_batched = torch.cat([batched[k][n].flatten() for n in trainable]) - start_k
        cosines.append(float(torch.nn.functional.cosine_similarity(d_solo, d_batched, dim=0)))
        gaps.append(float((d_batched - d_solo).norm() / d_solo.norm()))
    return cosines, gaps


def bench(model_name: str, *, clients: int = 8, steps: int = 4) -> dict:
    """Real tokens/s of K solo rounds and of the same rounds batched (see the module docstring)."""
    from client.federation.runtime import get_runtime
    from common.config import parse_run_config
    from common.lora import load_lora_tensors
    from common.multi_lora import train_steps_batched
    from common.train import cpu_training_dtype, train_steps

    cfg = parse_run_config(
        {
            "model.name": model_name,
            "data.num-users": clients,
            "train.batch-size": 4,
            "data.max-seq-len": 96,
        }
    )
    rt = get_runtime(cfg)  # on the GPU where there is one (common.model.load_base_for)
    model, tok = rt.model, rt.tokenizer
    device = next(model.parameters()).device.type
    trainable = list(rt.personal_names) or list(rt.trainable_names)
    jobs = _client_jobs(cfg, rt, clients)
    lr, bs = cfg.train.learning_rate, cfg.train.batch_size
    # Warm-up: the precision choice and kernels, on both paths.
    load_lora_tensors(model, jobs[0].tensors)
    train_steps(
        model,
        trainable,
        jobs[0].samples,
        steps=1,
        batch_size=bs,
        learning_rate=lr,
        seed=0,
        pad_id=tok.pad_token_id,
    )
    train_steps_batched(model, trainable, jobs[:2], steps=1, batch_size=bs, learning_rate=lr)
    _sync(device)
    start = time.perf_counter()
    solo = _solo_rounds(model, trainable, jobs, steps=steps, bs=bs, lr=lr, pad_id=tok.pad_token_id)
    _sync(device)
    solo_s = time.perf_counter() - start
    start = time.perf_counter()
    batched, _ = train_steps_batched(
        model, trainable, jobs, steps=steps, batch_size=bs, learning_rate=lr
    )
    _sync(device)
    batched_s = time.perf_counter() - start
    tokens = _real_tokens(jobs, steps=steps, bs=bs)
    cosines, gaps = _update_agreement(jobs, solo, batched, trainable)
    return {
        "model": model_name,
        "device": device,
        "clients": clients,
        "steps": steps,
        "real_tokens": tokens,
        "solo_tokens_per_s": tokens / solo_s,
        "batched_tokens_per_s": tokens / batched_s,
        "ratio": solo_s / batched_s,
        "min_update_cosine": min(cosines),
        "max_update_gap": max(gaps),
        "precision": str(cpu_training_dtype(model) or "cuda autocast"),
        "threads": torch.get_num_threads(),
    }


def markdown(r: dict) -> str:
    return (
        f"| {r['model']} on {r['device']} | {r['clients']} clients × {r['steps']} steps | "
        f"{r['solo_tokens_per_s']:.0f} | {r['batched_tokens_per_s']:.0f} | "
        f"**{r['ratio']:.2f}×** | {r['min_update_cosine']:.4f} / {r['max_update_gap']:.1e} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    r = bench(args.model, clients=args.clients, steps=args.steps)
    print(json.dumps(r, indent=1))
    print(
        "| model | round | solo tokens/s | batched tokens/s | ratio "
        "| update vs solo: min cosine / max relative gap |"
    )
    print("|---|---|---|---|---|---|")
    print(markdown(r))


if __name__ == "__main__":
    main()
