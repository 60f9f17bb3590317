"""Answering benchmark: what a user of ``fedpersona device serve`` waits for, through the API.

A real ``device serve`` app (uvicorn on 127.0.0.1) over a fresh encrypted store, driven by the
official ``openai`` client as a chat UI drives it; every figure is the median of ``--repeats``
requests after one warm-up, measured in one run:

* **first token**: from sending a streamed request (a short conversation: user, assistant,
  user) to the first piece of the answer — against the model alone computing the same prompt
  and its first token (``model.generate``, 1 new token): the ratio is the API's overhead
  (retrieval, prompt building, adapter choice, HTTP);
* **whole answer**: the same request to the end (≤ 64 tokens), with tokens/s;
* **3 candidates**: a non-streamed answer with 3 candidates of ≤ 64 tokens, reranked;
* **one feedback**: ``POST /v1/feedback`` with a preferred answer (adapts the personal model);
* **old path / now**: 3 candidates (their generation in tokens/s: sampled answers differ in
  length) and one feedback called directly, on this path (bf16
  answers where the CPU has native bf16, feedback through the top layers) and on the old one
  (fp32 answers, feedback through every layer with a separate scoring pass).

    python -m benchmarks.chat --model smollm2 --out runs/bench-chat
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

CONVERSATION = [
    {"role": "user", "content": "I'm planning dinner for two tonight."},
    {"role": "assistant", "content": "Lovely! Do you have any ingredients in mind?"},
    {"role": "user", "content": "Mushrooms and rice. What could I cook?"},
]


def _new_store(tmp: Path, model: str):  # type: ignore[no-untyped-def]
    """A fresh encrypted device store under ``tmp``, set up for ``model``."""
    from client.store import LocalStore
    from client.store.state import init_device
    from common.crypto import Secret, create_key_file

    root = tmp / "dev"
    root.mkdir(mode=0o700)
    key = tmp / "key"
    create_key_file(key)
    store = LocalStore.open(root, Secret(key_file=key), create=True)
    init_device(store, model=model)
    return store


def _streamed(client, seed: int, max_tokens: int) -> dict:  # type: ignore[no-untyped-def]
    """Seconds to the first piece and to the end of one streamed answer, and its tokens."""
    start = time.perf_counter()
    first = None
    text = ""
    usage = None
    for chunk in client.chat.completions.create(
        model="fedpersona",
        messages=CONVERSATION,
        max_tokens=max_tokens,
        seed=seed,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - start
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            usage = chunk.usage
    total = time.perf_counter() - start
    return {
        "first_s": first if first is not None else total,
        "total_s": total,
        "tokens": usage.completion_tokens if usage else 0,
        "prompt_tokens": usage.prompt_tokens if usage else 0,
    }


def _candidates(client, seed: int, max_tokens: int) -> float:  # type: ignore[no-untyped-def]
    """Seconds of one non-streamed answer with 3 candidates, reranked."""
    start = time.perf_counter()
    client.chat.completions.create(
        model="fedpersona",
        messages=CONVERSATION,
        max_tokens=max_tokens,
        seed=seed,
        extra_body={"candidates": 3},
    )
    return time.perf_counter() - start


def _feedbacks(client, iid: int, repeats: int) -> list[float]:  # type: ignore[no-untyped-def]
    """Seconds of each of ``repeats`` ``POST /v1/feedback`` with a preferred answer."""
    feedback = []
    for i in range(repeats):
        start = time.perf_counter()
        client.post(
            "/feedback",
            cast_to=object,
            body={"interaction_id": iid, "preferred": f"Try a mushroom risotto ({i})."},
        )
        feedback.append(time.perf_counter() - start)
    return feedback


def _over_api(  # type: ignore[no-untyped-def]
    assistant, token: str, repeats: int, max_tokens: int
) -> tuple[list[dict], list[float], list[float], float]:
    """``(streamed runs, 3-candidate seconds, feedback seconds, bare first token)`` via the API."""
    import openai

    from client.api.app import create_app, serve_in_background
    from client.assistant.model_thread import MODEL_THREAD

    with serve_in_background(create_app(assistant, token=token)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0)
        _streamed(client, 0, max_tokens)  # warm-up
        runs = [_streamed(client, i + 1, max_tokens) for i in range(repeats)]
        _candidates(client, 0, max_tokens)
        three = [_candidates(client, i + 1, max_tokens) for i in range(repeats)]
        feedback = _feedbacks(client, assistant.store.count_interactions(), repeats)
        bare = MODEL_THREAD.call(_bare_first_token, assistant)
    return runs, three, feedback, bare


def _path_ratios(paths: dict) -> dict:
    """This path against the old one: candidate speed, full candidates and feedback."""
    now, old = paths["now"], paths["old (fp32 answers, all-layer feedback)"]
    return {
        "ratio_candidate_speed_now_over_old": now["three_candidates_tokens_per_s"]
        / old["three_candidates_tokens_per_s"],
        "ratio_full_candidates_old_over_now": old["three_full_candidates_s"]
        / now["three_full_candidates_s"],
        "ratio_feedback_old_over_now": old["feedback_s"] / now["feedback_s"],
    }


def bench(model: str = "smollm2", *, repeats: int = 5, max_tokens: int = 64) -> dict:
    """Run the answering benchmark; returns the JSON-serializable results."""
    from client.assistant.assistant import Assistant
    from client.assistant.model_thread import MODEL_THREAD

    with tempfile.TemporaryDirectory(prefix="fp-bench-chat-") as tmp:
        store = _new_store(Path(tmp), model)
        t0 = time.perf_counter()
        assistant = MODEL_THREAD.call(Assistant, store)  # as `device serve` builds it
        load_s = time.perf_counter() - t0
        token = store.get_meta("api_token")
        runs, three, feedback, bare = _over_api(assistant, token, repeats, max_tokens)
        # The same work without the HTTP layer, on the model thread: this path and the old one
        # (fp32 answers, feedback through every layer with a separate scoring pass).
        paths = {
            "now": MODEL_THREAD.call(_direct, assistant, repeats, max_tokens),
            "old (fp32 answers, all-layer feedback)": MODEL_THREAD.call(
                _direct,
                Assistant(store, precision="float32", feedback_layers=None, engine="torch"),
                repeats,
                max_tokens,
            ),
        }
        store.close()
    first = statistics.median(r["first_s"] for r in runs)
    total = statistics.median(r["total_s"] for r in runs)
    tokens = statistics.median(r["tokens"] for r in runs)
    return {
        "model": model,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "max_tokens": max_tokens,
        "load_s": load_s,
        "prompt_tokens": runs[0]["prompt_tokens"],
        "first_token_s": first,
        "bare_first_token_s": bare,
        "ratio_first_token_over_bare": first / bare,
        "answer_s": total,
        "answer_tokens": tokens,
        "answer_tokens_per_s": tokens / total if total else 0.0,
        "three_candidates_s": statistics.median(three),
        "feedback_s": statistics.median(feedback),
        "answers_in_bf16": assistant.served is not None,
        "answers_through": "llama.cpp" if assistant.llama is not None else "torch",
        "paths": paths,
        **_path_ratios(paths),
        "runs": runs,
    }


def _direct(assistant, repeats: int, max_tokens: int) -> dict:  # type: ignore[no-untyped-def]
    """3 candidates of exactly ``max_tokens`` tokens from the model that answers (one
    prefill, shared KV cache), then ``ask`` with 3 candidates and one feedback called on
    ``assistant`` directly (medians; sampled answers differ in length from path to path, so
    ``ask``'s generation is compared in tokens/s)."""
    from common.generation import render, sample

    assistant.ask(CONVERSATION, n=3, max_new_tokens=max_tokens, seed=0)  # warm-up
    three, speed, feedback, forced = [], [], [], []
    model = assistant.rt.model if assistant.served is None else assistant.served.refresh()
    prompt = render(assistant.rt.tokenizer, CONVERSATION)
    key = None if assistant.llama is None else assistant.llama.ready()
    for i in range(repeats):  # 3 candidates of exactly max_tokens tokens: the figure
        start = time.perf_counter()
        if key is not None:  # what answers: llama.cpp where it does
            assistant.llama.generate(key, prompt, n=3, max_new_tokens=max_tokens,
                                     min_new_tokens=max_tokens, temperature=0.8,
                                     seed=i)  # fmt: skip
        else:
            sample(model, assistant.rt.tokenizer, [prompt], n=3, max_new_tokens=max_tokens,
                   min_new_tokens=max_tokens, seed=i)  # fmt: skip
        forced.append(time.perf_counter() - start)
    for i in range(repeats):
        start = time.perf_counter()
        answer = assistant.ask(CONVERSATION, n=3, max_new_tokens=max_tokens, seed=i + 1)
        three.append(time.perf_counter() - start)
        speed.append(answer.completion_tokens / (answer.timings_ms["generate"] / 1000))
        start = time.perf_counter()
        assistant.feedback(answer.interaction_id, preferred=f"Try a mushroom risotto ({i}).")
        feedback.append(time.perf_counter() - start)
    return {
        "three_full_candidates_s": statistics.median(forced),
        "three_candidates_s": statistics.median(three),
        "three_candidates_tokens_per_s": statistics.median(speed),
        "feedback_s": statistics.median(feedback),
    }


@torch.no_grad()
def _bare_first_token(assistant, repeats: int = 5) -> float:  # type: ignore[no-untyped-def]
    """The model alone (the one that answers: llama.cpp, or the bf16 serving copy where
    there is one): the same rendered prompt, prefill + one sampled token (median)."""
    from client.assistant.engine import build_messages

    tok = assistant.rt.tokenizer
    messages = build_messages(
        assistant.profile, CONVERSATION[-1]["content"], turns=CONVERSATION[:-1]
    )
    ids = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    times = []
    if assistant.llama is not None and (key := assistant.llama.ready()) is not None:
        prompt = ids["input_ids"][0].tolist()
        for _ in range(repeats + 1):  # the prompt computed from nothing each time
            assistant.llama.engine.use(None)
            start = time.perf_counter()
            assistant.llama.generate(key, prompt, n=1, max_new_tokens=1, temperature=0.8)
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])
    model = assistant.rt.model if assistant.served is None else assistant.served.refresh()
    for _ in range(repeats + 1):
        start = time.perf_counter()
        model.generate(**ids, do_sample=True, max_new_tokens=1, pad_token_id=assistant.pad_id)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def markdown(r: dict) -> str:
    """The results as a Markdown table."""
    rows = [
        (
            "first streamed token (short conversation) / the model alone",
            f"{r['first_token_s']:.2f} s / {r['bare_first_token_s']:.2f} s = "
            f"**{r['ratio_first_token_over_bare']:.2f}×** (target ≤ 1.5 s)",
        ),
        (
            f"whole streamed answer (≤ {r['max_tokens']} tokens)",
            f"{r['answer_s']:.2f} s for {r['answer_tokens']:.0f} tokens "
            f"({r['answer_tokens_per_s']:.1f} tokens/s)",
        ),
        (
            f"3 candidates × ≤ {r['max_tokens']} tokens, reranked",
            f"{r['three_candidates_s']:.2f} s",
        ),
        ("one feedback (preferred answer, adapts)", f"{r['feedback_s'] * 1000:.0f} ms"),
    ]
    if "paths" in r:
        now, old = r["paths"]["now"], r["paths"]["old (fp32 answers, all-layer feedback)"]
        rows += [
            (
                f"3 candidates of exactly {r['max_tokens']} tokens: old path / now",
                f"{old['three_full_candidates_s']:.2f} s / {now['three_full_candidates_s']:.2f} s"
                f" = **{r['ratio_full_candidates_old_over_now']:.2f}×** (target ≤ 6 s)",
            ),
            (
                "3 candidates generated, without HTTP: now / old path",
                f"{now['three_candidates_tokens_per_s']:.1f} / "
                f"{old['three_candidates_tokens_per_s']:.1f} tokens/s = "
                f"**{r['ratio_candidate_speed_now_over_old']:.2f}×**",
            ),
            (
                "one feedback, without HTTP: old path / now",
                f"{old['feedback_s'] * 1000:.0f} ms / {now['feedback_s'] * 1000:.0f} ms = "
                f"**{r['ratio_feedback_old_over_now']:.2f}×** (target ≤ 500 ms)",
            ),
        ]
    lines = ["| answering | result |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    lines.append(
        f"\n{r['model']} · {r['prompt_tokens']} prompt tokens · {r['threads']} threads · "
        f"median of {r['repeats']} · answers through "
        f"{r.get('answers_through', 'torch')} "
        f"({'bf16' if r.get('answers_in_bf16') else 'fp32'} torch)"
    )
    return "\n".join(lines)


def bench_in_fresh_process(model: str = "smollm2", *, repeats: int = 5) -> dict:
    """:func:`bench` in a new Python process, as ``device serve`` runs: there the model
    thread is the only one that ever computes. In a process whose main thread already ran
    torch (the rest of the suite), the two threads' OpenMP teams slow each other 1.4–2×."""
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(prefix="fp-bench-chat-out-") as out:
        cmd = [sys.executable, "-m", "benchmarks.chat", "--model", model]
        subprocess.run(
            [*cmd, "--repeats", str(repeats), "--out", out],
            check=True,
            capture_output=True,
            timeout=1800,
        )
        return json.loads((Path(out) / "bench_chat.json").read_text())


def suite_rows(c: dict) -> list[tuple[str, str]]:
    """The suite's rows (``fedpersona bench``) for results ``c`` of :func:`bench`."""
    rows = [
        (
            "first streamed token via the API / the model alone",
            f"{c['first_token_s']:.2f} s / {c['bare_first_token_s']:.2f} s = "
            f"**{c['ratio_first_token_over_bare']:.2f}×**",
        ),
        (
            f"streamed answer ≤ {c['max_tokens']} tokens; 3 candidates",
            f"{c['answer_s']:.1f} s ({c['answer_tokens_per_s']:.1f} tokens/s); "
            f"{c['three_candidates_s']:.1f} s (target ≤ 6 s)",
        ),
        ("one feedback via the API (adapts)", f"**{c['feedback_s'] * 1000:.0f} ms**"),
    ]
    if "paths" in c:
        now, old = c["paths"]["now"], c["paths"]["old (fp32 answers, all-layer feedback)"]
        rows.append(
            (
                "3 candidates of exactly 64 tokens; one feedback: old path / now",
                f"{old['three_full_candidates_s']:.1f} s / {now['three_full_candidates_s']:.1f} s"
                f" = **{c['ratio_full_candidates_old_over_now']:.2f}×**; "
                f"{old['feedback_s'] * 1000:.0f} ms / {now['feedback_s'] * 1000:.0f} ms = "
                f"**{c['ratio_feedback_old_over_now']:.2f}×**",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    r = bench(args.model, repeats=args.repeats, max_tokens=args.max_tokens)
    table = markdown(r)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_chat.json").write_text(json.dumps(r, indent=1))
        (args.out / "bench_chat.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
