"""LoRA build, shared/personal split per strategy, deterministic init, peft export."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from common.config import ModelConfig
from common.lora import (
    build_peft_model,
    build_skeleton,
    export_adapter,
    get_lora_tensors,
    init_lora_tensors,
    load_lora_tensors,
    lora_shapes,
)
from common.model import load_base_model, load_model_config, model_dir
from common.personalization import get_strategy

CFG = ModelConfig(name="tiny", lora_r=4, lora_alpha=8)
N_MODULES = 2 * 2  # 2 layers x (q_proj, v_proj)


@pytest.mark.parametrize(
    ("strategy", "n_shared", "n_personal", "n_frozen", "shared_kind"),
    [
        ("fedavg-ft", 2 * N_MODULES, 2 * N_MODULES, 0, {"lora_A", "lora_B"}),
        ("ffa", N_MODULES, N_MODULES, N_MODULES, {"lora_B"}),
        ("fedsa", N_MODULES, N_MODULES, 0, {"lora_A"}),
        ("dual", 2 * N_MODULES, 2 * N_MODULES, 0, {"lora_A", "lora_B"}),
    ],
)
def test_split_per_strategy(strategy, n_shared, n_personal, n_frozen, shared_kind) -> None:
    # Prepare
    strat = get_strategy(strategy)
    names = list(lora_shapes(build_skeleton(load_model_config("tiny"), CFG, strat)))

    # Execute
    shared, personal, frozen = strat.split(names)

    # Assert
    assert (len(shared), len(personal), len(frozen)) == (n_shared, n_personal, n_frozen)
    assert {n.split(".")[-3] for n in shared} == shared_kind
    if strategy == "fedsa":
        assert not set(shared) & set(personal)  # B never travels
        assert all(".lora_B." in n for n in personal)
    if strategy == "dual":
        assert all(".default." in n for n in shared)
        assert all(".personal." in n for n in personal)
    if strategy == "ffa":
        assert all(".lora_A." in n for n in frozen)


def test_init_is_deterministic_and_matches_skeleton() -> None:
    strat = get_strategy("dual")
    model = build_peft_model(load_base_model("tiny"), CFG, strat)
    shapes = lora_shapes(model)
    assert shapes == lora_shapes(build_skeleton(load_model_config("tiny"), CFG, strat))
    a = init_lora_tensors(shapes, seed=1)
    b = init_lora_tensors(shapes, seed=1)
    c = init_lora_tensors(shapes, seed=2)
    for name in shapes:
        assert torch.equal(a[name], b[name])
        if ".lora_A." in name:
            assert not torch.equal(a[name], c[name])
            assert a[name].abs().max() <= 1 / shapes[name][1] ** 0.5
        else:
            assert torch.count_nonzero(a[name]) == 0
    # The two adapters of `dual` start from different A.
    g = next(n for n in shapes if ".lora_A.default." in n)
    assert not torch.equal(a[g], a[g.replace(".default.", ".personal.")])


def test_load_rejects_wrong_shape_and_nan() -> None:
    model = build_peft_model(load_base_model("tiny"), CFG, get_strategy("fedsa"))
    name, shape = next(iter(lora_shapes(model).items()))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_lora_tensors(model, {name: torch.zeros(shape[0] + 1, shape[1])})
    with pytest.raises(ValueError, match="non-finite"):
        load_lora_tensors(model, {name: torch.full(shape, float("nan"))})
    with pytest.raises(ValueError, match="unknown LoRA tensor"):
        load_lora_tensors(model, {"nope.lora_A.default.weight": torch.zeros(1)})


@pytest.mark.parametrize("strategy", ["fedsa", "dual"])
def test_exported_adapter_reproduces_the_model(tmp_path, strategy) -> None:
    # Prepare: a model with non-trivial A and B in every adapter.
    strat = get_strategy(strategy)
    model = build_peft_model(load_base_model("tiny"), CFG, strat)
    gen = torch.Generator().manual_seed(0)
    load_lora_tensors(
        model, {n: torch.randn(s, generator=gen) * 0.2 for n, s in lora_shapes(model).items()}
    )
    ids = torch.randint(0, 1000, (2, 12), generator=gen)
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    # Execute
    out = export_adapter(
        get_lora_tensors(model),
        CFG,
        tmp_path / "adapter",
        base_model=str(model_dir("tiny")),
        adapters=strat.adapters,
    )
    loaded = PeftModel.from_pretrained(load_base_model("tiny"), str(out)).eval()
    with torch.no_grad():
        actual = loaded(input_ids=ids).logits

    # Assert
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    assert loaded.peft_config["default"].r == CFG.lora_r * len(strat.adapters)
    assert torch.allclose(actual, expected, atol=1e-5)
    assert not torch.allclose(actual, load_base_model("tiny")(input_ids=ids).logits, atol=1e-3)


def test_compose_overlays_shared_then_personal_and_mixes_only_shared_b() -> None:
    from common.personalization.base import compose

    a = "m.layers.0.q_proj.lora_A.default.weight"
    b = "m.layers.0.q_proj.lora_B.default.weight"
    pb = "m.layers.0.q_proj.lora_B.personal.weight"
    init = {a: torch.zeros(2), b: torch.zeros(2), pb: torch.zeros(2)}
    shared = {a: torch.ones(2), b: torch.full((2,), 2.0)}
    personal = {pb: torch.full((2,), 3.0), b: torch.full((2,), 9.0)}

    served = compose(init, shared, personal, shared_names=[a, b], mix=0.5)
    assert served[a].tolist() == [1.0, 1.0]  # A is never scaled
    assert served[b].tolist() == [4.5, 4.5]  # personal overrides shared, then w·B
    assert served[pb].tolist() == [3.0, 3.0]
    start = compose(init, shared, personal, personal_overrides_shared=False)
    assert start[b].tolist() == [2.0, 2.0] and start[pb].tolist() == [3.0, 3.0]
    assert compose(init)[b].tolist() == [0.0, 0.0]
