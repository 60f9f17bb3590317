"""Per-sample attention for packed rows, and the frozen base held in bf16 for a round."""

from __future__ import annotations

import contextlib

import pytest
import torch

import common.packed_attention
import common.train
from common.data import Encoded, pack
from common.lora import get_lora_tensors, load_lora_tensors
from common.packed_attention import PACKED, Layout, packed_attention, packed_rows
from common.train import causal_lm, frozen_weights_in, reply_token_losses, train_steps
from tests.conftest import random_lora_tiny


def _samples() -> list[Encoded]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for length in (20, 33, 48, 12, 7):
        ids = torch.randint(10, 4000, (length,), generator=gen).tolist()
        cut = length // 2
        out.append(Encoded(tuple(ids), tuple([-100] * cut + ids[cut:])))
    return out


def _loss_and_grads(peft, batch) -> tuple[float, dict[str, torch.Tensor]]:  # type: ignore[no-untyped-def]
    params = {n: p for n, p in peft.named_parameters() if "lora_" in n}
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    loss = reply_token_losses(peft, batch)[0].mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(False)
        p.grad = None
    return loss.item(), grads


def test_packed_attention_gives_the_block_mask_s_losses_and_gradients(monkeypatch) -> None:
    # Prepare: one packed row of 5 samples through the tiny Llama (grouped-query attention:
    # 4 heads, 2 key/value heads).
    peft = random_lora_tiny()
    batch = pack(_samples())
    default = causal_lm(peft).config._attn_implementation

    # Execute: the per-sample attention, then transformers' own under the block-diagonal mask.
    packed_loss, packed_grads = _loss_and_grads(peft, batch)
    monkeypatch.setattr(common.train, "packed_attention_for", lambda *a: contextlib.nullcontext())
    masked_loss, masked_grads = _loss_and_grads(peft, batch)

    # Assert: the same numbers, and the model's attention is its own again afterwards.
    assert causal_lm(peft).config._attn_implementation == default != PACKED
    assert packed_loss == pytest.approx(masked_loss, abs=1e-5)
    for name, grad in masked_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in packed_grads.values())


def test_packed_attention_is_per_sample_causal_attention() -> None:
    # Prepare: 3 samples in one row, 6 query heads over 2 key/value heads.
    lengths = (5, 9, 3)
    gen = torch.Generator().manual_seed(0)
    total, heads, kv_heads, dim = sum(lengths), 6, 2, 8
    q = torch.randn(1, heads, total, dim, generator=gen, requires_grad=True)
    k = torch.randn(1, kv_heads, total, dim, generator=gen, requires_grad=True)
    v = torch.randn(1, kv_heads, total, dim, generator=gen, requires_grad=True)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    module = torch.nn.Module()

    # Execute
    token = common.packed_attention._LAYOUT.set(Layout.of(positions))
    try:
        got, _ = packed_attention(module, q, k, v, None, scaling=0.3)
    finally:
        common.packed_attention._LAYOUT.reset(token)
    want, start = [], 0
    for n in lengths:
        part = slice(start, start + n)
        want.append(
            torch.nn.functional.scaled_dot_product_attention(
                q[:, :, part],
                k[:, :, part],
                v[:, :, part],
                is_causal=True,
                scale=0.3,
                enable_gqa=True,
            ).transpose(1, 2)
        )
        start += n
    want = torch.cat(want, dim=1)

    # Assert: values and gradients of each sample's own causal attention.
    assert got.shape == (1, total, heads, dim)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    wants = torch.autograd.grad(want.square().sum(), (q, k, v))
    for g, w in zip(grads, wants, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "positions",
    [[[1, 2, 3]], [[0, 1, 3]], [[0, 1], [0, 1]], [[0, 1, 2, 0, 2]]],
    ids=["not-from-0", "skips", "two-rows", "skips-in-second"],
)
def test_a_malformed_packed_row_is_refused(positions) -> None:
    with pytest.raises(ValueError, match="packed"):
        Layout.of(torch.tensor(positions))


def test_packed_attention_outside_packed_rows_refuses_and_the_model_is_restored() -> None:
    peft = random_lora_tiny()
    lm = causal_lm(peft)
    default = lm.config._attn_implementation
    q = torch.zeros(1, 4, 3, 16)
    with pytest.raises(RuntimeError, match="packed_rows"):
        packed_attention(torch.nn.Module(), q, q, q, None)
    with pytest.raises(KeyError), packed_rows(peft, torch.tensor([[0, 1, 2]])):
        assert lm.config._attn_implementation == PACKED
        raise KeyError("boom")
    assert lm.config._attn_implementation == default


def _train_bf16(peft, *, hold: bool, monkeypatch) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    if not hold:
        monkeypatch.setattr(common.train, "frozen_weights_in", lambda *a: contextlib.nullcontext())
    start = {n: t.clone() for n, t in get_lora_tensors(peft).items()}
    train_steps(
        peft,
        list(start),
        _samples(),
        steps=3,
        batch_size=3,
        learning_rate=1e-2,
        seed=7,
        pad_id=2,
        precision="bfloat16",
    )
    after = get_lora_tensors(peft)
    load_lora_tensors(peft, start)
    monkeypatch.undo()
    return after


def test_holding_the_frozen_base_in_bf16_trains_as_autocast_does_and_restores_it(
    monkeypatch,
) -> None:
    # Prepare
    peft = random_lora_tiny()
    before = {n: (p.dtype, p.data_ptr(), p.detach().clone()) for n, p in peft.named_parameters()}

    # Execute: 3 bf16 steps with the base re-cast at every call (autocast alone), then held.
    recast = _train_bf16(peft, hold=False, monkeypatch=monkeypatch)
    held = _train_bf16(peft, hold=True, monkeypatch=monkeypatch)

    # Assert: the same steps (the same bf16 values enter every matmul); afterwards every
    # parameter is its fp32 self again, in its own storage, and no bf16 head is left behind.
    for name, tensor in recast.items():
        torch.testing.assert_close(held[name], tensor, atol=1e-6, rtol=1e-5)
    for name, p in peft.named_parameters():
        dtype, ptr, value = before[name]
        assert (p.dtype, p.data_ptr()) == (dtype, ptr)
        assert torch.equal(p.detach(), value)
    assert not hasattr(causal_lm(peft), common.train._HEAD_ATTR)


def test_inside_the_hold_the_frozen_linears_are_bf16_and_lora_is_not() -> None:
    peft = random_lora_tiny()
    for n, p in peft.named_parameters():
        p.requires_grad_("lora_" in n)
    with frozen_weights_in(peft, torch.bfloat16):
        dtypes = {n: p.dtype for n, p in peft.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert dtypes["base_model.model.model.layers.0.mlp.up_proj.weight"] == torch.bfloat16
    assert dtypes["base_model.model.model.embed_tokens.weight"] == torch.float32
    assert {p.dtype for p in peft.parameters()} == {torch.float32}
