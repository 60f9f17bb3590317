"""Metrics on constructed cases where the answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from common import ab
from common.metrics import (
    attribution_accuracy,
    cold_start_k,
    context_relevance,
    distinct_n,
    exposure,
    leakage_rate,
    membership_inference,
    novelty,
    ppl_gain,
    roc_auc,
    style_consistency,
    tpr_at_fpr,
    welch_test,
    win_rate,
)

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _fresh_rng() -> None:
    """Each test draws the same numbers whichever tests ran before it."""
    global RNG
    RNG = np.random.default_rng(0)


def test_win_rate_and_ppl_gain() -> None:
    assert win_rate([1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 5.0]) == 0.5
    assert ppl_gain([2.0, 2.0, 2.0], [2.0, 2.0 + math.log(2), 2.0]) == 0.0
    assert ppl_gain([1.0], [1.0 + math.log(2)]) == pytest.approx(0.5)


def test_a_perfectly_memorizing_model_gives_mia_auc_one() -> None:
    result = membership_inference(RNG.uniform(0, 0.1, 500), RNG.uniform(2, 4, 5000))
    assert result["mia_auc"] == 1.0 and result["tpr_at_fpr"] == 1.0


def test_identical_distributions_give_mia_auc_one_half() -> None:
    members, nonmembers = RNG.normal(3, 1, 4000), RNG.normal(3, 1, 4000)
    result = membership_inference(members, nonmembers)
    assert result["mia_auc"] == pytest.approx(0.5, abs=0.03)
    assert result["tpr_at_fpr"] < 0.01


def test_roc_auc_matches_the_pairwise_definition_and_tpr_respects_fpr() -> None:
    pos, neg = RNG.normal(1, 1, 300), RNG.normal(0, 1, 400)
    pairwise = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert roc_auc(pos, neg) == pytest.approx(pairwise)
    neg = np.arange(1000, dtype=float)
    tpr = tpr_at_fpr(np.array([998.5, 999.5, 500.0]), neg, fpr=0.001)
    assert tpr == pytest.approx(2 / 3)  # above the 2nd-highest negative: FPR = 1/1000


def test_attribution_with_identical_adapters_is_at_chance() -> None:
    losses = np.ones((10, 2000))
    owners = RNG.integers(0, 10, 2000)
    assert attribution_accuracy(losses, owners, k=10) == pytest.approx(0.1, abs=0.02)
    assert attribution_accuracy(losses, owners, k=5) == pytest.approx(0.2, abs=0.03)


def test_attribution_with_distinct_adapters_is_perfect() -> None:
    owners = np.repeat(np.arange(6), 5)
    losses = np.full((6, 30), 3.0)
    losses[owners, np.arange(30)] = 1.0
    assert attribution_accuracy(losses, owners, k=10) == 1.0


def test_style_consistency_and_context_relevance() -> None:
    centroids = np.eye(8)[:4]
    owners = np.repeat(np.arange(4), 10)
    gens = centroids[owners] + 0.05 * RNG.normal(size=(40, 8))
    assert style_consistency(gens, owners, centroids) == 1.0
    assert style_consistency(gens, (owners + 1) % 4, centroids) == 0.0
    requests = RNG.normal(size=(200, 16))
    assert context_relevance(requests, requests) == 1.0
    assert context_relevance(requests, RNG.normal(size=(200, 16))) == pytest.approx(0.5, abs=0.1)


def test_distinct_n_and_novelty() -> None:
    assert distinct_n(["a b a b a b"], 2) == pytest.approx(2 / 5)
    assert distinct_n(["the cat sat", "on the mat"], 2) == 1.0
    e = np.eye(4)
    out = novelty(["x y z", "x y z"], ["x y z", "p q r"], e[:2], e[:2])
    assert out["distinct_2"] == 0.5 and out["distinct_2_global"] == 1.0
    assert out["embedding_distance"] == pytest.approx(0.0)
    assert novelty(["a b"], ["c d"], e[:1], e[1:2])["embedding_distance"] == pytest.approx(1.0)


def test_cold_start_k_is_where_the_curve_stays_above_threshold() -> None:
    assert cold_start_k({0: 0.0, 1: 0.5, 3: 0.9, 5: 0.8, 8: 0.9, 13: 1.0}) == 8
    assert cold_start_k({0: 0.0, 5: 0.5}) is None
    assert cold_start_k({0: 0.9}) == 0


def test_exposure_of_a_memorized_and_an_unseen_canary() -> None:
    reference = RNG.normal(5, 0.5, 2**10 - 1)
    assert exposure(0.1, reference) == pytest.approx(10.0)  # rank 1 of 1024
    unseen = [exposure(float(RNG.normal(5, 0.5)), reference) for _ in range(400)]
    # E[exposure] for a random rank is about 1/ln 2 ≈ 1.44 bits
    assert np.mean(unseen) == pytest.approx(1 / math.log(2), abs=0.25)


def test_leakage_rate_counts_secrets_and_pii() -> None:
    texts = ["my code is 4 8 1 5", "nothing here", "mail bob@example.com", "fine"]
    assert leakage_rate(texts, ["4 8 1 5"]) == 0.5


def test_welch_matches_scipy_on_raw_samples() -> None:
    a, b = RNG.integers(1, 6, 40).astype(float), RNG.integers(2, 6, 55).astype(float)
    out = welch_test((len(a), a.sum(), (a**2).sum()), (len(b), b.sum(), (b**2).sum()))
    ref = stats.ttest_ind(b, a, equal_var=False)
    assert out["diff"] == pytest.approx(b.mean() - a.mean())
    assert out["t"] == pytest.approx(ref.statistic)
    assert out["p_value"] == pytest.approx(ref.pvalue)
    ci = ref.confidence_interval(0.95)
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((ci.low, ci.high))
    assert math.isnan(welch_test((1, 3.0, 9.0), (5, 15.0, 50.0))["p_value"])


def test_ab_counts_ratings_and_summary() -> None:
    ratings = [ab.simulated_rating(loss, 3.0) for loss in (1.0, 2.5, 3.0, 3.5, 6.0)]
    assert ratings == sorted(ratings, reverse=True) and ratings[0] == 5 and ratings[-1] == 1
    assert ratings[2] == 3  # as good as the base model
    c = ab.counts([("global", 3), ("personal", 5), ("personal", 4)])
    np.testing.assert_array_equal(c, [1, 3, 9, 2, 9, 41])
    assert ab.from_metrics(ab.to_metrics(c)).tolist() == c.tolist()
    # Every coordinate of a full round fits inside the clipping range after scaling.
    full = ab.counts([("personal", 5)] * 4)
    assert np.abs(full / ab.scale(4, 0.05)).max() <= 0.05 + 1e-12
    rounds = [ab.counts([("global", 3), ("global", 2), ("personal", 5), ("personal", 4)])] * 3
    summary = ab.summarize(rounds)
    assert summary["n_a"] == 6 and summary["mean_b"] == 4.5 and summary["diff"] == 2.0
    assert summary["ci_low"] > 0 and summary["p_value"] < 0.01
    assert summary["satisfaction"][0]["mean_personal"] == 4.5
