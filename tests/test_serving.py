"""Answering fast on a CPU: the bf16 serving copy, split feedback steps, the model thread."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from client.assistant.adapt import adapt_on_feedback
from client.assistant.model_thread import ModelThread
from common.config import ModelConfig
from common.data import encode_messages
from common.lora import build_peft_model, get_lora_tensors, load_lora_tensors, lora_shapes
from common.model import load_base_for, load_tokenizer
from common.personalization import get_strategy
from common.serving import ServingCopy, frozen_base_to, serving_model


def _model(strategy: str = "blend"):  # type: ignore[no-untyped-def]
    cfg = ModelConfig(name="tiny")
    return build_peft_model(load_base_for(cfg), cfg, get_strategy(strategy)), load_tokenizer("tiny")


def _random_lora(model, seed: int) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen) * 0.3 for n, s in lora_shapes(model).items()}


@torch.no_grad()
def test_serving_copy_answers_with_the_adapters_loaded_now() -> None:
    # Prepare: a LoRA model with non-trivial adapters (B != 0) and its bf16 copy.
    model, _ = _model()
    model.eval()
    load_lora_tensors(model, _random_lora(model, 1))
    served = ServingCopy(model)
    ids = torch.randint(5, 200, (2, 24))

    # Execute: logits of the fp32 LoRA model and of the copy; then other adapters loaded.
    first = model(input_ids=ids).logits
    copy_first = served.refresh()(input_ids=ids).logits.float()
    load_lora_tensors(model, _random_lora(model, 2))
    second = model(input_ids=ids).logits
    copy_second = served.refresh()(input_ids=ids).logits.float()

    # Assert: the copy is bf16, plain (no LoRA layers), and tracks whatever is loaded.
    assert next(served.model.parameters()).dtype == torch.bfloat16
    assert not any("lora" in n for n, _ in served.model.named_parameters())
    assert (first - second).abs().max() > 0.1  # the adapters matter
    assert (copy_first - first).abs().max() < 0.05 < (copy_first - second).abs().max()
    assert (copy_second - second).abs().max() < 0.05
    assert all("lora" not in n for n, _ in served.model.named_modules())


def test_serving_model_follows_the_precision_asked() -> None:
    model, tok = _model()
    assert serving_model(model, tok, "float32") is None
    forced = serving_model(model, tok, "bfloat16")
    assert isinstance(forced, ServingCopy)
    assert serving_model(model, tok, "bfloat16") is forced  # built once per model
    with pytest.raises(ValueError, match="serving precision"):
        serving_model(model, tok, "fp8")


def test_frozen_base_to_bf16_keeps_lora_in_fp32() -> None:
    model, _ = _model()
    frozen_base_to(model, torch.bfloat16)
    dtypes = {(".lora_" in n, p.dtype) for n, p in model.named_parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}


def _example(tok):  # type: ignore[no-untyped-def]
    messages = [{"role": "user", "content": "How should I cook mushrooms tonight?"}]
    return encode_messages(messages, "Slowly, in butter, with thyme and garlic.", tok, 96)


def test_split_feedback_step_trains_only_top_layers_with_the_same_loss() -> None:
    # Prepare: two identical models (tiny: 2 decoder layers) with the same adapters.
    model, tok = _model()
    other, _ = _model()
    start = _random_lora(model, 3)
    load_lora_tensors(model, start)
    load_lora_tensors(other, start)
    personal = [n for n in lora_shapes(model) if ".personal." in n]
    kwargs = {"steps": 2, "learning_rate": 0.5, "pad_id": int(tok.pad_token_id)}

    # Execute: feedback steps on the top layer only, and on every layer.
    ex = [_example(tok), _example(tok)]
    first_split, _ = adapt_on_feedback(
        model, personal, ex, precision="float32", top_layers=1, **kwargs
    )
    first_full, _ = adapt_on_feedback(other, personal, ex, precision="float32", **kwargs)

    # Assert: the loss before the first step is the same (the split pass is exact); only
    # the top layer's personal tensors moved in the split run; the full run moved layer 0.
    assert first_split == pytest.approx(first_full, rel=1e-5)
    after, full = get_lora_tensors(model), get_lora_tensors(other)
    moved = {n for n in personal if not torch.equal(after[n], start[n])}
    assert moved and all(".layers.1." in n for n in moved)
    assert any(".layers.0." in n and not torch.equal(full[n], start[n]) for n in personal)
    assert all(torch.equal(after[n], start[n]) for n in start if ".personal." not in n)


def test_model_thread_runs_calls_in_order_on_one_thread() -> None:
    worker = ModelThread()
    names = [worker.call(lambda: threading.current_thread().name) for _ in range(3)]
    assert len(set(names)) == 1 and names[0].startswith(ModelThread.NAME)
    # A call from the model thread runs inline (no deadlock); errors reach the caller.
    assert worker.call(lambda: worker.call(lambda: 7)) == 7
    with pytest.raises(ZeroDivisionError):
        worker.call(lambda: 1 / 0)
    assert asyncio.run(worker.run(lambda x: x * 2, 21)) == 42


@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
def test_feedback_scores_prequentially_in_either_serving_precision(tmp_path, precision) -> None:
    # Prepare: a tiny device answering in bf16 (the first step's loss is the personal score)
    # or in fp32 (a separate scoring pass); one answer to give feedback on.
    from client.assistant.adapt import example_loss, hot_swap
    from client.assistant.assistant import Assistant
    from client.store.state import init_device
    from tests.conftest import open_test_store

    store = open_test_store(tmp_path / "dev")
    init_device(store, model="tiny")
    a = Assistant(store, feedback_lr=0.5, precision=precision, engine="torch")
    assert (a.served is not None) == (precision == "bfloat16")
    answer = a.ask("Tell me about the sea.", n=1, max_new_tokens=8, seed=0)
    a.feedback(answer.interaction_id, preferred="The sea is wide and grey.")  # personal moves
    preferred = "The sea is wide, grey and cold."
    inter = store.get_interaction(answer.interaction_id)
    example = a._encode(inter.prompt, inter.context, preferred)
    hot_swap(a.rt.model, a.personal_tensors())
    expected_personal = example_loss(a.rt.model, example, pad_id=a.pad_id)

    # Execute: a second feedback.
    result = a.feedback(answer.interaction_id, preferred=preferred)

    # Assert: adapted; the gate holds the personal model's loss *before* the step, which the
    # first feedback had already moved away from the global model's.
    assert result.adapted
    personal_loss, global_loss = a.gate.prequential[-1]
    assert personal_loss == pytest.approx(expected_personal, rel=1e-4)
    assert global_loss - personal_loss > 0.01
    hot_swap(a.rt.model, a.personal_tensors())
    assert example_loss(a.rt.model, example, pad_id=a.pad_id) < personal_loss - 0.01
    store.close()
