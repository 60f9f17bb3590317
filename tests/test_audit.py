"""The one-run privacy audit (Steinke, Nasr & Jagielski 2023) and its canaries."""

from __future__ import annotations

import math
import random

import pytest

from common import audit
from common.config import parse_run_config


def test_all_correct_guesses_prove_the_binomial_bound() -> None:
    # r guesses all right: P = q^r < 0.05 exactly when q > 0.05^(1/r); ε = log(q / (1 - q)).
    for r in (20, 100):
        q = 0.05 ** (1 / r)
        got = audit.epsilon_lower_bound(1000, r, r, delta=0.0)
        assert got == pytest.approx(math.log(q / (1 - q)), rel=1e-6)


def test_the_bound_grows_with_correct_guesses_and_shrinks_with_delta() -> None:
    bounds = [audit.epsilon_lower_bound(1000, 100, v, delta=1e-5) for v in (50, 60, 70, 90)]
    assert bounds[0] == 0.0  # chance level proves nothing
    assert bounds == sorted(bounds) and bounds[-1] > 1.5
    assert audit.epsilon_lower_bound(1000, 100, 90, delta=1e-3) < bounds[-1]
    with pytest.raises(ValueError, match="v <= r <= m"):
        audit.audit_p_value(10, 20, 5, 1.0, 0.0)


def test_a_release_that_ignores_the_canaries_rarely_passes_any_bound() -> None:
    # Scores independent of the coins (what a release that learned nothing gives): the bound
    # at 95 % confidence should be 0 in about 95 % of audits or more.
    rng = random.Random(0)
    positive = 0
    for _ in range(200):
        coins = [rng.random() < 0.5 for _ in range(256)]
        scores = [rng.gauss(0, 1) for _ in range(256)]
        positive += audit.one_run_audit(scores, coins, delta=1e-5)["epsilon_lower_bound"] > 0
    assert positive <= 0.08 * 200


def test_scores_that_separate_the_coins_prove_a_large_epsilon() -> None:
    rng = random.Random(1)
    coins = [rng.random() < 0.5 for _ in range(256)]
    scores = [(1.0 if c else 0.0) + rng.gauss(0, 0.01) for c in coins]
    result = audit.one_run_audit(scores, coins, delta=1e-5)
    assert result["guesses"] == 128 and result["correct"] == 128
    assert result["epsilon_lower_bound"] > 3


def test_one_run_canaries_are_planted_by_coin_each_in_one_user() -> None:
    cfg = parse_run_config(
        {"audit.canaries": 64, "audit.canary-users": 4, "audit.one-run": True, "seed": 3}
    )
    coins = audit.included(cfg)
    assert coins == audit.included(cfg) and 16 < sum(coins) < 48  # the auditor rebuilds them
    canaries = audit.canaries(cfg)
    per_user = [audit.planted(cfg, u) for u in range(5)]
    assert per_user[4] == []
    for u in range(4):
        expected = {canaries[j] for j in range(64) if coins[j] and j % 4 == u}
        assert set(per_user[u]) == expected
        assert len(per_user[u]) == len(expected) * cfg.audit.canary_repeats
    # Without the one-run audit every canary goes to every canary user.
    plain = parse_run_config({"audit.canaries": 3, "audit.canary-users": 2})
    assert audit.included(plain) == [True] * 3
    assert set(audit.planted(plain, 1)) == set(audit.canaries(plain))
