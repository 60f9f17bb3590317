"""The presets parse, and the ones that claim ε ≤ 1 on every device get it from the
accountant with their own σ, sampling rate and rounds."""

from __future__ import annotations

import pytest

from common.config import parse_run_config
from common.dp.accounting import epsilon
from simulations.presets import PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_parses_with_its_users(name: str) -> None:
    preset = PRESETS[name]
    cfg = parse_run_config({**preset.run_config, "data.num-users": preset.num_supernodes})
    assert cfg.data.num_users == preset.num_supernodes >= 2


@pytest.mark.parametrize("name", ["quick", "population", "small", "full"])
def test_a_device_that_joins_every_round_it_is_sampled_for_stays_within_epsilon_one(
    name: str,
) -> None:
    preset = PRESETS[name]
    cfg = parse_run_config({**preset.run_config, "data.num-users": preset.num_supernodes})
    # The sampling credit only where the device can verify the draw; else q = 1.
    q = cfg.fraction_train if cfg.privacy.verifiable_sampling else 1.0
    eps = epsilon([(cfg.dp.noise_multiplier, q, cfg.num_server_rounds)], delta=cfg.privacy.delta)
    assert eps <= cfg.privacy.epsilon_cap == 1.0
    assert eps > 0.9  # σ is sized for the cap, not far above it


def test_quick_is_a_federation_of_many_users_with_newcomers_apart() -> None:
    quick = PRESETS["quick"]
    assert quick.num_supernodes >= 64 and quick.cold_start_users >= 10
    assert quick.run_config["personalization.strategy"] == "blend"
    assert quick.run_config["eval.local-only"] is True
