"""Losses as training and evaluation compute them: reply tokens only, shared lower layers."""

from __future__ import annotations

import pytest
import torch

from common.config import ModelConfig
from common.data import Encoded, collate, pack
from common.lora import build_peft_model, get_lora_tensors, load_lora_tensors
from common.model import load_base_for
from common.personalization import get_strategy
from common.train import (
    BF16_PARITY_RTOL,
    HeldOutLosses,
    bf16_parity,
    reply_token_losses,
    train_steps,
)
from tests.conftest import random_lora_tiny

PAD = 2


def _samples() -> list[Encoded]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for length in (20, 33, 48, 12, 48, 7):
        ids = torch.randint(10, 4000, (length,), generator=gen).tolist()
        cut = length // 2
        out.append(Encoded(tuple(ids), tuple([-100] * cut + ids[cut:])))
    return out


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    cfg = ModelConfig(name="tiny", lora_layers="1-1")
    peft = build_peft_model(load_base_for(cfg), cfg, get_strategy("blend"))
    gen = torch.Generator().manual_seed(1)
    noisy = {
        n: 0.05 * torch.randn(t.shape, generator=gen) for n, t in get_lora_tensors(peft).items()
    }
    load_lora_tensors(peft, noisy)
    return peft


def test_reply_token_losses_are_transformers_causal_lm_loss(model) -> None:
    batch = collate(_samples()[:4], PAD)
    with torch.no_grad():
        reference = model(**batch).loss
        losses, rows = reply_token_losses(model, batch)
    assert float(losses.mean()) == pytest.approx(float(reference), rel=1e-6)
    assert sorted(set(rows.tolist())) == [0, 1, 2, 3]
    # One loss per reply token that has a token before it.
    assert len(losses) == sum(sum(1 for t in s.labels[1:] if t != -100) for s in _samples()[:4])


def test_sharing_the_lower_layers_changes_no_loss(model) -> None:
    # Prepare: LoRA only in layer 1 of the tiny model; the layer below is shared.
    samples = _samples()
    shared = HeldOutLosses(model, samples, batch_size=4, first_lora_layer=1)
    plain = HeldOutLosses(model, samples, batch_size=4)
    other = {n: t * 3 for n, t in get_lora_tensors(model).items()}

    # Execute / Assert: the same numbers for two LoRA versions and for the base model.
    assert shared.split == 1 and plain.split == 0
    assert shared.per_example() == plain.per_example()
    load_lora_tensors(model, other)
    assert shared.mean() == plain.mean()
    with model.disable_adapter():
        assert shared.per_example() == plain.per_example()
    assert len(model.base_model.model.model.layers) == 2  # the decoder is whole again


def test_versions_that_differ_only_above_a_layer_share_the_layers_below_it() -> None:
    # Prepare: LoRA in both layers of the tiny model; a second version changes layer 1 only
    # (as blend's personal + w·global does when the global adapter lives in the upper layers).
    cfg = ModelConfig(name="tiny", lora_layers="0-1")
    model = build_peft_model(load_base_for(cfg), cfg, get_strategy("blend"))
    gen = torch.Generator().manual_seed(2)
    first = {
        n: 0.05 * torch.randn(t.shape, generator=gen) for n, t in get_lora_tensors(model).items()
    }
    second = {n: t * 4 if ".layers.1." in n else t for n, t in first.items()}
    plain = HeldOutLosses(model, _samples(), batch_size=4)

    # Execute: the layers below 1 run once, under the first version.
    load_lora_tensors(model, first)
    forked = plain.above(1)
    expected = {}
    for name, version in (("first", first), ("second", second)):
        load_lora_tensors(model, version)
        expected[name] = (plain.per_example(), forked.per_example())

    # Assert: the same losses as a whole pass; a layer that saves nothing forks nothing.
    assert forked.split == 1 and plain.split == 0
    for whole, from_layer_1 in expected.values():
        assert from_layer_1 == pytest.approx(whole, rel=1e-6)
    assert expected["first"][0] != pytest.approx(expected["second"][0], rel=1e-4)
    assert plain.above(0) is plain and plain.above(2) is plain and forked.above(1) is forked


def _packed_losses_per_sample(model, samples: list[Encoded], *, positions: bool) -> list[float]:  # type: ignore[no-untyped-def]
    """Each sample's mean reply-token loss, computed in one packed row."""
    batch = pack(samples)
    if not positions:  # the negative control: one long sequence, attention across samples
        batch = {k: v for k, v in batch.items() if k != "position_ids"}
    with torch.no_grad():
        losses, _ = reply_token_losses(model, batch)
    counts = [sum(1 for t in s.labels[1:] if t != -100) for s in samples]
    assert len(losses) == sum(counts)
    return [float(chunk.mean()) for chunk in torch.split(losses, counts)]


def test_a_sample_s_loss_is_the_same_alone_and_packed(model) -> None:
    # Prepare: samples of different lengths, the shortest last.
    samples = _samples()

    # Execute
    with torch.no_grad():
        alone = [float(reply_token_losses(model, collate([s], PAD))[0].mean()) for s in samples]
    packed = _packed_losses_per_sample(model, samples, positions=True)
    leaked = _packed_losses_per_sample(model, samples, positions=False)

    # Assert: no sample sees another; without the restarting positions every sample after
    # the first would (the check can fail).
    assert packed == pytest.approx(alone, abs=1e-5)
    assert leaked[0] == pytest.approx(alone[0], abs=1e-5)
    assert max(abs(a - b) for a, b in zip(leaked[1:], alone[1:], strict=True)) > 1e-3


def test_a_packed_row_has_no_padding_and_predicts_no_sample_from_the_one_before() -> None:
    samples = [Encoded((5, 6, 7), (5, 6, 7)), Encoded((8, 9), (-100, 9))]
    batch = pack(samples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # A sample's first token is never a target (unpacked, nothing comes before it).
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]


def _train(peft, *, packed: bool, precision: str) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    start = {n: t.clone() for n, t in get_lora_tensors(peft).items()}
    names = list(start)
    train_steps(
        peft,
        names,
        _samples(),
        steps=3,
        batch_size=3,
        learning_rate=1e-2,
        seed=7,
        pad_id=PAD,
        precision=precision,
        packed=packed,
    )
    after = get_lora_tensors(peft)
    load_lora_tensors(peft, start)
    return after


def test_packed_training_takes_the_padded_batches_steps() -> None:
    peft = random_lora_tiny()
    padded = _train(peft, packed=False, precision="float32")
    packed = _train(peft, packed=True, precision="float32")
    for name, tensor in padded.items():
        torch.testing.assert_close(packed[name], tensor, atol=2e-5, rtol=1e-4)


def test_bf16_training_matches_fp32_within_the_parity_tolerance() -> None:
    # Prepare
    peft = random_lora_tiny()
    batch = pack(_samples()[:4])

    # Execute
    exact, fast = bf16_parity(peft, batch)
    fp32 = _train(peft, packed=True, precision="float32")
    bf16 = _train(peft, packed=True, precision="bfloat16")

    # Assert: the same loss to bf16's precision; the update (3 Adam steps) in the same
    # direction, not fp32's exactly (the autocast did run). Adam's steps are about ±lr per
    # element, so an element whose gradient is near 0 may step either way: compare the
    # whole update, not elements.
    assert fast != exact
    assert abs(fast - exact) <= BF16_PARITY_RTOL * abs(exact)
    start = get_lora_tensors(peft)
    d32 = torch.cat([(fp32[n] - start[n]).flatten() for n in start])
    d16 = torch.cat([(bf16[n] - start[n]).flatten() for n in start])
    assert float(torch.nn.functional.cosine_similarity(d16, d32, dim=0)) > 0.95
    assert float((d16 - d32).norm() / d32.norm()) < 0.3
    assert not torch.equal(d16, d32)
    # The LoRA tensors stay fp32 under autocast.
    assert all(t.dtype == torch.float32 for t in bf16.values())


def test_auto_precision_takes_bf16_only_where_native_and_in_parity(monkeypatch) -> None:
    import common.train as train

    batch = pack(_samples()[:4])

    def chosen(native: bool, parity: tuple[float, float] | None) -> object:
        peft = random_lora_tiny()
        monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: native)
        if parity is not None:
            monkeypatch.setattr(train, "bf16_parity", lambda model, b: parity)
        with train.training_autocast(peft, "auto", batch) as ctx:
            dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        # The choice is made once per model and kept.
        assert getattr(peft, train._TRAIN_DTYPE_ATTR) == (dtype or torch.float32)
        del ctx
        monkeypatch.undo()
        return dtype

    assert chosen(True, None) == torch.bfloat16  # the real parity check on the tiny model
    assert chosen(True, (4.0, 4.2)) is None  # 5 % apart: fp32
    assert chosen(False, None) is None  # emulated bf16 is no faster: fp32
    assert chosen(True, (4.0, 4.01)) == torch.bfloat16


def test_a_feedback_step_weighs_each_example_s_reply_loss(model) -> None:
    # Prepare: three examples of different lengths, weighted as drift recovery does.
    from client.assistant.adapt import _weighted_loss, adapt_on_feedback

    samples = _samples()[:3]
    weights = [0.2, 0.3, 0.5]
    batch = collate(samples, PAD)
    personal = [n for n, p in model.named_parameters() if ".lora_B." in n]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = float(_weighted_loss(logits, batch["labels"], torch.tensor(weights)))
    before = get_lora_tensors(model)

    # Execute: the loss before the first step (the output layer on reply tokens only).
    first, _ = adapt_on_feedback(
        model,
        personal,
        samples,
        steps=1,
        learning_rate=1e-3,
        pad_id=PAD,
        weights=weights,
        precision="float32",
    )
    load_lora_tensors(model, before)

    # Assert
    assert first == pytest.approx(expected, rel=1e-5)


def test_gradient_sums_hold_each_step_s_gradient_at_that_step() -> None:
    # Prepare: the gradient of the one step's batch, computed by hand at the start tensors.
    import random

    peft = random_lora_tiny()
    start = {n: t.clone() for n, t in get_lora_tensors(peft).items()}
    names = list(start)
    watched = [n for n in names if "lora_B" in n][:2]
    rng = random.Random(7)
    samples = _samples()
    batch = pack([samples[rng.randrange(len(samples))] for _ in range(3)])
    params = dict(peft.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    reply_token_losses(peft, batch)[0].mean().backward()
    by_hand = {n: params[n].grad.detach().clone() for n in watched}
    for n in names:
        params[n].requires_grad_(False)
        params[n].grad = None

    # Execute: one step, then two, summing the gradients of the watched tensors.
    one = {n: torch.zeros_like(start[n]) for n in watched}
    kwargs = dict(batch_size=3, learning_rate=1e-2, seed=7, pad_id=PAD, precision="float32")
    train_steps(peft, names, samples, steps=1, gradient_sums=one, **kwargs)
    load_lora_tensors(peft, start)
    two = {n: torch.zeros_like(start[n]) for n in watched}
    train_steps(peft, names, samples, steps=2, gradient_sums=two, **kwargs)
    load_lora_tensors(peft, start)

    # Assert: the first step's sum is that gradient; a second step adds a different one.
    for n in watched:
        torch.testing.assert_close(one[n], by_hand[n], atol=1e-6, rtol=1e-5)
        assert not torch.allclose(two[n], one[n])
