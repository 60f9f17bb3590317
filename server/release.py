"""The one release rule of a round, for both server paths (Message-API FedAvg and SecAgg+).

Devices send the clipped, noised *change* of the shared tensors (never a model). Given the
round's mean change, a round is **released** only if at least m_min users' updates are in it
(fewer would carry less noise than the guarantee promises), its shapes are the model's and
every value is finite. A released round gets the central noise σC/m when the server adds it,
moves the global tensors one server-optimizer step along the mean (``server/optimizer.py``;
``sgd``: ``current + server.learning-rate · mean``), hands the released mean to ``on_release``
(the ServerApp keeps it under ``<run_dir>/released/``), charges the federation
accountant and records the A/B sums; a discarded one keeps the previous tensors and is
recorded with the reason. The strategies (``server/strategy.py``, ``server/secagg.py``) only
sample, collect and average; both take their common options as one :class:`RoundOptions` and
share the round book-keeping of :class:`RoundSchedule`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.common.logger import log

from common.sampling import evaluation_due
from server.optimizer import ServerStep
from server.recorder import RoundRecorder


class ReleasePolicy:
    """Decide and apply one round's release.

    Args:
        recorder: Run bookkeeping (holds the federation accountant, if any).
        min_updates: m_min.
        central_noise_std: σC in central mode (noise on the *sum*), else 0.
        server_step: The server optimizer (default: ``sgd`` at 1, FedAvg).
        on_release: Called with the round and the mean change it released (noised), before
            the step.
    """

    def __init__(
        self,
        recorder: RoundRecorder,
        *,
        min_updates: int,
        central_noise_std: float = 0.0,
        server_step: ServerStep | None = None,
        on_release: Callable[[int, dict[str, np.ndarray]], None] | None = None,
    ) -> None:
        self.recorder = recorder
        self.min_updates = min_updates
        self.central_noise_std = central_noise_std
        self.server_step = server_step if server_step is not None else ServerStep()
        self.on_release = on_release

    def problem(
        self,
        current: Mapping[str, np.ndarray],
        mean: Mapping[str, np.ndarray] | None,
        users: int,
    ) -> str:
        """Why the round may not be released (``""``: it may)."""
        if users < self.min_updates:
            return f"{users} updates < m_min {self.min_updates}"
        if mean is None or set(mean) != set(current):
            return "the aggregate does not hold the shared tensors"
        if any(np.shape(mean[n]) != np.shape(current[n]) for n in current):
            return "the aggregate has the wrong shapes"
        if not all(np.isfinite(mean[n]).all() for n in current):
            return "the aggregate is not finite"
        return ""

    def apply(
        self,
        server_round: int,
        current: Mapping[str, np.ndarray],
        mean: Mapping[str, np.ndarray] | None,
        *,
        users: int,
        rows: list[dict[str, float]],
        failures: int,
        ab_counts: np.ndarray | None = None,
    ) -> dict[str, np.ndarray] | None:
        """The next global tensors, or ``None`` when the round is discarded (recorded either
        way).

        Args:
            server_round: The run's round.
            current: The global shared tensors the round started from.
            mean: The mean change over the round's users (``None``: nothing arrived).
            users: How many users' updates are in ``mean``.
            rows: The replies' metrics (for the round record).
            failures: Failed, malformed and never-answered replies.
            ab_counts: The federation-wide A/B sums, when they came with the round.
        """
        problem = self.problem(current, mean, users)
        if problem:
            log(
                WARNING, "round %s discarded: %s; keeping the previous model", server_round, problem
            )
            self.recorder.trained(
                server_round, rows, failures=failures, released=False, note=f"discarded: {problem}"
            )
            return None
        assert mean is not None
        change = {n: np.asarray(mean[n], np.float64) for n in current}
        if self.central_noise_std > 0:
            rng = np.random.default_rng(secrets.randbits(128))  # the OS's randomness
            std = self.central_noise_std / users
            change = {n: a + rng.normal(0.0, std, size=a.shape) for n, a in change.items()}
            log(INFO, "central DP: added N(0, %.3g²) to the mean update", std)
        if self.on_release is not None:
            self.on_release(server_round, change)
        released = self.server_step.step(current, change)
        if ab_counts is not None and np.isfinite(ab_counts).all():
            self.recorder.ab(server_round, np.asarray(ab_counts, np.float64))
        if self.recorder.accountant is not None:
            self.recorder.accountant.release()
        self.recorder.trained(server_round, rows, failures=failures, released=True)
        return released


@dataclass
class RoundOptions:
    """What both round strategies (``PersonaFedAvg``, ``SecAggDPStrategy``) are given alike:
    one field per option, its default beside it."""

    # Run bookkeeping (holds the federation accountant, if any).
    recorder: RoundRecorder
    # m_min: a round with fewer updates is discarded.
    min_updates: int
    # σC on the *sum* in central mode (the server's noise), else 0.
    central_noise_std: float = 0.0
    # Stop before the federation's ε would pass this (0 = no target).
    target_epsilon: float = 0.0
    # Share of the nodes online sampled to train / to evaluate per round.
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    # ``fixed`` or ``poisson`` (the training cohort; see ``common/sampling.py``).
    sampling: str = "fixed"
    # Evaluate every N rounds and the last (0: the last only); needs ``num_rounds``.
    evaluate_every: int = 1
    num_rounds: int = 0
    # Rounds done before this ServerApp started (a resumed run): Flower's round r is the
    # run's round ``round_offset + r``.
    round_offset: int = 0
    # Called after each round's training phase and again after its evaluation (the ServerApp
    # checkpoints there); each strategy says with which arguments.
    on_round_end: Callable[..., None] | None = None
    # The server optimizer (``server/optimizer.py``; default: FedAvg).
    server_step: ServerStep | None = None
    # Called with each released round and its mean change (noised), before the step.
    on_release: Callable[[int, dict[str, np.ndarray]], None] | None = None


class RoundSchedule:
    """The round book-keeping both strategies share: run round numbers, the privacy target,
    the Poisson cohort's floor, the evaluation schedule and the release rule."""

    def _adopt(self, options: RoundOptions) -> None:
        self.options = options
        self.recorder = options.recorder
        self.min_updates = options.min_updates
        self.target_epsilon = options.target_epsilon
        self.sampling = options.sampling
        self.evaluate_every = options.evaluate_every
        self.num_rounds = options.num_rounds
        self.round_offset = options.round_offset
        self.on_round_end = options.on_round_end
        self.release = ReleasePolicy(
            options.recorder,
            min_updates=options.min_updates,
            central_noise_std=options.central_noise_std,
            server_step=options.server_step,
            on_release=options.on_release,
        )
        self.sampled: dict[int, int] = {}
        self.stopped_at: int | None = None

    def _stopping(self, server_round: int) -> bool:
        """Open the run's round ``server_round``; ``True`` once the privacy target forbids it
        (the round is recorded as where the run stopped)."""
        self.stopped_at = self.recorder.open_round(
            server_round, stopped_at=self.stopped_at, target_epsilon=self.target_epsilon
        )
        return self.stopped_at is not None

    def _too_few(self, server_round: int, cohort: list[Any]) -> bool:
        """A Poisson cohort below m_min: the round is skipped and nothing is sent."""
        if self.sampling != "poisson" or len(cohort) >= self.min_updates:
            return False
        log(
            WARNING,
            "round %s skipped: a Poisson cohort of %s < m_min=%s (nothing sent)",
            server_round,
            len(cohort),
            self.min_updates,
        )
        return True

    def _evaluation_skipped(self, server_round: int) -> bool:
        """The run's round ``server_round`` is not one ``evaluate-every`` evaluates."""
        return bool(self.num_rounds) and not evaluation_due(
            server_round, self.num_rounds, self.evaluate_every
        )
