"""K clients' LoRA training steps in one forward and backward through the shared base.

A simulation (or a server hosting several users' devices) holds one frozen base and K
clients' LoRA tensors. Training them one after another runs K passes through the base, each
with small matrices; here every step packs all K clients' batches into one row — the base's
linear layers see K times the rows in one matmul — and each client's LoRA delta is applied to
its own tokens only, as multi-LoRA servers do (Punica's and S-LoRA's segmented matmuls):

* **Forward.** peft's adapters are switched off for the pass (the base runs alone) and a
  forward hook on every LoRA layer adds ``Σ_adapters scaling · B_k A_k x`` for the tokens of
  client k — the row's segments gathered into a zero-padded ``[K, longest, d]`` block, two
  batched matmuls (``[K, longest, d] @ [K, d, r]`` then ``@ [K, r, out]``), scattered back.
  Attention never crosses samples (:mod:`common.packed_attention` on CPUs, the block mask
  elsewhere), so no client's tokens see another's.
* **Loss.** The sum over clients of each client's mean reply-token loss: the gradient of
  client k's tensors is the gradient of its own loss, exactly as if it trained alone.
* **Optimizer.** One AdamW over the stacked ``[K, …]`` tensors: AdamW is element-wise with the
  same step count for all, so it is K independent AdamWs.
* **Batches.** Client k draws its batches with its own seeded RNG exactly as
  :func:`common.train.train_steps` does, so a client's K-batched round equals its solo round
  (tested on the tiny model to 1e-5 in fp32).

What it saves: the base's per-call costs (K× fewer layer launches and weight reads — on a GPU
the launch and weight-read bound regime of a 135M model with ~300-token batches) and the
output layer's weight read; what it does not: FLOPs (the same tokens go through the same
layers). Measured on a GPU when one is lent; on 2 CPU cores matmuls are compute-bound already
and the gain is small (``benchmarks.batched`` prints both).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from common.data import Encoded, pack
from common.train import (
    _is_cpu_bf16,
    _targets,
    frozen_weights_in,
    reply_token_losses,
    training_autocast,
)


@dataclass
class ClientJob:
    """One client's part of a batched round."""

    tensors: dict[str, torch.Tensor]  # every LoRA tensor of the model, this client's values
    samples: Sequence[Encoded]
    seed: int


def _lora_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    out = [
        (name, m)
        for name, m in model.named_modules()
        if hasattr(m, "lora_A") and hasattr(m, "base_layer")
    ]
    for name, m in out:
        if any(getattr(m, "use_dora", {}).values()):
            raise ValueError(f"{name}: batched LoRA steps do not support DoRA")
    return out


class _Segments:
    """Where each client's tokens sit in the packed row."""

    def __init__(self, lengths: Sequence[int]) -> None:
        self.lengths = list(lengths)
        self.longest = max(self.lengths)

    def block(self, x: torch.Tensor) -> torch.Tensor:  # [1, L, d] → [K, longest, d]
        parts = torch.split(x[0], self.lengths)
        return torch.stack(
            [torch.nn.functional.pad(p, (0, 0, 0, self.longest - p.shape[0])) for p in parts]
        )

    def row(self, y: torch.Tensor) -> torch.Tensor:  # [K, longest, out] → [1, L, out]
        return torch.cat([y[k, :n] for k, n in enumerate(self.lengths)]).unsqueeze(0)


@contextlib.contextmanager
def _per_client_lora(
    model: torch.nn.Module, stacked: dict[str, torch.Tensor], segments: _Segments
) -> Iterator[None]:
    """Inside: ``model``'s adapters off, and every LoRA layer adds each client's own delta
    (``stacked[name][k]``) to that client's tokens."""
    handles = []
    for name, layer in _lora_layers(model):
        adapters = [a for a in layer.active_adapters if a in layer.lora_A]

        def hook(module, args, output, name=name, adapters=adapters):  # type: ignore[no-untyped-def]
            x = segments.block(args[0])
            delta = None
            for adapter in adapters:
                a = stacked[f"{name}.lora_A.{adapter}.weight"]  # [K, r, in]
                b = stacked[f"{name}.lora_B.{adapter}.weight"]  # [K, out, r]
                h = module.lora_dropout[adapter](x).to(a.dtype)
                d = torch.bmm(torch.bmm(h, a.transpose(1, 2)), b.transpose(1, 2))
                d = d * module.scaling[adapter]
                delta = d if delta is None else delta + d
            if delta is None:
                return output
            return output + segments.row(delta).to(output.dtype)

        handles.append(layer.register_forward_hook(hook))
    try:
        with model.disable_adapter():
            yield
    finally:
        for handle in handles:
            handle.remove()


def _tensor_names(clients: Sequence[ClientJob], trainable: Sequence[str]) -> list[str]:
    """The LoRA tensor names every client holds, sorted.

    Raises:
        ValueError: No clients, a client without samples or some tensors, or a trainable
            name that is not one of them.
    """
    if not clients:
        raise ValueError("no clients to train")
    names = sorted({n for c in clients for n in c.tensors})
    for i, c in enumerate(clients):
        if not c.samples:
            raise ValueError(f"client {i} has no training samples")
        if set(c.tensors) != set(names):
            raise ValueError(f"client {i} does not hold every LoRA tensor of the model")
    if not set(trainable) <= set(names):
        raise ValueError("some trainable names are not LoRA tensors of the model")
    return names


def train_steps_batched(
    model: torch.nn.Module,
    trainable: Sequence[str],
    clients: Sequence[ClientJob],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    precision: str = "auto",
) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """``steps`` AdamW steps for every client at once (see the module docstring).

    Args:
        model: The peft model (its own LoRA tensors are not used and not changed).
        trainable: The LoRA tensor names each client trains (the rest stay at its values).
        clients: Each client's LoRA tensors, training samples and batch seed.
        steps: Optimizer steps.
        batch_size: Samples per client per step.
        learning_rate: AdamW learning rate.
        precision: ``train.precision`` (:func:`common.train.training_autocast`).

    Returns:
        Each client's LoRA tensors after the steps (detached, CPU fp32), and its mean loss.

    Raises:
        ValueError: No clients, a client without samples or tensors, or a non-finite loss
            (naming the client; nothing is returned for any).
    """
    names = _tensor_names(clients, trainable)
    device = next(model.parameters()).device
    stacked = {
        n: torch.stack([c.tensors[n] for c in clients]).to(device, torch.float32) for n in names
    }
    params = [stacked[n].requires_grad_() for n in trainable]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    rngs = [random.Random(c.seed) for c in clients]
    for p in model.parameters():  # the model's own tensors take no gradient here
        p.requires_grad_(False)
    losses: list[list[float]] = [[] for _ in clients]
    held = contextlib.ExitStack()
    model.train()
    try:
        for _ in range(steps):
            chosen = [
                [c.samples[rng.randrange(len(c.samples))] for _ in range(batch_size)]
                for c, rng in zip(clients, rngs, strict=True)
            ]
            lengths = [sum(len(e.input_ids) for e in batch) for batch in chosen]
            batch = {k: v.to(device) for k, v in pack([e for b in chosen for e in b]).items()}
            autocast = training_autocast(model, precision, batch)
            if _is_cpu_bf16(autocast) and not losses[0]:
                held.enter_context(frozen_weights_in(model, torch.bfloat16))
            segments = _Segments(lengths)
            with autocast, _per_client_lora(model, stacked, segments):
                token_losses, _ = reply_token_losses(model, batch)
            per_client = _client_means(token_losses, chosen)
            bad = [i for i, v in enumerate(per_client) if not torch.isfinite(v)]
            if bad:
                raise ValueError(f"non-finite training loss for client {bad[0]}")
            optimizer.zero_grad(set_to_none=True)
            torch.stack(per_client).sum().backward()
            optimizer.step()
            for i, v in enumerate(per_client):
                losses[i].append(float(v.detach()))
    finally:
        held.close()
        model.eval()
    trained = [
        {n: stacked[n][k].detach().to("cpu", torch.float32).clone() for n in names}
        for k in range(len(clients))
    ]
    return trained, [sum(v) / len(v) for v in losses]


def _client_means(token_losses: torch.Tensor, chosen: list[list[Encoded]]) -> list[torch.Tensor]:
    """Each client's mean over its reply tokens (the row's losses are in sample order)."""
    counts = [sum(_targets(e) for e in batch) for batch in chosen]
    return [part.mean() for part in torch.split(token_losses, counts)]


def lora_names(model: torch.nn.Module) -> list[str]:
    """Every LoRA tensor name of ``model`` (what a :class:`ClientJob` holds)."""
    return [n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
