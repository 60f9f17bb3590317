"""Round cohorts (fixed or Poisson) and the evaluation schedule, on the real strategies."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common.config import parse_run_config
from common.sampling import evaluation_due, fixed_sample, poisson_sample
from server.recorder import RoundRecorder
from server.release import RoundOptions
from server.strategy import PersonaFedAvg
from tests.flower_harness import InProcessGrid

SHAPES = {"a": (3,)}


def test_poisson_sample_includes_each_item_independently() -> None:
    rng = random.Random(0)
    counts = Counter()
    sizes = []
    for _ in range(2000):
        chosen = poisson_sample(range(50), 0.2, rng)
        sizes.append(len(chosen))
        counts.update(chosen)
    # Mean cohort q·n, binomial spread; every item about q of the time.
    assert np.mean(sizes) == pytest.approx(10, abs=0.3)
    assert np.var(sizes) == pytest.approx(50 * 0.2 * 0.8, rel=0.15)
    assert all(abs(c / 2000 - 0.2) < 0.04 for c in counts.values())
    assert min(sizes) < 5 < 15 < max(sizes)  # cohort sizes really vary


def test_fixed_sample_takes_the_fraction_without_repeats() -> None:
    chosen = fixed_sample(list(range(20)), 0.25, rng=random.Random(1))
    assert len(chosen) == 5 == len(set(chosen))
    assert len(fixed_sample([1, 2, 3], 0.1, minimum=2)) == 2


@pytest.mark.parametrize(
    ("every", "due"),
    [(1, [1, 2, 3, 4, 5]), (2, [2, 4, 5]), (0, [5]), (3, [3, 5])],
)
def test_evaluation_schedule(every: int, due: list[int]) -> None:
    assert [r for r in range(1, 6) if evaluation_due(r, 5, every)] == due


def test_sampling_and_schedule_keys_are_validated() -> None:
    cfg = parse_run_config({"sampling": "poisson", "evaluate-every": 0})
    assert cfg.sampling == "poisson" and cfg.evaluate_every == 0
    with pytest.raises(ValueError, match="`sampling`"):
        parse_run_config({"sampling": "roulette"})
    with pytest.raises(ValueError, match="`evaluate-every`"):
        parse_run_config({"evaluate-every": -1})


def _app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = ArrayRecord({"a": Array(np.ones(3, np.float32))})
        metrics = MetricRecord({"weight": 1, "train_loss": 1.0, "declined": 0})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        metrics = MetricRecord({"personal_loss": 1.0, "global_loss": 2.0})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def test_poisson_cohorts_and_final_only_evaluation_on_the_message_api_path() -> None:
    # Prepare: 30 nodes, q = 0.3, m_min 5, 8 rounds, evaluated after the last one only.
    grid = InProcessGrid(_app(), {nid: {} for nid in range(1, 31)})
    strategy = PersonaFedAvg(
        RoundOptions(
            recorder=RoundRecorder(None),
            min_updates=5,
            sampling="poisson",
            evaluate_every=0,
            num_rounds=8,
            fraction_train=0.3,
            fraction_evaluate=1.0,
        ),
        shapes=SHAPES,
        min_train_nodes=2,
        min_evaluate_nodes=30,
        min_available_nodes=30,
        weighted_by_key="weight",
    )

    # Execute
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord({"a": Array(np.zeros(3, np.float32))}),
        num_rounds=8,
        timeout=30,
        train_config=ConfigRecord({}),
        evaluate_config=ConfigRecord({}),
    )

    # Assert: cohorts of varying size, each node at most once per round; evaluation once,
    # of every node, after round 8; every round closed in the record.
    per_round = [strategy.sampled[r] for r in range(1, 9)]
    trains = [nid for nid, stage in grid.delivered if stage == "train"]
    evaluations = [nid for nid, stage in grid.delivered if stage == "evaluate"]
    assert sum(per_round) == len(trains) and len(set(per_round)) > 1
    assert sorted(evaluations) == list(range(1, 31))
    rounds = strategy.recorder.rounds
    assert [r["round"] for r in rounds] == list(range(1, 9))
    assert [("personal_loss" in r) for r in rounds] == [False] * 7 + [True]
    for r, record in zip(range(1, 9), rounds, strict=True):
        assert record["released"] == (strategy.sampled[r] >= 5)
