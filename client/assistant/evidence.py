"""What the device has learned about its own models: which one should answer, and drift.

Plain numbers kept in the store, readable without loading a model (``fedpersona device
status`` shows them):

* **Cold start** (:class:`Gate`) — a new user gets the federation's global model (plus
  profile prompting); the personal adapter takes over once held-out evidence says it is
  better: the federation's evaluate round (personal vs global loss on the user's held-out
  text) or, on the device, prequential evidence — each feedback example is scored by both
  models *before* it is trained on.
* **Concept drift** (:class:`DriftDetector`) — the personal model's prequential loss on the
  most recent examples is compared with the older ones; a jump flags drift, and the next
  adaptation replays the recent examples with extra steps (old data is down-weighted by not
  being replayed).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np


def choose_variant(gate: Gate, *, has_experts: bool) -> str:
    """The model that answers: ``personal`` once evidence favours it; else ``experts`` (the
    router's mix over the global model) when expert adapters are installed; else ``global``."""
    if gate.use_personal():
        return "personal"
    return "experts" if has_experts else "global"


@dataclass
class Gate:
    """Cold-start gate: global model until held-out evidence favours the personal adapter.

    Attributes:
        federated: ``(personal_loss, global_loss)`` from the federation's last evaluate round.
        prequential: ``(personal_loss, global_loss)`` per feedback example, each measured
            before that example was trained on.
        min_evidence: Prequential examples needed before they decide.
    """

    federated: tuple[float, float] | None = None
    prequential: list[tuple[float, float]] = field(default_factory=list)
    min_evidence: int = 3

    def record(self, *, personal_loss: float, global_loss: float) -> None:
        """Add one prequential comparison (keeps the last 50)."""
        self.prequential = [*self.prequential, (personal_loss, global_loss)][-50:]

    def use_personal(self) -> bool:
        """Whether the personal adapter should answer."""
        if len(self.prequential) >= self.min_evidence:
            p, g = np.mean(self.prequential, axis=0)
            return bool(p < g)
        if self.federated is not None:
            return self.federated[0] < self.federated[1]
        return False

    def reason(self) -> str:
        """Why :meth:`use_personal` decided as it did (for ``status``)."""
        n = len(self.prequential)
        if n >= self.min_evidence:
            p, g = np.mean(self.prequential, axis=0)
            return f"on-device evidence ({n} feedback examples): personal {p:.3f} vs global {g:.3f}"
        if self.federated is not None:
            p, g = self.federated
            return f"federation held-out loss: personal {p:.3f} vs global {g:.3f}"
        return f"cold start: no evidence yet ({n}/{self.min_evidence} feedback examples)"

    def state_dict(self) -> dict:
        """JSON-serializable state."""
        return {"prequential": [list(x) for x in self.prequential]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            ValueError: On malformed state.
        """
        if set(state) != {"prequential"}:
            raise ValueError("gate state must have exactly the key 'prequential'")
        pairs = state["prequential"]
        if not all(isinstance(x, list) and len(x) == 2 for x in pairs):
            raise ValueError("gate state: prequential must be [personal, global] pairs")
        self.prequential = [(float(a), float(b)) for a, b in pairs]


@dataclass
class DriftDetector:
    """Flags drift when recent prequential losses jump above the older ones.

    Attributes:
        window: Number of most recent examples compared with the rest.
        threshold: Relative increase of the recent mean loss that counts as drift.
    """

    window: int = 4
    threshold: float = 0.25
    losses: list[float] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)

    def update(self, loss: float, *, now: float | None = None) -> bool:
        """Add the personal model's prequential loss on a new example; ``True`` on drift."""
        self.losses = [*self.losses, float(loss)][-100:]
        if len(self.losses) < 2 * self.window:
            return False
        recent = float(np.mean(self.losses[-self.window :]))
        older = float(np.mean(self.losses[: -self.window]))
        drifted = recent > older * (1 + self.threshold)
        if drifted:
            self.events.append(
                {"time": time.time() if now is None else now, "recent": recent, "older": older}
            )
            # Start a new reference period: the old data no longer describes this user.
            self.losses = self.losses[-self.window :]
        return drifted

    def replay_weights(self, n: int) -> list[float]:
        """Weights for replaying ``n`` examples, oldest first: recent ones count most."""
        return [0.5 ** ((n - 1 - i) / self.window) for i in range(n)]

    def state_dict(self) -> dict:
        """JSON-serializable state."""
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            ValueError: On malformed state.
        """
        if set(state) != {"window", "threshold", "losses", "events"}:
            raise ValueError("drift state has wrong keys")
        self.window = int(state["window"])
        self.threshold = float(state["threshold"])
        self.losses = [float(x) for x in state["losses"]]
        self.events = list(state["events"])
