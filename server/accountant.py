"""The federation's user-level accountant: Opacus RDP and PRV over the rounds released.

Each released round is one Gaussian mechanism with noise multiplier σ (the sum of clipped
updates carries N(0, (σC)²)) at sampling rate q = clients sampled / population. The q credit
assumes the server samples uniformly at random, which devices cannot verify; their ledgers
therefore charge q = 1 unless ``privacy.verifiable-sampling`` says otherwise.

In ``skellam`` mode a round is the distributed Skellam mechanism instead, charged with its
rounding (``rounding``: :attr:`common.dp.discrete.DiscreteParams.charge`) in RDP
(:mod:`common.dp.accounting`); there is no PRV analysis of it, so both ε are the RDP one.
"""

from __future__ import annotations

import math
from typing import Any

from common.dp.accounting import epsilon


class FederationAccountant:
    """User-level ε of the federation over the rounds actually released."""

    def __init__(
        self,
        *,
        noise_multiplier: float,
        sample_rate: float,
        delta: float,
        rounding: tuple[float, float, float] | None = None,
    ) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.delta = delta
        self.rounding = None if rounding is None else tuple(float(v) for v in rounding)
        self.history: list[tuple] = []

    @property
    def mechanism(self) -> str:
        """``skellam`` (distributed, in SecAgg+'s integers) or ``gaussian``."""
        return "skellam" if self.rounding is not None else "gaussian"

    def _step(self) -> tuple:
        step = (self.noise_multiplier, self.sample_rate, 1)
        return step if self.rounding is None else (*step, self.rounding)

    def epsilon(self, accountant: str = "rdp", *, extra_rounds: int = 0) -> float:
        """ε after the released rounds (plus ``extra_rounds`` more); ``inf`` without noise."""
        if self.noise_multiplier <= 0:
            return math.inf if (self.history or extra_rounds) else 0.0
        history = self.history + [self._step()] * extra_rounds
        return epsilon(history, delta=self.delta, accountant=accountant)

    def next_round_exceeds(self, target_epsilon: float) -> bool:
        """True if releasing one more round would pass ``target_epsilon`` (0 = no target)."""
        return target_epsilon > 0 and self.epsilon("rdp", extra_rounds=1) > target_epsilon

    def release(self) -> None:
        """Charge one released round."""
        self.history.append(self._step())

    def state_dict(self) -> dict[str, Any]:
        """Restorable state."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "history": [[*h[:3], *([list(h[3])] if len(h) == 4 else [])] for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; refuses state kept under other parameters.

        Raises:
            ValueError: On missing keys or mismatched σ, q or δ.
        """
        keys = {"noise_multiplier", "sample_rate", "delta", "history"}
        if set(state) != keys:
            raise ValueError(f"accountant state must have exactly the keys {sorted(keys)}")
        for key in ("noise_multiplier", "sample_rate", "delta"):
            if not math.isclose(float(state[key]), getattr(self, key)):
                raise ValueError(
                    f"accountant state has {key}={state[key]}, not {getattr(self, key)}"
                )
        history = []
        for h in state["history"]:
            kept = tuple(float(v) for v in h[3]) if len(h) == 4 else None
            if (kept is None) != (self.rounding is None) or (
                kept is not None and not all(map(math.isclose, kept, self.rounding or ()))
            ):
                raise ValueError(
                    f"accountant state was kept for another mechanism or rounding ({kept}), "
                    f"not this run's {self.mechanism} ({self.rounding})"
                )
            history.append((float(h[0]), float(h[1]), int(h[2])) + ((kept,) if kept else ()))
        self.history = history
