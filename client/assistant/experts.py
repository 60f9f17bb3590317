"""Mixture of experts on the device: expert adapters, stored and routed by the user's embedding.

An expert is a peft adapter's LoRA B tensors (e.g. a federation cluster's adapter) with the
embedding of what it is good at. The router gates them by the user embedding (softmax over
cosine similarity, top k) and mixes Σ g_i B_i — exact where the experts differ only in LoRA B
(``fedsa``, whose A is shared): Σ g_i B_i A = (Σ g_i B_i) A. The mix answers while the cold-start
gate still says the personal model has no evidence (:mod:`client.assistant.evidence`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.store import LocalStore
from client.store.state import EXPERTS_BLOB, tensors_from_bytes, tensors_to_bytes
from common.personalization.base import is_lora_b
from common.pii import scrub


@dataclass
class Expert:
    """An expert adapter: LoRA B tensors and the embedding of what it is good at."""

    name: str
    centroid: np.ndarray
    tensors: dict[str, torch.Tensor]


class ExpertRouter:
    """Softmax gate over experts by cosine similarity to the user embedding.

    Args:
        experts: Candidate experts; all must hold the same LoRA B names and shapes.
        temperature: Softmax temperature over cosine similarities.
        top_k: Keep only the ``top_k`` highest gates (renormalized).

    Raises:
        ValueError: No experts, non-B tensors (mixing would not be exact), or mismatched names.
    """

    def __init__(self, experts: Sequence[Expert], *, temperature: float = 0.1, top_k: int = 2):
        if not experts:
            raise ValueError("the router needs at least one expert")
        names = set(experts[0].tensors)
        for e in experts:
            if set(e.tensors) != names:
                raise ValueError(f"expert {e.name!r} holds different tensors than the others")
            if not all(is_lora_b(n) for n in e.tensors):
                raise ValueError(
                    f"expert {e.name!r} holds LoRA A tensors; mixing is exact only for LoRA B "
                    "(use the fedsa strategy, whose A is shared)"
                )
        self.experts = list(experts)
        self.temperature = temperature
        self.top_k = top_k

    def gates(self, user: np.ndarray) -> np.ndarray:
        """Gate weights (sum to 1, at most ``top_k`` non-zero) for a user embedding."""
        sims = np.array([float(np.dot(user, e.centroid)) for e in self.experts])
        logits = sims / self.temperature
        weights = np.exp(logits - logits.max())
        if self.top_k < len(weights):
            weights[np.argsort(weights)[: len(weights) - self.top_k]] = 0.0
        return weights / weights.sum()

    def mix(self, user: np.ndarray) -> dict[str, torch.Tensor]:
        """Σ g_i B_i over experts: the B tensors to hot-swap in for this user."""
        g = self.gates(user)
        out = {n: torch.zeros_like(t) for n, t in self.experts[0].tensors.items()}
        for weight, expert in zip(g, self.experts, strict=True):
            if weight > 0:
                for n, t in expert.tensors.items():
                    out[n] += float(weight) * t
        return out


def load_router(store: LocalStore) -> ExpertRouter | None:
    """The router over the experts installed in ``store`` (``None``: there are none).

    Raises:
        ValueError: An expert whose tensors are missing or unreadable.
    """
    raw = store.get_json(EXPERTS_BLOB)
    if not raw:
        return None
    experts = []
    for name, spec in raw.items():
        blob = store.get_blob(f"expert:{name}")
        if blob is None:
            raise ValueError(f"expert {name!r} has no tensors in the store")
        experts.append(
            Expert(name, np.asarray(spec["centroid"], np.float32), tensors_from_bytes(blob, name))
        )
    return ExpertRouter(experts)


def install(
    store: LocalStore,
    shapes: Mapping[str, tuple[int, ...]],
    embedder: Any,
    name: str,
    adapter_dir: Path,
    *,
    about: str,
) -> None:
    """Store a peft adapter's LoRA B tensors as expert ``name``, described by ``about``.

    Args:
        store: The device store.
        shapes: The device model's LoRA tensor shapes (the adapter must fit them).
        embedder: Embeds ``about`` (the expert's centroid).
        name: The expert's name (an existing one is replaced).
        adapter_dir: A peft adapter folder (``adapter_model.safetensors``).
        about: What the expert is good at.

    Raises:
        ValueError: Shapes or names that do not fit this device's model.
        FileNotFoundError: No adapter in ``adapter_dir``.
    """
    from safetensors.torch import load_file

    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    b = {
        k.replace(".lora_B.weight", ".lora_B.default.weight"): v
        for k, v in tensors.items()
        if ".lora_B." in k
    }
    want = {n: shapes[n] for n in shapes if is_lora_b(n) and ".default." in n}
    if set(b) != set(want) or any(tuple(b[n].shape) != want[n] for n in want):
        raise ValueError(
            f"adapter {adapter_dir} does not fit this device's model/LoRA "
            f"({len(b)} B tensors vs {len(want)} expected, or different shapes)"
        )
    centroid = embedder.encode_one(about)
    raw = store.get_json(EXPERTS_BLOB) or {}
    raw[name] = {"about": scrub(about), "centroid": centroid.tolist()}
    with store.batch():
        store.put_blob(f"expert:{name}", tensors_to_bytes(b, {"expert": name}))
        store.put_json(EXPERTS_BLOB, raw)
