"""A device's rounds: only shared tensors leave, personal state persists across restarts."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from client.client_app import evaluate as client_evaluate
from client.client_app import train as client_train
from client.device import Device, get_runtime, shared_shapes
from common.config import parse_run_config
from common.model import load_base_model
from common.serialization import ALLOWED_EVAL_METRICS, ALLOWED_TRAIN_METRICS, to_arrayrecord
from tests.conftest import make_context, make_message, tiny_run_config


def _global_init(cfg):
    rt = get_runtime(cfg)
    return {n: rt.init[n] for n in rt.shared_names}


@pytest.mark.parametrize("strategy", ["fedavg-ft", "ffa", "fedsa", "dual"])
def test_train_reply_holds_only_shared_tensors(tmp_path, strategy) -> None:
    # Prepare
    raw = tiny_run_config(**{"personalization.strategy": strategy})
    cfg = parse_run_config(raw)
    shapes = shared_shapes(cfg)
    ctx = make_context(raw, {"partition-id": 1, "num-partitions": 4, "data-dir": str(tmp_path)})
    msg = make_message(to_arrayrecord(_global_init(cfg)), "train")

    # Execute
    reply = client_train(msg, ctx)

    # Assert
    assert set(reply.content["arrays"].keys()) == set(shapes)
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    assert set(reply.content["metrics"].keys()) <= ALLOWED_TRAIN_METRICS
    assert reply.content["metrics"]["declined"] == 0
    rt = get_runtime(cfg)
    personal_only = set(rt.personal_names) - set(rt.shared_names)
    assert not personal_only & set(reply.content["arrays"].keys())
    # The shared tensors changed (they were trained), except ffa/fedsa's untrained parts.
    moved = [
        n
        for n, a in reply.content["arrays"].items()
        if not torch.equal(torch.from_numpy(a.numpy()), rt.init[n])
    ]
    assert moved


def test_personal_state_survives_a_device_restart(tmp_path) -> None:
    # Prepare
    cfg = parse_run_config(tiny_run_config(**{"personalization.strategy": "fedsa"}))
    g = _global_init(cfg)
    device = Device(cfg, partition_id=0, num_partitions=4, data_dir=tmp_path)
    result = device.train(g, server_round=1)
    shared = {n: g[n] + result.update[n] for n in g}
    before = device.state.load_personal()
    first = device.evaluate(shared, server_round=1)

    # Execute: a new process would build a new Device from the same dir.
    restarted = Device(cfg, partition_id=0, num_partitions=4, data_dir=tmp_path)
    again = restarted.evaluate(shared, server_round=1)

    # Assert
    after = restarted.state.load_personal()
    assert before is not None and set(before) == set(after)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert any(torch.count_nonzero(t) for t in after.values())  # B trained away from 0
    assert again["personal_loss"] == pytest.approx(first["personal_loss"], abs=1e-6)
    assert first["global_loss"] == pytest.approx(first["base_loss"], abs=1e-6)  # fedsa cold start
    assert restarted.state.meta.rounds_trained == 1
    meta = json.loads((tmp_path / "device.json").read_text())
    assert meta["user"] == device.user.user and meta["strategy"] == "fedsa"


def test_evaluate_writes_a_loadable_personal_adapter(tmp_path) -> None:
    # Prepare
    raw = tiny_run_config(**{"personalization.strategy": "dual"})
    cfg = parse_run_config(raw)
    ctx = make_context(raw, {"partition-id": 2, "num-partitions": 4, "data-dir": str(tmp_path)})
    client_train(make_message(to_arrayrecord(_global_init(cfg)), "train"), ctx)

    # Execute
    reply = client_evaluate(make_message(to_arrayrecord(_global_init(cfg)), "evaluate"), ctx)

    # Assert
    metrics = dict(reply.content["metrics"])
    assert "arrays" not in reply.content
    assert set(metrics) == ALLOWED_EVAL_METRICS
    assert metrics["win"] == int(metrics["personal_loss"] < metrics["global_loss"])
    adapter = tmp_path / "personal_adapter"
    model = PeftModel.from_pretrained(load_base_model("tiny"), str(adapter))
    assert model.peft_config["default"].r == 2 * cfg.model.lora_r
    note = json.loads((adapter / "fedpersona.json").read_text())
    assert note["strategy"] == "dual" and "rank-2r" in note["combination"]


def test_state_from_another_strategy_is_refused(tmp_path) -> None:
    cfg = parse_run_config(tiny_run_config(**{"personalization.strategy": "fedsa"}))
    device = Device(cfg, partition_id=0, num_partitions=4, data_dir=tmp_path)
    device.state.save_meta()
    other = parse_run_config(tiny_run_config(**{"personalization.strategy": "dual"}))
    with pytest.raises(ValueError, match="strategy='fedsa'"):
        Device(other, partition_id=0, num_partitions=4, data_dir=tmp_path)


def test_corrupted_state_is_reported_not_overwritten(tmp_path) -> None:
    cfg = parse_run_config(tiny_run_config())
    device = Device(cfg, partition_id=0, num_partitions=4, data_dir=tmp_path)
    device.train(_global_init(cfg), server_round=1)
    blob = tmp_path / "personal.safetensors"
    blob.write_bytes(b"\x00garbage" + blob.read_bytes()[9:])
    corrupted = blob.read_bytes()
    with pytest.raises(ValueError, match="corrupted personal tensors"):
        device.train(_global_init(cfg), server_round=2)
    assert blob.read_bytes() == corrupted


def test_missing_partition_config_is_a_clear_error(tmp_path) -> None:
    raw = tiny_run_config()
    cfg = parse_run_config(raw)
    ctx = make_context(raw, {"data-dir": str(tmp_path)})
    with pytest.raises(ValueError, match="partition-id"):
        client_train(make_message(to_arrayrecord(_global_init(cfg)), "train"), ctx)


def test_wrong_shapes_from_the_server_are_rejected(tmp_path) -> None:
    raw = tiny_run_config()
    cfg = parse_run_config(raw)
    bad = {n: torch.zeros(t.shape[0] + 1, t.shape[1]) for n, t in _global_init(cfg).items()}
    ctx = make_context(raw, {"partition-id": 0, "num-partitions": 4, "data-dir": str(tmp_path)})
    with pytest.raises(ValueError, match="shape mismatch"):
        client_train(make_message(to_arrayrecord(bad), "train"), ctx)
    assert not (tmp_path / "personal.safetensors").exists()
