"""Attention for packed rows (:func:`common.data.pack`) that computes no score across samples.

A packed row holds several samples side by side, ``position_ids`` restarting at 0 for each.
transformers' default (SDPA) attends over the whole row under a block-diagonal mask: with 4
samples three quarters of the score matrix is computed and then masked, and on a CPU SDPA's
flash kernel under an explicit mask is slow for these sizes (≈ 7–10 ms per layer forward +
backward for 4 samples of ~70 tokens on 2 cores, against ≈ 5–6 ms here).

Here each layer gathers the row's queries, keys and values into one right-padded
``[samples, heads, longest, head_dim]`` block, runs causal attention per sample (a query sees
its own sample's keys up to itself; padding sits after every real key, so the causal mask alone
keeps it out), and scatters the outputs back into the row. The arithmetic is transformers'
eager attention (scores in the compute dtype, softmax in fp32), so a sample's result is what it
would be alone.

:func:`packed_rows` switches a model to this attention for the passes inside it (the training
step and held-out losses use it on CPUs); outside it the model's own attention runs unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

PACKED = "fedpersona_packed"


@dataclass(frozen=True)
class Layout:
    """The samples of one packed row: where each starts and how long it is."""

    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    causal: torch.Tensor  # [longest, longest]: 0 where a query may see a key, -inf elsewhere

    @property
    def length(self) -> int:
        return sum(self.lengths)

    @classmethod
    def of(cls, position_ids: torch.Tensor) -> Layout:
        """The layout of one packed row from its ``position_ids`` (``[1, L]``).

        Raises:
            ValueError: If ``position_ids`` is not one row that starts a sample at 0 and counts
                up by one within each sample.
        """
        if position_ids.dim() != 2 or position_ids.shape[0] != 1 or position_ids.shape[1] == 0:
            raise ValueError(
                f"packed attention takes one row of positions, got {tuple(position_ids.shape)}"
            )
        pos = position_ids[0].to("cpu")
        starts = (pos == 0).nonzero()[:, 0]
        if starts.numel() == 0 or int(starts[0]) != 0:
            raise ValueError("a packed row starts with position 0")
        lengths = torch.diff(starts, append=torch.tensor([pos.numel()]))
        expected = torch.cat([torch.arange(int(n)) for n in lengths])
        if not torch.equal(pos, expected):
            raise ValueError("packed positions count up by one within each sample")
        longest = int(lengths.max())
        causal = torch.full((longest, longest), float("-inf")).triu(1)
        return cls(tuple(starts.tolist()), tuple(lengths.tolist()), causal.to(position_ids.device))


_LAYOUT: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("layout", default=None)


def packed_attention(  # type: ignore[no-untyped-def]
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` ``[1, H, L, D]``, ``key`` and
    ``value`` ``[1, H_kv, L, D]``; returns ``[1, L, H, D]``."""
    layout = _LAYOUT.get()
    if layout is None:
        raise RuntimeError("packed attention runs only inside common.packed_attention.packed_rows")
    if query.shape[0] != 1 or not query.shape[2] == key.shape[2] == layout.length:
        raise ValueError(
            f"packed attention got query {tuple(query.shape)} and key {tuple(key.shape)} "
            "for a row of a different length"
        )
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[3]
    scale = dim**-0.5 if scaling is None else scaling
    longest = layout.causal.shape[0]

    def block(t: torch.Tensor) -> torch.Tensor:  # [1, h, L, D] → [S, h, longest, D]
        # Slices and zero padding: their backward is slicing too (no scatter-add).
        return torch.stack(
            [
                torch.nn.functional.pad(t[0, :, a : a + n], (0, 0, 0, longest - n))
                for a, n in zip(layout.starts, layout.lengths, strict=True)
            ]
        )

    q, k, v = block(query), block(key), block(value)
    if kv_heads != heads:  # grouped-query attention: each key/value head serves a group
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale + layout.causal.to(q.dtype)
    weights = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, v).transpose(1, 2)  # [S, longest, H, D]
    rows = [out[i, :n] for i, n in enumerate(layout.lengths)]
    return torch.cat(rows).unsqueeze(0), None  # [1, L, H, D]


def _no_mask(*args, **kwargs) -> None:  # type: ignore[no-untyped-def]
    """Packed attention builds its own per-sample causal mask: none is made for it."""
    return None


AttentionInterface.register(PACKED, packed_attention)
AttentionMaskInterface.register(PACKED, _no_mask)


@contextlib.contextmanager
def packed_rows(model: torch.nn.Module, position_ids: torch.Tensor) -> Iterator[None]:
    """Passes of ``model`` inside this block attend per sample of the packed row
    ``position_ids`` (see the module docstring); the previous attention is restored after."""
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    layout = Layout.of(position_ids)
    saved = config._attn_implementation
    token = _LAYOUT.set(layout)
    config._attn_implementation = PACKED
    try:
        yield
    finally:
        config._attn_implementation = saved
        _LAYOUT.reset(token)
