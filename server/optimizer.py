"""The server's step along each released round's (clipped, noised) mean change.

Devices send changes, never models; the server treats the round's mean change as a
pseudo-gradient (Reddi et al., "Adaptive Federated Optimization", ICLR'21) and moves the global
tensors with one of:

* ``sgd``: ``x += lr · Δ`` (FedAvg with a server learning rate; ``lr = 1`` is FedAvg).
* ``momentum``: ``v = β·v + Δ``, ``x += lr · v`` (FedAvgM, Hsu et al. 2019).
* ``adam``: ``m = β₁·m + (1-β₁)·Δ``, ``u = β₂·u + (1-β₂)·Δ²``, ``x += lr · m / (√u + τ)``
  (FedAdam, without bias correction, as in Reddi et al.).
* ``yogi``: as ``adam`` with ``u = u - (1-β₂)·Δ²·sign(u - Δ²)`` (FedYogi).

Everything here is post-processing of what the round released (the noised aggregate), so no
choice costs privacy. The state (``v``, ``m``, ``u``) lives in the server's checkpoint; a
resumed run continues with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from common.config import SERVER_OPTIMIZERS, ServerConfig


class ServerStep:
    """One server optimizer and its state.

    Args:
        kind: One of :data:`common.config.SERVER_OPTIMIZERS` (``server.optimizer``).
        learning_rate: The server learning rate (``server.learning-rate``).
        momentum: β (``momentum``) or β₁ (``adam``, ``yogi``) (``server.momentum``).
        beta2: β₂ of ``adam`` and ``yogi`` (``server.beta2``).
        tau: τ, the adaptivity floor of ``adam`` and ``yogi`` (``server.tau``).
    """

    def __init__(
        self,
        kind: str = "sgd",
        *,
        learning_rate: float = 1.0,
        momentum: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        if kind not in SERVER_OPTIMIZERS:
            raise ValueError(
                f"server.optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}; got {kind!r}"
            )
        self.kind = kind
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.beta2 = beta2
        self.tau = tau
        self.first: dict[str, np.ndarray] = {}  # v (momentum) or m (adam, yogi)
        self.second: dict[str, np.ndarray] = {}  # u (adam, yogi)

    def step(
        self, current: Mapping[str, np.ndarray], change: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The next global tensors (float32) from ``current`` and the round's mean ``change``."""
        out = {}
        for name, x in current.items():
            delta = np.asarray(change[name], np.float64)
            out[name] = (np.asarray(x, np.float64) + self._direction(name, delta)).astype(
                np.float32
            )
        return out

    def _direction(self, name: str, delta: np.ndarray) -> np.ndarray:
        lr = self.learning_rate
        if self.kind == "sgd":
            return lr * delta
        zeros = np.zeros_like(delta)
        if self.kind == "momentum":
            v = self.momentum * self.first.get(name, zeros) + delta
            self.first[name] = v
            return lr * v
        m = self.momentum * self.first.get(name, zeros) + (1 - self.momentum) * delta
        u = self.second.get(name, zeros)
        sq = delta * delta
        if self.kind == "adam":
            u = self.beta2 * u + (1 - self.beta2) * sq
        else:
            u = u - (1 - self.beta2) * sq * np.sign(u - sq)
        self.first[name], self.second[name] = m, u
        return lr * m / (np.sqrt(u) + self.tau)

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's kind and state (for the checkpoint): ``{"kind": ..., "first":
        {name: array}, "second": {name: array}}``."""
        return {"kind": self.kind, "first": dict(self.first), "second": dict(self.second)}

    @classmethod
    def of(cls, cfg: ServerConfig) -> ServerStep:
        """The optimizer a run's ``server.*`` keys describe."""
        return cls(
            cfg.optimizer,
            learning_rate=cfg.learning_rate,
            momentum=cfg.momentum,
            beta2=cfg.beta2,
            tau=cfg.tau,
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output.

        Raises:
            ValueError: If it was written by another kind of optimizer.
        """
        if state.get("kind") != self.kind:
            raise ValueError(
                f"the checkpoint's server optimizer is {state.get('kind')!r}, "
                f"this run's is {self.kind!r}"
            )
        self.first = {n: np.asarray(a, np.float64) for n, a in state.get("first", {}).items()}
        self.second = {n: np.asarray(a, np.float64) for n, a in state.get("second", {}).items()}
