"""Losses as training and evaluation compute them: reply tokens only, shared lower layers."""

from __future__ import annotations

import pytest
import torch

from common.config import ModelConfig
from common.data import Encoded, collate
from common.lora import build_peft_model, get_lora_tensors, load_lora_tensors
from common.model import load_base_for
from common.personalization import get_strategy
from common.train import HeldOutLosses, reply_token_losses

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
    shared = HeldOutLosses(model, samples, batch_size=4, pad_id=PAD, first_lora_layer=1)
    plain = HeldOutLosses(model, samples, batch_size=4, pad_id=PAD)
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
    plain = HeldOutLosses(model, _samples(), batch_size=4, pad_id=PAD)

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
