"""On-device model adaptation: hot-swap, feedback steps, cold start, drift, expert routing.

* **Hot-swap** (:func:`hot_swap`) — LoRA tensors are copied into the live peft model's
  parameters in place; the base model is never reloaded.
* **Real-time adaptation** (:func:`adapt_on_feedback`) — a rating of 4–5, a preferred answer
  or an edit becomes a few gradient steps on the *personal* LoRA parameters only (for fedsa,
  the B matrices). Personal parameters never leave the device; the next federated round
  starts from them, and its clipped, noised update is covered by the user-level guarantee.
* **Cold start and drift** — the evidence that decides which model answers, and when to
  replay recent examples, is kept in :mod:`client.assistant.evidence` (no model needed to read it).
* **Mixture of experts** — see :mod:`client.assistant.experts`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from common.data import Encoded, collate
from common.lora import load_lora_tensors
from common.train import (
    causal_lm,
    decoder_layers,
    head_losses,
    reply_token_losses,
    splittable,
    training_autocast,
    unfreeze_only,
)


def hot_swap(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> float:
    """Copy ``tensors`` into ``model``'s LoRA parameters in place; return milliseconds taken."""
    start = time.perf_counter()
    load_lora_tensors(model, tensors)
    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000


@torch.no_grad()
def example_loss(model: torch.nn.Module, example: Encoded, *, pad_id: int) -> float:
    """Mean token loss of one example's reply under ``model``'s current tensors."""
    model.eval()
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate([example], pad_id).items()}
    losses, _ = reply_token_losses(model, batch)  # the output layer on reply tokens only
    return float(losses.mean())


def adapt_on_feedback(
    model: torch.nn.Module,
    personal_names: Sequence[str],
    examples: Sequence[Encoded],
    *,
    steps: int,
    learning_rate: float,
    pad_id: int,
    weights: Sequence[float] | None = None,
    precision: str = "auto",
    top_layers: int | None = None,
) -> tuple[float, float]:
    """A few SGD steps on the personal parameters towards ``examples`` (batched together).

    With ``top_layers = k`` only the personal tensors of the top ``k`` decoder layers move,
    and the layers below run once, without gradients: each step costs a forward and backward
    through ``k`` layers and the output layer (on reply tokens) instead of the whole model —
    on SmolLM2 (30 layers), k = 4 makes a step ~5× cheaper. The federated round still trains
    every layer; feedback nudges the layers nearest the output, where a preferred wording
    shows most. Decoders whose input embeddings are not transformed inside the model only
    (:func:`common.train.splittable`); elsewhere every layer trains.

    Args:
        model: The peft model with the device's current tensors loaded.
        personal_names: The parameters to update (everything else stays frozen).
        examples: Encoded (messages, preferred reply) pairs.
        steps: Gradient steps.
        learning_rate: SGD learning rate.
        pad_id: Padding token id.
        weights: Per-example loss weights (drift recovery up-weights recent examples).
        precision: ``train.precision`` (:func:`common.train.training_autocast`).
        top_layers: Train only the personal tensors of this many top decoder layers
            (``None``: all).

    Returns:
        ``(loss before the first step, milliseconds taken)``.

    Raises:
        ValueError: No examples or personal parameters, or the loss became non-finite (the
            parameters are then restored to their values before the call).
    """
    if not examples:
        raise ValueError("nothing to adapt on")
    if not personal_names:
        raise ValueError("this strategy has no personal parameters to adapt")
    start = time.perf_counter()
    split, names = _split_at(model, personal_names, top_layers)
    params = unfreeze_only(model, names)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate(list(examples), pad_id).items()}
    # The output layer on reply tokens only, in the training precision (bf16 on a CPU with
    # native bf16, after the parity check): what a federated round trains.
    losses_of = (
        _upper_losses(model, batch, split, precision)
        if split
        else _whole_losses(model, batch, precision)
    )
    w = None
    if weights is not None:
        w = torch.tensor(list(weights), dtype=torch.float32, device=device)
        w = w / w.sum()
    first = _sgd_steps(
        model,
        params,
        losses_of,
        steps=steps,
        learning_rate=learning_rate,
        rows=batch["input_ids"].shape[0],
        weights=w,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return first, (time.perf_counter() - start) * 1000


def _whole_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], precision: str
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """Per-token reply losses (and their rows) of ``batch`` through the whole model."""

    def losses() -> tuple[torch.Tensor, torch.Tensor]:
        with training_autocast(model, precision, batch):
            return reply_token_losses(model, batch)

    return losses


def _sgd_steps(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    losses_of: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    learning_rate: float,
    rows: int,
    weights: torch.Tensor | None,
) -> float:
    """``steps`` SGD steps on ``params``; return the loss before the first.

    Raises:
        ValueError: The loss became non-finite (``params`` are restored first).
    """
    backup = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=learning_rate)
    model.train()
    first = math.nan
    try:
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            losses, row = losses_of()
            loss = _weighted_mean(losses, row, rows, weights)
            if not torch.isfinite(loss):
                raise ValueError("non-finite loss during feedback adaptation")
            if step == 0:
                first = loss.item()
            loss.backward()
            optimizer.step()
    except ValueError:
        with torch.no_grad():
            for p, b in zip(params, backup, strict=True):
                p.copy_(b)
        raise
    finally:
        model.eval()
        for p in params:
            p.requires_grad_(False)
    return first


def _layer_of(name: str) -> int | None:
    _, found, rest = name.partition(".layers.")
    return int(rest.split(".", 1)[0]) if found and rest.split(".", 1)[0].isdigit() else None


def _split_at(
    model: torch.nn.Module, names: Sequence[str], top_layers: int | None
) -> tuple[int, list[str]]:
    """``(first trained decoder layer, the names to train)``; ``(0, names)``: all of them."""
    if top_layers is None or top_layers < 1 or not splittable(model):
        return 0, list(names)
    split = len(causal_lm(model).get_decoder().layers) - top_layers
    upper = [n for n in names if (layer := _layer_of(n)) is None or layer >= split]
    if split <= 0 or len(upper) == len(names) or not upper:
        return 0, list(names)
    return split, upper


def _upper_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], split: int, precision: str
):  # type: ignore[no-untyped-def]
    """The lower ``split`` decoder layers run once (no gradients); returns a function giving
    the reply-token losses (and rows) of a pass through the layers above and the output layer."""
    lm = causal_lm(model)
    decoder = lm.get_decoder()
    mask = batch.get("attention_mask")
    model.eval()
    with (
        torch.no_grad(),
        training_autocast(model, precision, batch),
        decoder_layers(decoder, slice(0, split), final_norm=False),
    ):
        lower = decoder(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False)
    hidden = lower.last_hidden_state
    model.train()

    def losses() -> tuple[torch.Tensor, torch.Tensor]:
        with (
            training_autocast(model, precision, batch),
            decoder_layers(decoder, slice(split, None), final_norm=True),
        ):
            top = decoder(inputs_embeds=hidden, attention_mask=mask, use_cache=False)
            return head_losses(lm, top.last_hidden_state, batch["labels"])

    return losses


def _weighted_mean(
    losses: torch.Tensor, row: torch.Tensor, rows: int, w: torch.Tensor | None
) -> torch.Tensor:
    """Each example's mean reply-token loss, averaged (or weighted by ``w``)."""
    sums = torch.zeros(rows, device=losses.device).index_add(0, row, losses)
    counts = torch.zeros(rows, device=losses.device).index_add(0, row, torch.ones_like(losses))
    per_example = sums / counts.clamp(min=1)
    if w is None:
        return per_example.mean()
    return (per_example * w).sum()


def _weighted_loss(
    logits: torch.Tensor, labels: torch.Tensor, w: torch.Tensor | None
) -> torch.Tensor:
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(shift_labels.shape)
    mask = (shift_labels != -100).float()
    per_example = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
    if w is None:
        return per_example.mean()
    return (per_example * w).sum()


class GraphedAdapter:
    """The feedback step captured once as a CUDA graph, replayed per feedback (CUDA only).

    Eager PyTorch spends most of a 1×64-token LoRA step launching kernels; capturing forward,
    backward and the SGD update once and replaying the graph removes that overhead. Shapes are
    fixed: an example is right-padded (or cut) to ``seq_len`` tokens; with causal attention,
    right padding does not change the loss on the real tokens, so no attention mask is needed.

    Args:
        model: The peft model, on a CUDA device.
        personal_names: The parameters the step updates.
        seq_len: Fixed sequence length.
        learning_rate: SGD learning rate.
        pad_id: Padding token id.

    Raises:
        ValueError: If the model is not on a CUDA device.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        personal_names: Sequence[str],
        *,
        seq_len: int,
        learning_rate: float,
        pad_id: int,
    ) -> None:
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError("GraphedAdapter needs the model on a CUDA device")
        self.model = model
        self.pad_id = pad_id
        self.params = unfreeze_only(model, personal_names)
        self.ids = torch.full((1, seq_len), pad_id, dtype=torch.long, device=device)
        self.labels = torch.full((1, seq_len), -100, dtype=torch.long, device=device)
        self.optimizer = torch.optim.SGD(self.params, lr=learning_rate)
        backup = [p.detach().clone() for p in self.params]
        model.train()
        start = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as graph capture requires
            for _ in range(3):
                self.optimizer.zero_grad(set_to_none=True)
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self._step()
        with torch.no_grad():
            for p, b in zip(self.params, backup, strict=True):
                p.copy_(b)
        torch.cuda.synchronize()
        self.capture_ms = (time.perf_counter() - start) * 1000

    def _step(self) -> torch.Tensor:
        logits = self.model(input_ids=self.ids, use_cache=False).logits
        loss = _weighted_loss(logits, self.labels, None)
        loss.backward()
        self.optimizer.step()
        return loss

    def run(self, example: Encoded, *, steps: int) -> tuple[float, float]:
        """``steps`` replays on ``example``; returns ``(last loss, milliseconds)``."""
        start = time.perf_counter()
        n = min(len(example.input_ids), self.ids.shape[1])
        ids = torch.full_like(self.ids, self.pad_id)
        labels = torch.full_like(self.labels, -100)
        ids[0, :n] = torch.tensor(example.input_ids[:n])
        labels[0, :n] = torch.tensor(example.labels[:n])
        self.ids.copy_(ids, non_blocking=True)
        self.labels.copy_(labels, non_blocking=True)
        for _ in range(steps):
            self.graph.replay()
        loss = self.loss.item()  # synchronizes
        if not math.isfinite(loss):
            raise ValueError("non-finite loss during feedback adaptation")
        return loss, (time.perf_counter() - start) * 1000
