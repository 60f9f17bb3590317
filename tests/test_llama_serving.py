"""The device's llama.cpp answering path: adapters converted exactly, sampling as transformers
samples, nothing stale after the adapters change, and every bad input answered by torch."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by scripts/setup.sh")

from client.assistant.llama_path import LlamaPath, ParityError, base_gguf, open_runtime  # noqa: E402
from common import gguf_lora  # noqa: E402
from common.config import parse_run_config  # noqa: E402
from common.generation import render  # noqa: E402
from common.gguf_lora import GGUFError, snapshot, write_adapter  # noqa: E402
from common.llama_serving import LlamaEngine, LlamaUnavailable, Sampling, candidates  # noqa: E402

ALL_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
PROMPT = [{"role": "user", "content": "What should I cook with mushrooms?"}]


def _fresh_runtimes() -> None:
    """Forget this process's loaded runtimes (closing their llama.cpp paths): the next
    ``open_runtime`` starts from nothing."""
    from client.federation import runtime

    for rt in runtime._RUNTIMES.values():
        if rt.llama is not None:
            rt.llama.close()
    runtime._RUNTIMES.clear()


def _runtime(targets: str = ALL_TARGETS, scale: float = 0.5, seed: int = 0):  # type: ignore[no-untyped-def]
    """A tiny fp32 runtime whose LoRA B tensors are random (non-zero adapters everywhere)."""
    from client.federation.runtime import get_runtime

    rt = get_runtime(
        parse_run_config({"model.name": "tiny", "model.lora-targets": targets}), serving="float32"
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in rt.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return rt


@pytest.fixture
def path():  # type: ignore[no-untyped-def]
    rt = _runtime()
    lp = LlamaPath.open(rt.model, rt.tokenizer, "tiny", n_ctx=512)
    yield rt, lp
    lp.close()


def test_adapters_on_every_target_give_torch_fp32s_logits(path) -> None:
    # Prepare: the tiny model (F32 GGUF) with random adapters on all seven projections.
    rt, lp = path
    ids = render(rt.tokenizer, PROMPT)

    # Execute: llama.cpp's and torch's next-token logits at every position.
    got = lp.engine.logits(ids, adapter=lp.ready())
    with torch.no_grad():
        rt.model.eval()
        ref = rt.model(input_ids=torch.tensor([ids])).logits[0].numpy()

    # Assert: equal to float rounding (q/k permutation, scaling and names all right), so the
    # start-up parity is far below its bound.
    assert np.abs(got - ref).max() < 1e-2 * np.abs(ref).max()  # its KV cache is f16
    assert lp.kl is not None and lp.kl < 1e-5


def test_a_wrongly_converted_adapter_fails_parity(monkeypatch) -> None:
    # Prepare: the converter without llama.cpp's q/k row permutation.
    rt = _runtime(targets="q_proj,k_proj", scale=10.0)
    right = LlamaPath.open(rt.model, rt.tokenizer, "tiny", n_ctx=512)
    right.close()
    assert right.kl is not None and right.kl < 1e-4
    monkeypatch.setattr(gguf_lora, "_permute", lambda rows, n_head: rows)

    # Execute / Assert: the start-up check refuses llama.cpp.
    with pytest.raises(ParityError, match="KL"):
        LlamaPath.open(rt.model, rt.tokenizer, "tiny", n_ctx=512)


def test_candidates_are_what_transformers_would_sample_from() -> None:
    # Prepare: random logits and transformers' own warpers.
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(0)
    for _ in range(10):
        x = rng.normal(0, 3, size=2000).astype(np.float32)
        scores = torch.from_numpy(x)[None]
        for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(50), TopPLogitsWarper(0.9)):
            scores = warper(None, scores)
        expected = scores.softmax(-1)[0].numpy()

        # Execute
        ids, p = candidates(x, Sampling(temperature=0.7, top_k=50, top_p=0.9))

        # Assert: the same tokens with the same probabilities.
        assert set(ids.tolist()) == set(np.nonzero(expected > 0)[0].tolist())
        assert np.allclose(expected[ids], p, atol=1e-6)


def test_sampling_streams_stops_cancels_and_repeats_with_a_seed(path) -> None:
    rt, lp = path
    key = lp.ready()
    assert key is not None
    ids = render(rt.tokenizer, PROMPT)
    opts = {"temperature": 0.8, "max_new_tokens": 24}

    # A seeded answer streams in pieces that add up to its text, and repeats with the seed.
    pieces: list[str] = []
    one = lp.generate(key, ids, n=1, seed=3, on_text=pieces.append, **opts)[0]
    assert "".join(pieces) == one.text and one.tokens == 24 and one.finish_reason == "length"
    assert lp.generate(key, ids, n=1, seed=3, **opts)[0].text == one.text

    # n candidates come from one batch, each its own sample.
    three = lp.generate(key, ids, n=3, seed=4, **opts)
    assert len(three) == 3 and len({g.text for g in three}) == 3

    # A stop string ends the answer before it.
    word = one.text.split()[2]
    stopped = lp.generate(key, ids, n=1, seed=3, stop=[word], **opts)[0]
    assert stopped.finish_reason == "stop" and word not in stopped.text
    assert one.text.startswith(stopped.text) and stopped.tokens < one.tokens

    # Cancelling ends it at once.
    cancel = threading.Event()
    cancel.set()
    assert lp.generate(key, ids, n=2, seed=3, cancel=cancel, **opts)[0].tokens == 1


def test_a_conversation_reuses_its_prompt_and_a_new_adapter_clears_it(path) -> None:
    # Prepare: a first turn answered; the system prompt of a new conversation warmed.
    rt, lp = path
    key = lp.ready()
    first = render(rt.tokenizer, PROMPT)
    lp.generate(key, first, n=1, seed=0, temperature=0.8, max_new_tokens=4)
    turn = [
        *PROMPT,
        {"role": "assistant", "content": "Risotto."},
        {"role": "user", "content": "How?"},
    ]
    longer = render(rt.tokenizer, turn)
    system = [{"role": "system", "content": "You are terse."}]
    warm = rt.tokenizer.apply_chat_template(system, tokenize=True, return_dict=True)["input_ids"]
    fresh_question = render(rt.tokenizer, [*system, {"role": "user", "content": "Hi?"}])

    # Execute / Assert: the next turn keeps the cells of the shared prefix, and the logits
    # computed that way equal a fresh computation's.
    with lp.engine.lock:
        lp.engine._prompt(longer)
        assert len(lp.engine._cached) == len(longer)
        reused = lp.engine._row(lp.engine.batch.n_tokens - 1)
    fresh = lp.engine.logits(longer, adapter=key)[-1]
    assert np.allclose(reused, fresh, atol=1e-4)

    # A warmed system prompt is where a new question's prompt begins.
    lp.latest = key
    lp.warm(list(warm))
    lp.wait()
    assert lp.engine._cached == list(warm) and fresh_question[: len(warm)] == list(warm)
    with lp.engine.lock:
        from_warm = lp.engine._prompt(fresh_question)[0]
        assert lp.engine.batch.n_tokens == len(fresh_question) - len(warm)  # only the rest
    assert np.allclose(from_warm, lp.engine.logits(fresh_question, adapter=key)[-1], atol=1e-4)

    # Other weights: nothing computed is kept.
    lp.engine.use(None)
    assert lp.engine._cached == []


def test_new_adapters_are_converted_off_the_request_path_then_answer(path, caplog) -> None:
    # Prepare: the adapters change (as after a round, a feedback step, a profile's expert mix).
    rt, lp = path
    old = lp.ready()
    with torch.no_grad():
        for name, p in rt.model.named_parameters():
            if "lora_B" in name and "v_proj" in name:
                p.mul_(-1.0)

    # Execute: the first ask finds them unconverted; then the conversion finishes.
    with caplog.at_level(logging.INFO, logger="client.assistant.llama_path"):
        assert lp.ready() is None
    lp.wait()
    new = lp.ready()

    # Assert: torch answered meanwhile and said so; now llama.cpp holds the new adapters, and
    # they give torch's distributions (no stale weights).
    assert "torch answers until it is ready" in caplog.text
    assert new is not None and new != old
    assert lp.parity() < 1e-5


def test_the_assistant_answers_through_llama_cpp_by_default(tmp_path) -> None:
    from tests.conftest import tiny_assistant

    store, assistant, _ = tiny_assistant(tmp_path / "dev")
    try:
        assert assistant.llama is not None and assistant.served is None
        answer = assistant.ask("Tell me about the sea.", n=2, max_new_tokens=8, seed=0)
        assert len(answer.candidates) >= 1 and answer.completion_tokens > 0
    finally:
        store.close()


# ---- bad input: a clear error naming it, and torch answers ------------------------------------


def test_a_base_gguf_that_does_not_load_is_named_and_torch_answers(
    tmp_path, monkeypatch, caplog
) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 64)
    monkeypatch.setattr("client.assistant.llama_path.base_gguf", lambda name: broken)
    cfg = parse_run_config({"model.name": "tiny", "model.lora-targets": "q_proj,v_proj"})
    _fresh_runtimes()

    with pytest.raises((GGUFError, LlamaUnavailable), match="broken.gguf"):
        open_runtime(cfg, engine="llama.cpp", precision="float32")
    with caplog.at_level(logging.WARNING):
        rt, llama = open_runtime(cfg, engine="auto", precision="float32")
    assert llama is None and rt.model is not None
    assert "broken.gguf" in caplog.text and "torch answers" in caplog.text


def test_a_missing_native_library_is_named_and_torch_answers(monkeypatch, caplog) -> None:
    import common.llama_serving as serving

    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)
    monkeypatch.setattr(serving.load_library, "_done", False, raising=False)
    cfg = parse_run_config({"model.name": "tiny", "model.lora-targets": "q_proj"})
    _fresh_runtimes()
    with caplog.at_level(logging.WARNING):
        _, llama = open_runtime(cfg, engine="auto", precision="float32")
    assert llama is None and "llama-cpp-python is not usable" in caplog.text


def test_adapters_for_another_base_or_of_wrong_shape_are_refused(path, tmp_path) -> None:
    from dataclasses import replace

    rt, lp = path
    snap = snapshot(rt.model)
    facts = lp.engine.facts

    # Made for another base: refused by its fingerprint before llama.cpp sees it.
    other = write_adapter(tmp_path / "other.gguf", snap, replace(facts, fingerprint="0" * 64))
    with pytest.raises(GGUFError, match="another base model"):
        lp.engine.add_adapter("other", other)

    # Right base, wrong shapes: llama.cpp refuses it, and the error names the file.
    bad = {k: (a[:, :-1].contiguous(), b) for k, (a, b) in snap.items()}
    wrong = write_adapter(tmp_path / "wrong.gguf", bad, facts)
    with pytest.raises(GGUFError, match="wrong.gguf"):
        lp.engine.add_adapter("wrong", wrong)

    # Not a GGUF at all.
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf")
    with pytest.raises(GGUFError, match="junk.gguf"):
        lp.engine.add_adapter("junk", junk)


def test_a_conversion_that_fails_leaves_torch_answering(path, monkeypatch, caplog) -> None:
    rt, lp = path
    lp.ready()

    def refuse(*_a, **_k):  # type: ignore[no-untyped-def]
        raise GGUFError("llama.cpp could not load the adapter /proc/self/fd/9")

    calls: list[int] = []
    monkeypatch.setattr(lp, "_load", lambda *a: (calls.append(1), refuse())[1])
    with torch.no_grad():
        next(p for n, p in rt.model.named_parameters() if "lora_B" in n).add_(1.0)
    with caplog.at_level(logging.WARNING):
        assert lp.ready() is None
        lp.wait()
        assert lp.ready() is None
    assert "cannot take this adapter" in caplog.text and lp.failed
    assert calls == [1]  # the same tensors are not converted again on every request


def test_the_engine_refuses_what_does_not_fit(path) -> None:
    rt, lp = path
    key = lp.ready()
    with pytest.raises(ValueError, match="exceed the context"):
        lp.generate(key, [1] * 500, n=1, temperature=0.8, max_new_tokens=64)
    with pytest.raises(ValueError, match="n must be"):
        lp.generate(key, [1, 2], n=9, temperature=0.8, max_new_tokens=4)
    with pytest.raises((GGUFError, LlamaUnavailable), match="nope.gguf"):
        LlamaEngine(Path(base_gguf("tiny")).with_name("nope.gguf"), n_ctx=64)


def test_what_llama_cpp_cannot_answer_goes_to_torch(path, monkeypatch, caplog) -> None:
    rt, lp = path
    ids = render(rt.tokenizer, PROMPT)

    # Candidates that do not fit the shared cells (3 × 64 after 400 prompt tokens in 512).
    with caplog.at_level(logging.INFO):
        assert lp.answer([1] * 400, n=3, max_new_tokens=64, temperature=0.8) is None
    assert "exceed its 512 cells; torch answers" in caplog.text

    # A failure before anything streamed: torch answers; after a piece streamed: raised.
    def fail(*_a, on_text=None, **_k):  # type: ignore[no-untyped-def]
        if on_text is not None:
            on_text("Hello")
        raise LlamaUnavailable("llama_decode failed (1)")

    monkeypatch.setattr(lp.engine, "sample", fail)
    assert lp.answer(ids, n=2, max_new_tokens=8, temperature=0.8) is None
    with pytest.raises(LlamaUnavailable):
        lp.answer(ids, n=1, max_new_tokens=8, temperature=0.8, on_text=lambda piece: None)


def test_a_round_from_the_devices_worker_answers_from_the_next_request(tmp_path) -> None:
    # Prepare: a device's assistant, and the same store opened as its worker opens it.
    from client.store import status as device_status
    from common.gguf_lora import snapshot_id
    from tests.conftest import tiny_assistant

    store, assistant, _ = tiny_assistant(tmp_path / "dev")
    try:
        before = snapshot_id(snapshot(assistant.rt.model))
        worker = device_status.open_state(store, assistant.cfg)
        shared = assistant.global_tensors()
        shared = {n: t + 0.25 for n, t in shared.items() if n in assistant.rt.shared_names}
        worker.save_global(shared)
        worker.meta.last_round = 7
        worker.save_meta()

        # Execute: the next request.
        assistant.ask("Tell me about the sea.", n=1, max_new_tokens=4, seed=0)
        assistant.llama.wait()

        # Assert: the round's adapters answer (loaded into torch, converted for llama.cpp).
        assert assistant.state.meta.last_round == 7
        after = snapshot_id(snapshot(assistant.rt.model))
        assert after != before and assistant.llama.ready() == after
        assert assistant.follow_rounds() is False  # nothing new since
    finally:
        store.close()


def test_an_expert_mix_follows_a_profile_change_into_llama_cpp(tmp_path) -> None:
    # Prepare: a device answering with two expert adapters (the mix follows the user vector).
    from client.assistant.assistant import Assistant
    from client.store.state import init_device
    from common.gguf_lora import snapshot_id
    from tests.conftest import open_test_store
    from tests.test_assistant import _expert_adapter

    store = open_test_store(tmp_path / "dev")
    init_device(store, model="tiny", strategy="fedsa")
    try:
        assistant = Assistant(store)
        for name, scale, about in (
            ("cooking", 0.5, "recipes and cooking"),
            ("code", -0.5, "python code"),
        ):
            adapter = _expert_adapter(assistant, tmp_path / name, scale)
            assistant.add_expert(name, adapter, about=about)
        assert assistant.variant == "experts"
        assistant.llama.wait()
        before = assistant.llama.ready()

        # Execute: the user says what they care about.
        assistant.set_profile({"domains": ["python programming", "debugging code"]})
        assistant.llama.wait()

        # Assert: a new mix, converted; llama.cpp answers with it and agrees with torch.
        after = assistant.llama.ready()
        assert after is not None and after != before
        assert after == snapshot_id(snapshot(assistant.rt.model))
        assert assistant.llama.parity() < 1e-5
    finally:
        store.close()
