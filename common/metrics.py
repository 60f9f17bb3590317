"""Evaluation metrics: personalization quality, privacy audits and A/B statistics.

Pure functions over losses, embeddings and counts (no model code), so each can be checked on
constructed cases where the answer is known. Names follow docs/architecture.md ("Definitions"):

* personalization — :func:`win_rate`, :func:`ppl_gain`, :func:`attribution_accuracy`
  (``attribution_acc@K``), :func:`style_consistency`, :func:`context_relevance`,
  :func:`novelty` (distinct-n and embedding distance), :func:`cold_start_k`;
* privacy — :func:`membership_inference` (loss-threshold attack: ROC-AUC and TPR at a low
  FPR), :func:`exposure` (Secret Sharer canary exposure), :func:`leakage_rate`;
* A/B — :func:`welch_test` on summed counts (n, Σx, Σx²) per arm.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import stats

from common.pii import contains_pii


def win_rate(personal: Sequence[float], global_: Sequence[float]) -> float:
    """Share of users whose personal loss is below their global loss."""
    pairs = list(zip(personal, global_, strict=True))
    return sum(p < g for p, g in pairs) / len(pairs) if pairs else float("nan")


def ppl_gain(personal: Sequence[float], global_: Sequence[float]) -> float:
    """Median over users of 1 − ppl_personal / ppl_global (losses are mean token NLL)."""
    gains = [1 - math.exp(p - g) for p, g in zip(personal, global_, strict=True)]
    return float(np.median(gains)) if gains else float("nan")


def attribution_accuracy(
    losses: np.ndarray, owners: Sequence[int], *, k: int, seed: int = 0
) -> float:
    """``attribution_acc@K``: how often a passage's own user's model has the lowest loss.

    Args:
        losses: ``[n_models, n_passages]`` loss of each user's personal model on each passage.
        owners: The owning user (model index) of each passage.
        k: Candidates per passage: the owner and ``k − 1`` other users drawn at random (all
            users if fewer than ``k``). Ties are broken at random, so identical models score
            ``1 / k``.
        seed: RNG seed for the draws and tie-breaks.
    """
    rng = np.random.default_rng(seed)
    n_models = losses.shape[0]
    k = min(k, n_models)
    hits = []
    for p, owner in enumerate(owners):
        others = rng.choice([m for m in range(n_models) if m != owner], k - 1, replace=False)
        candidates = np.array([owner, *others])
        values = losses[candidates, p]
        best = np.flatnonzero(values == values.min())
        hits.append(candidates[rng.choice(best)] == owner)
    return float(np.mean(hits)) if hits else float("nan")


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return a @ b.T


def style_consistency(generated: np.ndarray, owners: Sequence[int], centroids: np.ndarray) -> float:
    """Share of generations whose embedding is nearest to their own user's real-text centroid.

    Args:
        generated: ``[n, d]`` embeddings of generated texts.
        owners: The user (centroid index) each generation was made for.
        centroids: ``[n_users, d]`` centroids of each user's real text.
    """
    nearest = _cos(generated, centroids).argmax(axis=1)
    return float(np.mean(nearest == np.asarray(owners))) if len(owners) else float("nan")


def context_relevance(requests: np.ndarray, answers: np.ndarray, *, seed: int = 0) -> float:
    """How often an answer is closer to its own request than to another request (chance 0.5).

    A pairwise ranking accuracy over embeddings: for each answer i and a random j ≠ i,
    1[cos(answer_i, request_i) > cos(answer_i, request_j)]; ties count half.
    """
    n = len(requests)
    if n < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    sims = _cos(answers, requests)
    scores = []
    for i in range(n):
        j = rng.choice([x for x in range(n) if x != i])
        scores.append(1.0 if sims[i, i] > sims[i, j] else 0.5 if sims[i, i] == sims[i, j] else 0.0)
    return float(np.mean(scores))


def distinct_n(texts: Iterable[str], n: int = 2) -> float:
    """Unique word n-grams / all word n-grams over ``texts`` (0 when there are none)."""
    grams: list[tuple[str, ...]] = []
    for text in texts:
        words = text.lower().split()
        grams += [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def novelty(
    personal_texts: Sequence[str],
    global_texts: Sequence[str],
    personal_emb: np.ndarray,
    global_emb: np.ndarray,
) -> dict[str, float]:
    """Diversity of personalized generations, and how far they move from the global model's.

    Returns:
        ``distinct_2`` of the personalized texts (reported against the seed's 0.6–0.8 band),
        ``distinct_2_global`` for reference, and ``embedding_distance`` — the mean
        1 − cos between the personalized and the global generation for the same prompt.
    """
    dist = 1 - np.diag(_cos(personal_emb, global_emb)) if len(personal_texts) else np.array([])
    return {
        "distinct_2": distinct_n(personal_texts, 2),
        "distinct_2_global": distinct_n(global_texts, 2),
        "embedding_distance": float(dist.mean()) if dist.size else float("nan"),
    }


def cold_start_k(curve: dict[int, float], *, threshold: float = 0.85) -> int | None:
    """Smallest number of local interactions after which win_rate ≥ ``threshold`` and stays."""
    ks = sorted(curve)
    for i, k in enumerate(ks):
        if all(curve[x] >= threshold for x in ks[i:]):
            return k
    return None


def roc_auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """ROC-AUC of scores where ``positive`` should score higher (ties count half)."""
    pos, neg = np.asarray(positive, float), np.asarray(negative, float)
    if not len(pos) or not len(neg):
        return float("nan")
    ranks = stats.rankdata(np.concatenate([pos, neg]))
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def tpr_at_fpr(positive: Sequence[float], negative: Sequence[float], *, fpr: float) -> float:
    """True-positive rate at the strictest threshold whose false-positive rate is ≤ ``fpr``.

    With fewer than 1/fpr negatives the only such threshold admits no negative at all.
    """
    pos, neg = np.asarray(positive, float), np.asarray(negative, float)
    allowed = math.floor(fpr * len(neg))
    neg_sorted = np.sort(neg)[::-1]
    # Threshold strictly above the (allowed+1)-th highest negative score.
    threshold = neg_sorted[allowed] if allowed < len(neg_sorted) else -np.inf
    return float(np.mean(pos > threshold)) if len(pos) else float("nan")


def membership_inference(
    member_losses: Sequence[float], nonmember_losses: Sequence[float], *, fpr: float = 0.001
) -> dict[str, float]:
    """Loss-threshold membership attack (lower loss ⇒ "member").

    Returns:
        ``mia_auc`` (0.5 = no better than chance), ``tpr_at_fpr`` and the counts.
    """
    pos = -np.asarray(member_losses, float)
    neg = -np.asarray(nonmember_losses, float)
    return {
        "mia_auc": roc_auc(pos, neg),
        "tpr_at_fpr": tpr_at_fpr(pos, neg, fpr=fpr),
        "fpr": fpr,
        "members": len(pos),
        "nonmembers": len(neg),
    }


def exposure(canary_loss: float, reference_losses: Sequence[float]) -> float:
    """Secret Sharer exposure: log2 |R| − log2 rank of the canary among R candidates.

    ``reference_losses`` are the losses of the other candidates (same format, random values,
    never inserted); the canary's rank is 1 + the number with a lower loss. Maximum:
    log2 |R| (the canary is the likeliest); about 1 for a canary the model never saw.
    """
    ref = np.asarray(reference_losses, float)
    size = len(ref) + 1
    rank = 1 + int(np.sum(ref < canary_loss))
    return math.log2(size) - math.log2(rank)


def leakage_rate(texts: Sequence[str], secrets: Sequence[str]) -> float:
    """Share of generated texts that contain any secret (e.g. a canary) or detectable PII."""
    if not texts:
        return float("nan")
    leaked = [any(s in t for s in secrets) or contains_pii(t) for t in texts]
    return float(np.mean(leaked))


def welch_test(
    a: tuple[float, float, float], b: tuple[float, float, float], *, level: float = 0.95
) -> dict[str, float]:
    """Welch's t-test for mean(b) − mean(a) from summed counts ``(n, Σx, Σx²)`` per arm.

    Returns:
        Means, the difference, its ``level`` confidence interval, t, Welch–Satterthwaite
        degrees of freedom and the two-sided p-value (NaN where an arm has < 2 samples).
    """
    (na, sa, qa), (nb, sb, qb) = a, b
    out = {"n_a": na, "n_b": nb, "mean_a": float("nan"), "mean_b": float("nan")}
    if na > 0:
        out["mean_a"] = sa / na
    if nb > 0:
        out["mean_b"] = sb / nb
    out["diff"] = out["mean_b"] - out["mean_a"]
    nan = float("nan")
    out.update({"ci_low": nan, "ci_high": nan, "t": nan, "df": nan, "p_value": nan})
    if na < 2 or nb < 2:
        return out
    va = max(0.0, (qa - na * out["mean_a"] ** 2) / (na - 1))
    vb = max(0.0, (qb - nb * out["mean_b"] ** 2) / (nb - 1))
    se2 = va / na + vb / nb
    if se2 <= 0:
        return out
    se = math.sqrt(se2)
    df = se2**2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    t = out["diff"] / se
    crit = float(stats.t.ppf(0.5 + level / 2, df))
    out.update(
        {
            "ci_low": out["diff"] - crit * se,
            "ci_high": out["diff"] + crit * se,
            "t": t,
            "df": df,
            "p_value": float(2 * stats.t.sf(abs(t), df)),
        }
    )
    return out
