"""Secret Sharer canaries (Carlini et al., USENIX Security 2019) for the privacy audit.

A canary is a chat turn with a random secret — "What is your secret number?" → "My secret
number is 3 8 1 9 4 2." — planted ``audit.canary-repeats`` times in the training data of the
first ``audit.canary-users`` users. After federation, its exposure (:func:`common.metrics.
exposure`) ranks the canary's loss among ``2^k − 1`` candidates of the same format that were
never planted: ~1 bit means the model did not memorize it, log2 |R| that it is the likeliest.
Canaries are derived from the run seed, so the evaluator rebuilds them without the devices.

**One-run audit** (``audit.one-run``; Steinke, Nasr & Jagielski, "Privacy Auditing with One (1)
Training Run", NeurIPS 2023): each canary is planted with probability ½ (a coin from the run
seed, which only the auditor knows), canary j in user ``j mod audit.canary-users``'s data
only. After the run the auditor scores every canary on the released model (how much lower
its loss is than under the base model), guesses "planted" for the top scores and "not
planted" for the bottom ones, and counts its correct guesses: an (ε, δ)-DP release lets at
most a Binomial(r, e^ε/(1 + e^ε)) number of r guesses be right, up to a δ term, so many
correct guesses **prove** the release is not (ε, δ)-DP for small ε
(:func:`epsilon_lower_bound`). That is an empirical lower bound to set beside the
accountant's upper bound, for the neighbouring relation "one record of one user's data
present or absent" (within one user: a replacement of that user's data).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from common.config import RunConfig
from common.data import Sample

CANARY_PROMPT = "What is your secret number?"
DIGITS = 6


def _reply(digits: list[int]) -> str:
    return "My secret number is " + " ".join(map(str, digits)) + "."


def canaries(cfg: RunConfig) -> list[Sample]:
    """The run's canaries (one per ``audit.canaries``), the same on every party."""
    rng = random.Random(f"canary:{cfg.seed}")
    return [
        Sample(CANARY_PROMPT, _reply([rng.randrange(10) for _ in range(DIGITS)]))
        for _ in range(cfg.audit.canaries)
    ]


def included(cfg: RunConfig) -> list[bool]:
    """Which canaries the one-run audit plants (independent fair coins from the run seed);
    every canary without ``audit.one-run``."""
    if not cfg.audit.one_run:
        return [True] * cfg.audit.canaries
    rng = random.Random(f"one-run:{cfg.seed}")
    return [rng.random() < 0.5 for _ in range(cfg.audit.canaries)]


def planted(cfg: RunConfig, partition_id: int) -> list[Sample]:
    """Canary samples to add to ``partition_id``'s training data (empty for most users):
    every canary in each of the first ``audit.canary-users`` users, or under the one-run
    audit the planted canaries j with j mod ``canary-users`` = ``partition_id``."""
    if partition_id >= cfg.audit.canary_users:
        return []
    chosen = [
        c
        for j, (c, keep) in enumerate(zip(canaries(cfg), included(cfg), strict=True))
        if keep and (not cfg.audit.one_run or j % cfg.audit.canary_users == partition_id)
    ]
    return [c for c in chosen for _ in range(cfg.audit.canary_repeats)]


def audit_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least ``v`` of ``r`` guesses right] for an (ε, δ)-DP release with ``m`` canaries
    each included with probability ½ (Steinke, Nasr & Jagielski 2023, Theorem 5.2): the
    Binomial(r, e^ε/(1 + e^ε)) tail, plus δ · 2m times the largest average of the binomial's
    mass just below ``v``."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    from scipy.stats import binom

    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(v - 1, r, q))
    alpha = below = 0.0
    for i in range(1, v + 1):
        below += float(binom.pmf(v - i, r, q))
        alpha = max(alpha, below / i)
    return min(1.0, tail + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float, confidence: float = 0.95) -> float:
    """The largest ε for which ``v`` correct of ``r`` guesses would have probability below
    1 − ``confidence`` under (ε, δ)-DP (0 when even ε = 0 explains them): with that
    confidence, the release is not (ε, δ)-DP for any smaller ε."""
    alpha = 1.0 - confidence
    if audit_p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while audit_p_value(m, r, v, hi, delta) < alpha:
        lo, hi = hi, hi * 2
        if hi > 64:
            return lo
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if audit_p_value(m, r, v, mid, delta) < alpha else (lo, mid)
    return lo


def one_run_audit(
    scores: Sequence[float],
    planted_mask: Sequence[bool],
    *,
    delta: float,
    guess_fraction: float = 0.5,
    confidence: float = 0.95,
) -> dict[str, float | int]:
    """Guess and count: "planted" for the ``guess_fraction``/2 highest scores, "not planted"
    for as many lowest, abstain on the rest (a rule fixed before looking at the coins), and
    the ε lower bound the correct guesses prove (:func:`epsilon_lower_bound`)."""
    m = len(scores)
    if m != len(planted_mask) or m == 0:
        raise ValueError("need one score per canary, and at least one canary")
    k = int(m * guess_fraction / 2)
    order = sorted(range(m), key=lambda i: scores[i])
    guesses = {i: True for i in order[m - k :]} | {i: False for i in order[:k]}
    v = sum(planted_mask[i] == g for i, g in guesses.items())
    return {
        "canaries": m,
        "planted": int(sum(planted_mask)),
        "guesses": 2 * k,
        "correct": v,
        "delta": delta,
        "confidence": confidence,
        "epsilon_lower_bound": epsilon_lower_bound(m, 2 * k, v, delta=delta, confidence=confidence),
    }


def references(cfg: RunConfig, count: int) -> list[Sample]:
    """``count`` never-planted candidates of the canaries' format (distinct from them)."""
    taken = {c.reply for c in canaries(cfg)}
    rng = random.Random(f"reference:{cfg.seed}")
    out: list[Sample] = []
    while len(out) < count:
        reply = _reply([rng.randrange(10) for _ in range(DIGITS)])
        if reply not in taken:
            taken.add(reply)
            out.append(Sample(CANARY_PROMPT, reply))
    return out


# -- Canary clients: the user-level one-run audit -----------------------------------------
#
# The record-level canaries above sit in users' text: a user-level DP release hides them
# among that user's other examples and the federation's other users, so their audit has no
# power at this scale (a run without noise proves ε ≥ 0). Canary *clients* test the guarantee
# the accountant states, for its own neighbouring relation (one client's whole update present
# or absent; Andrew et al., "One-shot empirical privacy estimation for federated learning",
# 2024, with Steinke et al.'s one-run counting): the last ``audit.canary-clients`` of the
# federation's ``data.num-users`` are simulated clients without data. Each takes part in the
# run with probability ½ (a coin from the run seed, which only the auditor knows); its rounds
# are drawn like a user's Poisson sample, at ``fraction-train`` per round, also from the run
# seed; one that takes part sends, in each of its rounds, a fixed random unit direction of its
# own scaled to norm C, through the same clip, noise share and SecAgg+ as every device. After
# the run the auditor scores each canary by how far the released sums moved along its
# direction in its rounds, guesses "took part" for the highest scores only, and counts.

# Guess "took part" for this fraction of the canary clients with the highest scores (fixed
# before any run: a bound computed after choosing the fraction on the result would not hold).
CLIENT_GUESS_FRACTION = 0.1


def canary_client(cfg: RunConfig, partition_id: int) -> int | None:
    """The canary client index ``j`` a simulated partition plays (``None``: a user with data):
    partitions ``[num_users − K, num_users)`` for ``K = audit.canary-clients``."""
    k, n = cfg.audit.canary_clients, cfg.data.num_users
    return partition_id - (n - k) if k and n - k <= partition_id < n else None


def data_partition(cfg: RunConfig, partition_id: int, num_partitions: int) -> tuple[int, int]:
    """``(partition, partitions)`` among the users with data: canary clients take no user's
    data, so user ``i`` of a run with canaries is user ``i`` of the same run without them, and
    users after the federation's (newcomers) follow on."""
    k, n = cfg.audit.canary_clients, cfg.data.num_users
    if not k:
        return partition_id, num_partitions
    if canary_client(cfg, partition_id) is not None:
        raise ValueError(f"partition {partition_id} is a canary client: it has no data")
    return (partition_id if partition_id < n - k else partition_id - k), num_partitions - k


def clients_included(cfg: RunConfig) -> list[bool]:
    """Which canary clients take part (independent fair coins from the run seed)."""
    rng = random.Random(f"canary-client:{cfg.seed}")
    return [rng.random() < 0.5 for _ in range(cfg.audit.canary_clients)]


def client_rounds(cfg: RunConfig, j: int, num_rounds: int) -> list[int]:
    """The rounds (1-based) canary client ``j`` is sampled in: each with probability
    ``fraction-train``, from the run seed (the server cannot tell them from a user's)."""
    rng = random.Random(f"canary-client-rounds:{cfg.seed}:{j}")
    return [r for r in range(1, num_rounds + 1) if rng.random() < cfg.fraction_train]


def client_direction(cfg: RunConfig, j: int, shapes: dict[str, tuple[int, ...]]) -> dict:
    """Canary client ``j``'s unit direction over the shared tensors ``shapes`` (numpy arrays;
    each tensor from its own name's stream, so the order of ``shapes`` does not matter)."""
    import zlib

    import numpy as np

    parts = {
        name: np.random.default_rng([int(cfg.seed), j, zlib.crc32(name.encode())]).standard_normal(
            shape
        )
        for name, shape in shapes.items()
    }
    norm = math.sqrt(sum(float((p**2).sum()) for p in parts.values()))
    return {name: p / norm for name, p in parts.items()}


def client_scores(cfg: RunConfig, released: dict[int, tuple[int, dict]]) -> list[float]:
    """Each canary client's score: the mean movement of the released sums along its direction
    in its rounds, ``⟨u_j, m_r·mean_r⟩`` averaged over its rounds ``r`` among the released
    ones ``{r: (m_r, mean_r)}`` (0 without any). Taking part adds ``C`` to each term; the
    other clients' and the noise's projections are the same for a canary that did not."""
    if not released:
        raise ValueError("no released round to audit")
    shapes = {name: tuple(a.shape) for name, a in next(iter(released.values()))[1].items()}
    last = max(released)
    scores = []
    for j in range(cfg.audit.canary_clients):
        rounds = [r for r in client_rounds(cfg, j, last) if r in released]
        if not rounds:
            scores.append(0.0)
            continue
        u = client_direction(cfg, j, shapes)
        moved = [
            released[r][0] * sum(float((u[n] * released[r][1][n]).sum()) for n in shapes)
            for r in rounds
        ]
        scores.append(sum(moved) / len(moved))
    return scores


def client_audit(
    scores: Sequence[float],
    included: Sequence[bool],
    *,
    delta: float,
    guess_fraction: float = CLIENT_GUESS_FRACTION,
    confidence: float = 0.95,
) -> dict[str, float | int]:
    """Guess "took part" for the ``guess_fraction`` highest scores (abstain on the rest) and
    the ε lower bound the correct guesses prove (:func:`epsilon_lower_bound`)."""
    m = len(scores)
    if m != len(included) or m == 0:
        raise ValueError("need one score per canary client, and at least one")
    k = max(1, int(m * guess_fraction))
    top = sorted(range(m), key=lambda i: scores[i])[m - k :]
    v = sum(bool(included[i]) for i in top)
    return {
        "canary_clients": m,
        "took_part": int(sum(included)),
        "guesses": k,
        "correct": v,
        "delta": delta,
        "confidence": confidence,
        "epsilon_lower_bound": epsilon_lower_bound(m, k, v, delta=delta, confidence=confidence),
    }
