"""Run-config parsing: defaults, overrides and errors that name the key."""

from __future__ import annotations

import pytest

from common.config import STRATEGIES, RunConfig, parse_run_config
from tests.conftest import default_run_config


def test_pyproject_defaults_parse() -> None:
    # Execute
    cfg = parse_run_config(default_run_config())

    # Assert
    assert cfg.model.name == "smollm2"
    assert cfg.strategy in STRATEGIES
    assert cfg.model.lora_targets == ("q_proj", "v_proj")
    assert cfg.data.test_fraction == pytest.approx(0.2)
    # One truth: pyproject.toml's defaults are the dataclasses' own, and every key the
    # dataclasses define is there (a key is read off its field: common/config.py).
    assert cfg == RunConfig()
    assert set(default_run_config()) == set(RunConfig().to_flat())


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("model.lora-r", 0),
        ("personalization.strategy", "fedprox"),
        ("data.test-fraction", 1.5),
        ("personalization.mix-prior", 0.3),
        ("personalization.global-part", "A"),
        ("personalization.global-targets", "k_proj"),
        ("train.learning-rate", -1.0),
        ("num-server-rounds", 0),
        ("model.lora-targets", ""),
        ("train.local-steps", "many"),
        ("model.quantization", "8bit"),
        ("model.dtype", "float16"),
        ("resume", "maybe"),
        ("round-timeout", 0),
        ("secagg.timeout", -1),
    ],
)
def test_invalid_values_name_the_key(key: str, value: object) -> None:
    # Prepare
    raw = default_run_config() | {key: value}

    # Execute / Assert
    with pytest.raises(ValueError, match=key):
        parse_run_config(raw)


def test_distributed_noise_without_secagg_is_refused() -> None:
    raw = default_run_config() | {"secagg.enabled": False}
    with pytest.raises(ValueError, match="dp.noise-mode.*secagg.enabled"):
        parse_run_config(raw)
    parse_run_config(raw | {"dp.noise-mode": "central"})


def test_unknown_key_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown run config key `model.lora-rank`"):
        parse_run_config({"model.lora-rank": 8})


def test_run_dir_defaults_use_run_id(tmp_path) -> None:
    cfg = parse_run_config({"output.dir": str(tmp_path)})
    assert cfg.run_dir(12) == tmp_path / "run-12"
    assert cfg.simulated_device_dir(12, "u@p") == tmp_path / "run-12" / "devices" / "u@p"


def test_privacy_noise_helper_prints_the_needed_sigma() -> None:
    from typer.testing import CliRunner

    from simulations.cli import app

    result = CliRunner().invoke(
        app,
        [
            "privacy",
            "noise",
            "--population",
            "1000",
            "--per-round",
            "100",
            "--rounds",
            "50",
            "--target-epsilon",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "3.203" in result.output  # σ for N=1000, 100/round, 50 rounds, ε=1 (RDP)


def test_dp_and_secagg_keys_are_validated() -> None:
    with pytest.raises(ValueError, match="dp.noise-mode"):
        parse_run_config({"dp.noise-mode": "local"})
    with pytest.raises(ValueError, match="dp.clip-norm"):
        parse_run_config({"dp.clip-norm": 0.0, "dp.noise-mode": "central"})
    with pytest.raises(ValueError, match="secagg.enabled"):
        parse_run_config({"secagg.enabled": "yes"})
    with pytest.raises(ValueError, match="privacy.delta"):
        parse_run_config({"privacy.delta": 0.5 * 3})
    cfg = parse_run_config({"dp.noise-mode": "none", "dp.clip-norm": 0.0})
    assert not cfg.dp.adds_noise


def test_set_overrides_parse_toml_literals_else_strings() -> None:
    from common.config import parse_set

    assert parse_set(["num-server-rounds=5", "dp.clip-norm=0.5", "secagg.enabled=false"]) == {
        "num-server-rounds": 5,
        "dp.clip-norm": 0.5,
        "secagg.enabled": False,
    }
    assert parse_set(["tone=poetic", "domains=baking, chess", 'name="a b"']) == {
        "tone": "poetic",
        "domains": "baking, chess",
        "name": "a b",
    }
    for bad in ("no-equals", "=5"):
        with pytest.raises(ValueError, match="key=value"):
            parse_set([bad])


def test_blend_federates_only_the_part_of_the_global_adapter_it_is_told() -> None:
    # Prepare: every LoRA tensor name of two layers, both targets, both adapters.
    from common.personalization import strategy_for

    names = [
        f"base_model.model.model.layers.{layer}.self_attn.{target}.lora_{ab}.{adapter}.weight"
        for layer in (0, 1)
        for target in ("q_proj", "v_proj")
        for ab in ("A", "B")
        for adapter in ("default", "personal")
    ]

    def shared(**settings: str) -> list[str]:
        raw = default_run_config() | {f"personalization.{k}": v for k, v in settings.items()}
        strategy = strategy_for(parse_run_config(raw))
        return [n.split("layers.")[1] for n in names if strategy.is_shared(n)]

    # Execute / Assert: the global adapter only, narrowed by targets, layers and part.
    assert len(shared()) == 8
    assert shared(**{"global-targets": "v_proj"}) == [
        "0.self_attn.v_proj.lora_A.default.weight",
        "0.self_attn.v_proj.lora_B.default.weight",
        "1.self_attn.v_proj.lora_A.default.weight",
        "1.self_attn.v_proj.lora_B.default.weight",
    ]
    assert shared(**{"global-targets": "v_proj", "global-part": "B", "global-layers": "1-1"}) == [
        "1.self_attn.v_proj.lora_B.default.weight"
    ]
