"""The one-run privacy audit (Steinke, Nasr & Jagielski 2023) and its canaries."""

from __future__ import annotations

import math
import random

import numpy as np
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


def _canary_cfg(**extra):  # type: ignore[no-untyped-def]
    from tests.conftest import tiny_run_config

    return parse_run_config(
        tiny_run_config(
            **{
                "data.num-users": 7,
                "audit.canary-clients": 4,
                "simulation.users-per-node": 7,
                "sampling": "poisson",
                "fraction-train": 1.0,
                "dp.min-clients": 3,
                **extra,
            }
        )
    )


def test_canary_clients_take_no_users_data_and_have_their_own_directions() -> None:
    cfg = _canary_cfg()
    # Partitions 3-6 are canary clients 0-3; users 0-2 and the newcomers after the federation
    # map onto the data of a run without them.
    assert [audit.canary_client(cfg, p) for p in range(8)] == [None] * 3 + [0, 1, 2, 3, None]
    assert audit.data_partition(cfg, 2, 7) == (2, 3)
    assert audit.data_partition(cfg, 7, 9) == (3, 5)
    with pytest.raises(ValueError, match="canary client"):
        audit.data_partition(cfg, 4, 7)
    shapes = {"b": (3, 2), "a": (5,)}
    u = audit.client_direction(cfg, 1, shapes)
    again = audit.client_direction(cfg, 1, dict(reversed(list(shapes.items()))))
    assert all(np.array_equal(u[n], again[n]) for n in shapes)
    assert math.isclose(sum(float((p**2).sum()) for p in u.values()), 1.0)
    other = audit.client_direction(cfg, 2, shapes)
    assert not np.allclose(u["a"], other["a"])
    assert audit.clients_included(cfg) == audit.clients_included(_canary_cfg())


def test_the_audit_proves_a_large_epsilon_for_a_noiseless_release_and_not_a_noised_one() -> None:
    # Prepare: 400 canary clients in a 6,144-number update; each round the released sum holds
    # the included canaries sampled at q = 0.2 (norm C each) and 40 "users" pulling one way.
    from tests.conftest import tiny_run_config

    cfg = parse_run_config(
        tiny_run_config(
            **{
                "data.num-users": 600,
                "audit.canary-clients": 400,
                "simulation.users-per-node": 25,
                "sampling": "poisson",
                "fraction-train": 0.2,
                "dp.min-clients": 26,
            }
        )
    )
    rng = np.random.default_rng(0)
    shapes, c = {"w": (6144,)}, 0.05
    directions = [audit.client_direction(cfg, j, shapes)["w"] for j in range(400)]
    included = audit.clients_included(cfg)
    shared = rng.standard_normal(6144)
    shared *= 0.78 * 40 * c / np.linalg.norm(shared)  # 40 users' agreeing updates

    schedule = [audit.client_rounds(cfg, j, 10) for j in range(400)]

    def rounds(noise_std: float) -> dict[int, tuple[int, dict]]:
        out = {}
        for r in range(1, 11):
            total = shared + rng.normal(scale=noise_std, size=6144)
            sampled = [j for j in range(400) if included[j] and r in schedule[j]]
            total += sum(c * directions[j] for j in sampled)
            m = 40 + len(sampled)
            out[r] = (m, {"w": total / m})
        return out

    # Execute / Assert: without noise the top-scored canaries are those that took part; with
    # population's noise (σC = 3.11·C on the sum) the guesses are near chance.
    loud = audit.client_audit(audit.client_scores(cfg, rounds(0.0)), included, delta=1e-5)
    quiet = audit.client_audit(audit.client_scores(cfg, rounds(3.11 * c)), included, delta=1e-5)
    assert loud["guesses"] == 40 and loud["epsilon_lower_bound"] >= 1.0
    assert quiet["epsilon_lower_bound"] < 1.0


def test_a_node_hosting_only_canary_clients_adds_no_evaluation_row() -> None:
    from server.recorder import expand_hosted

    assert expand_hosted({"node": "3"}) == []
    assert expand_hosted({"node": "3", "personal_loss": 4.0}) == [
        {"node": "3", "personal_loss": 4.0}
    ]


def test_client_audit_reads_a_run_and_writes_its_bound_into_the_summary(tmp_path) -> None:
    # Prepare: a finished run's summary and two released rounds in which the canary clients
    # that took part, and only they, moved the sum along their directions.
    import json

    from server import checkpoint
    from simulations import client_audit
    from tests.conftest import tiny_run_config

    raw = tiny_run_config(
        **{
            "data.num-users": 60,
            "audit.canary-clients": 50,
            "simulation.users-per-node": 10,
            "sampling": "poisson",
            "fraction-train": 1.0,
            "dp.min-clients": 2,
        }
    )
    cfg = parse_run_config(raw)
    shapes, c = {"w": (512,)}, 0.05
    included = audit.clients_included(cfg)
    total = sum(c * audit.client_direction(cfg, j, shapes)["w"] for j in range(50) if included[j])
    m = 10 + sum(included)
    for r in (1, 2):
        checkpoint.save_released(tmp_path, r, {"w": total / m})
    summary = {
        "config": cfg.to_dict(),
        "rounds": [{"round": r, "updates": m, "released": True} for r in (1, 2)],
        "privacy": {"user_level": {"epsilon_rdp": 0.99}},
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary))

    # Execute
    result = client_audit.add_to_summary(tmp_path)

    # Assert: the five highest scores are canaries that took part; the bound and the
    # accountant's ε are kept side by side, and the console line says both.
    kept = json.loads((tmp_path / "summary.json").read_text())["client_audit"]
    assert kept == result and result["guesses"] == 5 and result["correct"] == 5
    assert result["accountant_epsilon"] == 0.99 and result["epsilon_lower_bound"] > 0
    assert "5 of 5 guesses right on 50 canary clients" in client_audit.describe(result)


def test_the_summary_labels_only_the_users_with_data() -> None:
    # 600 partitions, 400 of them canary clients: 200 Shakespeare roles, though only 302
    # roles have the preset's 100 lines.
    from server.outputs import user_labels
    from simulations.presets import get_preset

    cfg = parse_run_config({**get_preset("audit").run_config, "data.num-users": 600})
    labels = user_labels(cfg, [0, 5, 199])
    assert len(labels) == 200 and len(set(labels)) == 200
