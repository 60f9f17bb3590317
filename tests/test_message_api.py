"""The Message-API path (SecAgg+ off): real ClientApp, real FedAvg subclass, central DP."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord

from client.client_app import app as fedpersona_app
from client.federation.runtime import get_runtime
from common.config import parse_run_config
from common.dp.privatize import Privatize
from common.serialization import to_arrayrecord
from server.accountant import FederationAccountant
from server.recorder import RoundRecorder
from server.release import RoundOptions
from server.strategy import PersonaFedAvg
from tests.conftest import device_node_config, tiny_run_config
from tests.flower_harness import InProcessGrid


@pytest.mark.parametrize("mode", ["central", "none"])
def test_message_api_round_with_and_without_central_noise(tmp_path, mode) -> None:
    # Prepare: three tiny devices, SecAgg+ off.
    raw = tiny_run_config(
        **{
            "secagg.enabled": False,
            "dp.noise-mode": mode,
            "data.num-users": 3,
            "dp.clip-norm": 0.01,
        }
    )
    cfg = parse_run_config(raw)
    rt = get_runtime(cfg)
    nodes = {nid: device_node_config(tmp_path / f"d{nid}", nid - 1, 3) for nid in (1, 2, 3)}
    grid = InProcessGrid(fedpersona_app, nodes, run_config=raw)
    acc = (
        FederationAccountant(noise_multiplier=cfg.dp.noise_multiplier, sample_rate=1.0, delta=1e-5)
        if mode == "central"
        else None
    )
    strategy = PersonaFedAvg(
        RoundOptions(
            recorder=RoundRecorder(acc),
            min_updates=3,
            central_noise_std=Privatize.of(cfg, 3).central_std,
        ),
        min_train_nodes=3,
        min_evaluate_nodes=3,
        min_available_nodes=3,
        weighted_by_key="weight",
    )
    initial = {n: rt.init[n] for n in rt.shared_names}

    # Execute
    result = strategy.start(
        grid=grid,
        initial_arrays=to_arrayrecord(initial),
        num_rounds=2,
        timeout=60,
        train_config=ConfigRecord({}),
        evaluate_config=ConfigRecord({}),
    )

    # Assert
    rounds = strategy.recorder.rounds
    assert [r["updates"] for r in rounds] == [3, 3]
    assert all(r["released"] for r in rounds) and all(r["evaluated"] == 3 for r in rounds)
    moved = [float(np.abs(result.arrays[n].numpy() - initial[n].numpy()).max()) for n in initial]
    assert max(moved) > 0
    # A/B counts: these real devices' users rated nothing, and a real device never makes
    # ratings up (whatever `ab.simulate-ratings` asks) nor sends counts in the clear.
    assert cfg.ab.simulate_ratings
    assert [c[0] + c[3] for c in strategy.recorder.ab_rounds] in ([], [0, 0])
    if mode == "central":
        assert rounds[-1]["user_epsilon"] == pytest.approx(acc.epsilon())
        assert len(acc.history) == 2
    # Every device clipped its update: the mean moves by at most C per round (+ noise).
    if mode == "none":
        total = np.sqrt(
            sum(
                float(((result.arrays[n].numpy() - initial[n].numpy()) ** 2).sum()) for n in initial
            )
        )
        assert total <= 2 * cfg.dp.clip_norm + 1e-6
