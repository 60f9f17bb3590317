"""The model a user could train alone: the yardstick for what joining the federation gives.

A LoRA of the same size as the adapters the device trains, from the same initialisation, on
the same training examples, with the same optimizer steps, batch size, sequence length and
learning rate as the device spent in its rounds — and no federation and no noise, since
nothing of it leaves the device.

For ``blend`` the personal adapter *is* this model (the device trains nothing else), so
nothing extra is trained: its loss alone is the baseline. For the other strategies it is
trained beside each round on the same batches and kept in the store (blob ``local_only``),
only to report its held-out loss (``eval.local-only``).
"""

from __future__ import annotations

import torch

from client.store import LocalStore
from client.store.state import tensors_from_bytes, tensors_to_bytes
from common.data import Encoded
from common.lora import get_lora_tensors, load_lora_tensors
from common.personalization import Strategy
from common.personalization.base import adapter_of
from common.train import train_steps

LOCAL_ONLY_BLOB = "local_only"


def baseline_names(strategy: Strategy, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Every LoRA tensor (A and B) of each adapter the strategy trains on the device: a user
    alone would train the whole LoRA."""
    trained = {adapter_of(n) for n in shapes if strategy.is_trainable(n)}
    return [n for n in shapes if adapter_of(n) in trained]


def load(store: LocalStore) -> dict[str, torch.Tensor] | None:
    """The stored local-only tensors, or ``None`` before the first round."""
    data = store.get_blob(LOCAL_ONLY_BLOB)
    return None if data is None else tensors_from_bytes(data, "local-only")


def save(store: LocalStore, tensors: dict[str, torch.Tensor]) -> None:
    """Keep the local-only tensors in the store (one transaction, or the open batch)."""
    store.put_blob(LOCAL_ONLY_BLOB, tensors_to_bytes(tensors, {"kind": "local-only"}))


def train_round(
    model: torch.nn.Module,
    trained: dict[str, torch.Tensor] | None,
    *,
    strategy: Strategy,
    init: dict[str, torch.Tensor],
    examples: tuple[Encoded, ...],
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    pad_id: int,
    precision: str = "auto",
) -> tuple[dict[str, torch.Tensor], float]:
    """Train the local-only LoRA (``trained`` so far, else its initialisation) for one round's
    steps on the batches of ``seed``.

    Returns:
        Its tensors after the round, and the round's mean training loss.
    """
    names = baseline_names(strategy, {n: tuple(t.shape) for n, t in init.items()})
    load_lora_tensors(model, {**init, **(trained or {})})
    loss = train_steps(
        model,
        names,
        list(examples),
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        pad_id=pad_id,
        precision=precision,
    )
    return get_lora_tensors(model, names), loss
