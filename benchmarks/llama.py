"""llama.cpp against the bf16 serving copy, side by side in one run, with a device's adapters.

One process loads the default model (the embedded SmolLM2) once as the assistant does, puts
non-zero adapters into it (every LoRA tensor of the device's strategy: the global and the
personal ones, B drawn at the scale trained adapters reach), and answers the assistant's
rendered prompt (a short conversation under the personalized system prompt) with:

* **llama.cpp** — :class:`client.assistant.llama_path.LlamaPath` over the shipped Q4_1 GGUF,
  the adapters converted as the device converts them;
* **the bf16 copy** — :class:`common.serving.ServingCopy`, today's torch path (forced even
  where the CPU lacks native bf16, as ``precision="bfloat16"`` does).

For each: 3 candidates of exactly 64 tokens (median of ``--repeats``); the first streamed token
of one answer with the prompt computed from nothing, and with the prompt's cells already there
(the next turn of a conversation); one answer's decoding speed; the bytes of weights one
decoding step reads, beside the machine's copy bandwidth measured here. Then the user's wait
through llama.cpp: ``Assistant.ask`` with 3 × 64 tokens (what ``device ask`` does once
loaded) and the same through the OpenAI-compatible API; the serving process's memory at each
step.

    python -m benchmarks.llama --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

MAX_TOKENS = 64


def _rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def copy_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """The machine's memory bandwidth (GB/s) as a NumPy copy moves it: bytes read + written."""
    src = np.ones(mib * 2**20 // 8)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return 2 * src.nbytes / min(times) / 1e9


def device_adapters(rt: Any, scale: float = 0.02, seed: int = 0) -> dict[str, torch.Tensor]:
    """Non-zero adapters, hot-swapped into ``rt``'s model: every LoRA B drawn N(0, scale²)
    (trained SmolLM2 adapters of this project sit around 0.01–0.03), A as initialized."""
    from client.assistant.adapt import hot_swap

    gen = torch.Generator().manual_seed(seed)
    tensors = {
        n: (torch.randn(t.shape, generator=gen) * scale if ".lora_B." in n else t)
        for n, t in rt.init.items()
    }
    hot_swap(rt.model, tensors)
    return tensors


def _timed(fn: Any, repeats: int) -> list[float]:
    fn(0)  # warm-up
    out = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i + 1)
        out.append(time.perf_counter() - start)
    return out


def _first_piece(generate: Any, repeats: int, reset: Any) -> float:
    """Median seconds from the call to the first streamed piece (``reset`` before each)."""
    times = []
    for i in range(repeats + 1):
        reset()
        start = time.perf_counter()
        first: list[float] = []

        def on_text(_piece: str, first: list[float] = first, start: float = start) -> None:
            if not first:
                first.append(time.perf_counter() - start)

        generate(i, on_text)
        times.append(first[0] if first else float("nan"))
    return statistics.median(times[1:])


def _engines(rt: Any, prompt: list[int], repeats: int) -> dict[str, Any]:
    """Both engines on ``prompt`` with ``rt``'s current adapters."""
    from client.assistant.engine import build_messages
    from client.assistant.llama_path import LlamaPath
    from client.assistant.profile import Profile
    from common.generation import render, sample
    from common.llama_serving import common_prefix
    from common.serving import ServingCopy

    copy = ServingCopy(rt.model)
    llama = LlamaPath.open(
        rt.model, rt.tokenizer, "smollm2", n_ctx=rt.model.config.max_position_embeddings
    )
    key = llama.ready()
    assert key is not None
    tok = rt.tokenizer
    foods = ("rice", "lentils", "eggs", "leeks", "pasta", "beans", "kale", "tofu", "figs")
    questions = [
        render(tok, build_messages(Profile(), f"What could I cook with {f}?")) for f in foods
    ]
    # What the assistant warms while idle (Assistant._warm_llama): all that questions share.
    system = questions[0][: common_prefix(questions[0], questions[1])]

    def torch_gen(n: int, seed: int, tokens: int, on_text: Any = None) -> None:
        sample(copy.refresh(), tok, [prompt], n=n, max_new_tokens=tokens, min_new_tokens=tokens,
               seed=seed, on_text=on_text)  # fmt: skip

    def llama_gen(n: int, seed: int, tokens: int, on_text: Any = None, ids: Any = None) -> None:
        llama.generate(key, ids or prompt, n=n, max_new_tokens=tokens, min_new_tokens=tokens,
                       temperature=0.8, seed=seed, on_text=on_text)  # fmt: skip

    def warmed() -> None:  # a new question after the system prompt was computed while idle
        llama.engine.forget()
        llama.engine.warm(system, adapter=key)

    out: dict[str, Any] = {"llama_parity_kl": llama.kl}
    for name, gen, reset in (
        ("llama.cpp", llama_gen, llama.engine.forget),
        ("bf16 copy", torch_gen, lambda: None),
    ):
        three = _timed(lambda i, gen=gen: gen(3, i, MAX_TOKENS), repeats)
        one = _timed(lambda i, gen=gen: gen(1, i, MAX_TOKENS), repeats)
        out[name] = {
            "three_candidates_s": statistics.median(three),
            "three_candidates_runs_s": three,
            "one_answer_tokens_per_s": MAX_TOKENS / statistics.median(one),
            "first_token_cold_s": _first_piece(
                lambda i, cb, gen=gen: gen(1, i, 1, cb), repeats, reset
            ),
        }
    ll = out["llama.cpp"]
    ll["first_token_new_question_s"] = _first_piece(
        lambda i, cb: llama_gen(1, i, 1, cb, ids=questions[i % len(questions)]), repeats, warmed
    )
    # The same conversation asked again: its cells kept, only the last token computed.
    ll["first_token_warm_s"] = _first_piece(
        lambda i, cb: llama_gen(1, i, 1, cb), repeats, lambda: None
    )
    ll["weight_bytes_per_step"] = llama.engine.weight_bytes
    out["bf16 copy"]["weight_bytes_per_step"] = sum(
        p.numel() * p.element_size() for p in copy.model.parameters()
    )
    llama.close()
    return out


def _user_wait(repeats: int) -> dict[str, Any]:
    """``Assistant.ask`` and the API with 3 × 64 tokens, through the default engine."""
    import openai

    from benchmarks.chat import CONVERSATION, _new_store
    from client.api.app import create_app, serve_in_background
    from client.assistant.assistant import Assistant
    from client.assistant.model_thread import MODEL_THREAD
    from common.gguf_lora import snapshot

    with tempfile.TemporaryDirectory(prefix="fp-bench-llama-") as tmp:
        store = _new_store(Path(tmp), "smollm2")
        start = time.perf_counter()
        assistant = MODEL_THREAD.call(Assistant, store)
        load_s = time.perf_counter() - start
        # The device's own adapters, kept in its store: the federation's and its personal ones.
        tensors = device_adapters(assistant.rt)
        assistant.state.save_global({n: tensors[n] for n in assistant.rt.shared_names})
        assistant.state.save_personal({n: tensors[n] for n in assistant.rt.personal_names})
        MODEL_THREAD.call(assistant.activate)
        if assistant.llama is not None:
            assistant.llama.wait()
        # What answers is not a zero adapter: the norm of Σ ΔW = B·A over the adapted weights.
        delta_norm = sum(float((b @ a).norm()) for a, b in snapshot(assistant.rt.model).values())
        ask = _timed(
            lambda i: MODEL_THREAD.call(
                assistant.ask, CONVERSATION, n=3, max_new_tokens=MAX_TOKENS, seed=i,
            ),
            repeats,
        )  # fmt: skip
        token = store.get_meta("api_token")
        with serve_in_background(create_app(assistant, token=token)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0)
            api = _timed(
                lambda i: client.chat.completions.create(
                    model="fedpersona", messages=CONVERSATION, max_tokens=MAX_TOKENS,
                    seed=i,
                    extra_body={"candidates": 3},
                ),
                repeats,
            )  # fmt: skip
        engine = "llama.cpp" if assistant.llama is not None else "torch"
        store.close()
    return {
        "engine": engine,
        "variant": assistant.variant,
        "adapter_delta_norm": delta_norm,
        "assistant_load_s": load_s,
        "ask_three_s": statistics.median(ask),
        "api_three_s": statistics.median(api),
        "ask_runs_s": ask,
        "api_runs_s": api,
    }


def serving_rss(engine: str) -> dict[str, float]:
    """A fresh device process answering once through ``engine`` (``llama.cpp``, or ``torch``
    with the bf16 copy): its resident memory after the answer and at its peak (MiB)."""
    import resource

    from benchmarks.chat import CONVERSATION, _new_store
    from client.assistant.assistant import Assistant

    with tempfile.TemporaryDirectory(prefix="fp-bench-llama-rss-") as tmp:
        store = _new_store(Path(tmp), "smollm2")
        precision = "bfloat16" if engine == "torch" else None
        assistant = Assistant(store, engine=engine, precision=precision)
        assistant.ask(CONVERSATION, n=3, max_new_tokens=MAX_TOKENS, seed=0)
        if assistant.llama is not None:
            assistant.llama.wait()
        assistant.ask(CONVERSATION, n=3, max_new_tokens=MAX_TOKENS, seed=1)
        store.close()
    return {
        "rss_mib": _rss_mib(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _rss_of(engine: str) -> dict[str, float]:
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.llama", "--serving-rss", engine],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(repeats: int = 5) -> dict[str, Any]:
    """Run the benchmark; JSON-serializable results."""
    from benchmarks.chat import CONVERSATION
    from client.assistant.engine import build_messages
    from client.assistant.profile import Profile
    from client.federation.runtime import get_runtime
    from common.config import parse_run_config
    from common.generation import render

    bandwidth = copy_bandwidth()
    rt = get_runtime(parse_run_config({"model.name": "smollm2"}), serving="float32")
    device_adapters(rt)
    messages = build_messages(Profile(), CONVERSATION[-1]["content"], turns=CONVERSATION[:-1])
    prompt = render(rt.tokenizer, messages)
    engines = _engines(rt, prompt, repeats)
    engines["serving_process"] = {e: _rss_of(e) for e in ("llama.cpp", "torch")}
    wait = _user_wait(repeats)
    llama, bf16 = engines["llama.cpp"], engines["bf16 copy"]
    for row in (llama, bf16):
        step = 1 / row["one_answer_tokens_per_s"]
        row["weights_gb_per_s"] = row["weight_bytes_per_step"] / step / 1e9
    return {
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip(),  # fmt: skip
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "prompt_tokens": len(prompt),
        "copy_bandwidth_gb_per_s": bandwidth,
        **engines,
        "ratio_three_candidates_bf16_over_llama": bf16["three_candidates_s"]
        / llama["three_candidates_s"],
        "ratio_first_token_bf16_over_llama": bf16["first_token_cold_s"]
        / llama["first_token_cold_s"],
        "user_wait": wait,
    }


def markdown(r: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    ll, bf, w = r["llama.cpp"], r["bf16 copy"], r["user_wait"]
    rows = [
        ("3 candidates × exactly 64 tokens: bf16 copy / llama.cpp",
         f"{bf['three_candidates_s']:.2f} s / {ll['three_candidates_s']:.2f} s = "
         f"**{r['ratio_three_candidates_bf16_over_llama']:.2f}×** (target ≥ 3×)"),
        ("first streamed token, prompt from nothing: bf16 copy / llama.cpp",
         f"{bf['first_token_cold_s'] * 1000:.0f} ms / {ll['first_token_cold_s'] * 1000:.0f} ms"),
        ("first streamed token, a new question, the system prompt computed while idle: llama.cpp",
         f"{ll['first_token_new_question_s'] * 1000:.0f} ms (target ≤ 50 ms)"),
        ("first streamed token, the same conversation again (its cells kept): llama.cpp",
         f"{ll['first_token_warm_s'] * 1000:.0f} ms"),
        ("one answer's decoding: bf16 copy / llama.cpp",
         f"{bf['one_answer_tokens_per_s']:.1f} / {ll['one_answer_tokens_per_s']:.1f} tokens/s"),
        ("weights read per step: bf16 copy / llama.cpp",
         f"{bf['weight_bytes_per_step'] / 1e6:.0f} MB ({bf['weights_gb_per_s']:.2f} GB/s) / "
         f"{ll['weight_bytes_per_step'] / 1e6:.0f} MB ({ll['weights_gb_per_s']:.2f} GB/s); "
         f"the machine copies {r['copy_bandwidth_gb_per_s']:.2f} GB/s"),
        (f"`Assistant.ask` (what `device ask` runs), 3 × ≤ 64 tokens, through {w['engine']} "
         f"({w['variant']} model, Σ‖ΔW‖ {w['adapter_delta_norm']:.2f})",
         f"{w['ask_three_s']:.2f} s (target ≤ 2.5 s)"),
        ("the OpenAI-compatible API, 3 candidates × ≤ 64 tokens",
         f"{w['api_three_s']:.2f} s (target ≤ 2.5 s)"),
        ("a device's serving process after two answers, RSS (peak): llama.cpp / bf16 copy",
         f"{r['serving_process']['llama.cpp']['rss_mib']:.0f} MiB "
         f"({r['serving_process']['llama.cpp']['peak_rss_mib']:.0f}) / "
         f"{r['serving_process']['torch']['rss_mib']:.0f} MiB "
         f"({r['serving_process']['torch']['peak_rss_mib']:.0f})"),
        ("llama.cpp's start-up parity (KL to torch fp32, nats/token)",
         f"{r['llama_parity_kl']:.4f}"),
    ]  # fmt: skip
    lines = ["| answering, smollm2 with a device's adapters | result |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    lines.append(
        f"\n{r['prompt_tokens']} prompt tokens · {r['threads']} threads · median of "
        f"{r['repeats']} · commit {r['commit']}"
    )
    return "\n".join(lines)


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-llama"))
    parser.add_argument("--serving-rss", choices=("llama.cpp", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    from common.model import quiet_transformers

    quiet_transformers()
    if args.serving_rss:  # the child process of serving_rss
        print(json.dumps(serving_rss(args.serving_rss)))
        return
    result = bench(args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_llama_{result['commit']}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{stem}.md").write_text(markdown(result) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
