"""On-device benchmark: adapter hot-swap, one-feedback adaptation, state bytes per user.

Runs on the SmolLM2-135M shape (30 layers, hidden 576, LoRA r=4 on q,v; fedsa: A shared,
B personal): the real embedded model (``--model smollm2``) or a random model of the same
shape (``--model smollm2-shape``, for machines without the GGUF). Every comparison is measured
side by side in one run and printed as a ratio:

* hot-swap: in-place copy of the LoRA tensors (what the assistant does) vs peft's
  ``set_peft_model_state_dict`` vs reloading the base model and wrapping it again;
* one-feedback adaptation (1×64 tokens, the assistant's 3 SGD steps on the personal
  parameters): eager PyTorch, and on CUDA the same step replayed as a CUDA graph; the seed's
  target is < 100 ms;
* on-device state per user: the encrypted store on disk with the personal adapter, the global
  copy, a 3-round ledger and a learned profile, with 0 and 100 interactions (target < 1 MB).

    python -m benchmarks.device --model smollm2 --out bench-device
    python -m benchmarks.device --model smollm2-shape --device cuda --out bench-gpu
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

SMOLLM2_SHAPE = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}
SEQ = 64


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, *, repeats: int, warmup: int = 2) -> float:  # type: ignore[no-untyped-def]
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _base(model: str, device: torch.device, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    if model == "smollm2-shape":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).to(device, dtype).eval()
    from common.model import load_base_model

    return load_base_model(model, device=device).to(dtype).eval()


def _swap_times(  # type: ignore[no-untyped-def]
    peft_model, tensors: dict, model: str, device: torch.device, dtype: torch.dtype, cfg, strategy
) -> tuple[float, float, float]:
    """Milliseconds of three ways to put a user's adapter in place: in place, peft, reload."""
    from peft.utils import set_peft_model_state_dict

    from client.assistant.adapt import hot_swap
    from common.lora import build_peft_model

    swap_inplace = _timed(lambda: hot_swap(peft_model, tensors), device, repeats=20)
    peft_state = {n.replace(".default", ""): t.to(device) for n, t in tensors.items()}
    swap_peft = _timed(
        lambda: set_peft_model_state_dict(peft_model, peft_state), device, repeats=20
    )

    def reload() -> None:
        m = build_peft_model(_base(model, device, dtype), cfg, strategy)
        hot_swap(m, tensors)

    swap_reload = _timed(reload, device, repeats=3, warmup=1)
    return swap_inplace, swap_peft, swap_reload


def _feedback_example():  # type: ignore[no-untyped-def]
    """One feedback's sample: 1×64 tokens, a 16-token prompt and a 48-token answer."""
    from common.data import IGNORE_INDEX, Encoded

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, SMOLLM2_SHAPE["vocab_size"], (SEQ,), generator=g).tolist()
    return Encoded(tuple(ids), tuple([IGNORE_INDEX] * 16 + ids[16:]))


def _graph_results(  # type: ignore[no-untyped-def]
    peft_model, personal: list[str], tensors: dict, example, device: torch.device
) -> dict:
    """CUDA graph timings, its update's gap to the eager one and the peak GPU memory."""
    from client.assistant.adapt import GraphedAdapter, adapt_on_feedback, hot_swap

    pad = SMOLLM2_SHAPE["pad_token_id"]
    results: dict = {}
    graphed = GraphedAdapter(peft_model, personal, seq_len=SEQ, learning_rate=0.05, pad_id=pad)
    results["graph_capture_ms"] = graphed.capture_ms
    for steps in (1, 3):
        results[f"adapt_graph_{steps}step_ms"] = _timed(
            lambda s=steps: graphed.run(example, steps=s), device, repeats=50
        )
    # Correctness: the graph step and the eager step give the same update.
    hot_swap(peft_model, tensors)
    graphed.run(example, steps=1)
    params = dict(peft_model.named_parameters())
    after_graph = {n: params[n].detach().float().clone() for n in personal}
    hot_swap(peft_model, tensors)
    adapt_on_feedback(peft_model, personal, [example], steps=1, learning_rate=0.05, pad_id=pad)
    diff = max(float((params[n].detach().float() - after_graph[n]).abs().max()) for n in personal)
    results["graph_vs_eager_max_abs_diff"] = diff
    results["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return results


def _adapt_results(  # type: ignore[no-untyped-def]
    peft_model, personal: list[str], tensors: dict, device: torch.device
) -> dict:
    """One-feedback timings (eager; on CUDA also as a CUDA graph), in milliseconds."""
    from client.assistant.adapt import adapt_on_feedback, hot_swap

    example = _feedback_example()
    pad = SMOLLM2_SHAPE["pad_token_id"]
    hot_swap(peft_model, tensors)
    results: dict = {}
    for steps in (1, 3):
        results[f"adapt_eager_{steps}step_ms"] = _timed(
            lambda s=steps: adapt_on_feedback(
                peft_model, personal, [example], steps=s, learning_rate=0.05, pad_id=pad
            ),
            device,
            repeats=5 if device.type == "cpu" else 20,
        )
    if device.type == "cuda":
        results.update(_graph_results(peft_model, personal, tensors, example, device))
    return results


def bench(model: str, device_name: str, *, store: bool) -> dict:
    """Measure everything; returns a JSON-serializable dict."""
    from common.config import ModelConfig
    from common.lora import build_peft_model, init_lora_tensors, lora_shapes
    from common.personalization import get_strategy

    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    strategy = get_strategy("fedsa")
    cfg = ModelConfig(name=model if model != "smollm2-shape" else "smollm2")

    start = time.perf_counter()
    peft_model = build_peft_model(_base(model, device, dtype), cfg, strategy)
    _sync(device)
    load_ms = (time.perf_counter() - start) * 1000
    shapes = lora_shapes(peft_model)
    shared, personal, _ = strategy.split(list(shapes))
    tensors = init_lora_tensors(shapes, seed=1)
    tensors = {n: t + 0.01 * torch.randn_like(t) for n, t in tensors.items()}
    lora_params = sum(t.numel() for t in tensors.values())
    swap_inplace, swap_peft, swap_reload = _swap_times(
        peft_model, tensors, model, device, dtype, cfg, strategy
    )
    results = _adapt_results(peft_model, personal, tensors, device)
    out = {
        "model": model,
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "lora_params": lora_params,
        "personal_params": sum(tensors[n].numel() for n in personal),
        "shared_params": sum(tensors[n].numel() for n in shared),
        "base_load_ms": load_ms,
        "swap_inplace_ms": swap_inplace,
        "swap_set_peft_state_dict_ms": swap_peft,
        "swap_reload_base_ms": swap_reload,
        "ratio_reload_over_inplace": swap_reload / swap_inplace,
        "ratio_peft_over_inplace": swap_peft / swap_inplace,
        **results,
    }
    best = min(v for k, v in results.items() if k.startswith("adapt_") and "3step" in k)
    out["one_feedback_ms"] = best
    out["one_feedback_under_100ms"] = best < 100
    if store:
        out.update(store_bytes({n: tensors[n] for n in personal}, {n: tensors[n] for n in shared}))
    return out


def store_bytes(personal: dict, shared: dict) -> dict:
    """Bytes of one user's encrypted store on disk, with 0 and 100 interactions."""
    import numpy as np

    from client.assistant.profile import Profile
    from client.federation.ledger import PrivacyLedger
    from client.store import LocalStore
    from client.store.state import GLOBAL_BLOB, PERSONAL_BLOB, tensors_to_bytes
    from common.config import PrivacyCaps
    from common.crypto import Secret, create_key_file

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        key = create_key_file(Path(tmp) / "k.key")
        store = LocalStore.create(Path(tmp) / "dev", Secret(key_file=key))
        with store:
            store.put_blob(PERSONAL_BLOB, tensors_to_bytes(personal, {}))
            store.put_blob(GLOBAL_BLOB, tensors_to_bytes(shared, {}))
            ledger = PrivacyLedger(PrivacyCaps(epsilon_cap=10.0))
            for r in range(1, 4):
                ledger.charge(server_round=r, record=None, user=(7.1, 1.0, 1))
            ledger.save(store)
            profile = Profile(domains=["sailing", "history"])
            for _ in range(5):
                vec = rng.normal(size=384).astype(np.float32)
                profile.observe(response="a kept answer " * 10, embedding=vec, rating=5)
                profile.observe(response="a bad answer", embedding=-vec, rating=1)
            store.put_profile(profile.to_dict())
            blobs = store.blob_sizes()
            empty = store.size_bytes()
            for i in range(100):
                vec = rng.normal(size=384).astype(np.float32)
                iid = store.add_interaction(
                    f"question {i}: " + "how would you describe the sea at night? " * 2,
                    "answer: " + "the waves whisper under a silver moon. " * 6,
                    context={"time_of_day": "evening", "weekday": "Monday", "device": "laptop"},
                    embedding=vec / np.linalg.norm(vec),
                )
                if i % 3 == 0:
                    store.add_feedback(iid, "rating", value=5.0)
            full = store.size_bytes()
    return {
        "blob_bytes": blobs,
        "store_bytes_0_interactions": empty,
        "store_bytes_100_interactions": full,
        "bytes_per_interaction": (full - empty) / 100,
        "state_under_1mb": full < 1_000_000,
    }


def markdown(r: dict) -> str:
    """A Markdown table of the results."""
    rows = [
        ("adapter hot-swap, in place", f"{r['swap_inplace_ms']:.2f} ms"),
        (
            "  vs set_peft_model_state_dict",
            f"{r['swap_set_peft_state_dict_ms']:.2f} ms ({r['ratio_peft_over_inplace']:.1f}×)",
        ),
        (
            "  vs reloading the base model",
            f"{r['swap_reload_base_ms']:.0f} ms ({r['ratio_reload_over_inplace']:.0f}×)",
        ),
        ("one feedback, eager, 1 step", f"{r['adapt_eager_1step_ms']:.1f} ms"),
        ("one feedback, eager, 3 steps", f"{r['adapt_eager_3step_ms']:.1f} ms"),
    ]
    if "adapt_graph_3step_ms" in r:
        rows += [
            ("one feedback, CUDA graph, 1 step", f"{r['adapt_graph_1step_ms']:.1f} ms"),
            (
                "one feedback, CUDA graph, 3 steps",
                f"{r['adapt_graph_3step_ms']:.1f} ms "
                f"({r['adapt_eager_3step_ms'] / r['adapt_graph_3step_ms']:.1f}× faster than eager)",
            ),
            ("graph vs eager update, max abs diff", f"{r['graph_vs_eager_max_abs_diff']:.2e}"),
        ]
    rows.append(("one feedback < 100 ms", "yes" if r["one_feedback_under_100ms"] else "no"))
    if "store_bytes_0_interactions" in r:
        rows += [
            ("store per user, 0 interactions", f"{r['store_bytes_0_interactions']:,} B"),
            ("store per user, 100 interactions", f"{r['store_bytes_100_interactions']:,} B"),
            ("state < 1 MB", "yes" if r["state_under_1mb"] else "no"),
        ]
    head = f"{r['model']} on {r['device']} ({r['dtype']}, {r['threads']} threads)"
    lines = [f"| {head} | |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 | smollm2-shape | tiny")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--no-store", action="store_true", help="skip the store-size part")
    parser.add_argument("--out", type=Path, default=Path("bench-device"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    result = bench(args.model, args.device, store=not args.no_store)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_device.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (args.out / "bench_device.md").write_text(table + "\n")
    print(json.dumps(result, indent=1))
    print(table)


if __name__ == "__main__":
    main()
