"""A device's rounds: only shared tensors leave, personal state persists across restarts."""

from __future__ import annotations

import json
import zlib

import pytest
import torch
from peft import PeftModel

from client.assistant.assistant import Assistant
from client.client_app import DeviceError
from client.client_app import evaluate as client_evaluate
from client.client_app import train as client_train
from client.federation.device import Device
from client.federation.runtime import get_runtime, shared_shapes
from client.store.examples import device_examples
from client.store.state import init_device
from common.config import parse_run_config
from common.lora import get_lora_tensors, load_lora_tensors
from common.model import load_base_model
from common.personalization.blend import MIX_WEIGHTS
from common.serialization import ALLOWED_EVAL_METRICS, ALLOWED_TRAIN_METRICS, to_arrayrecord
from tests.conftest import (
    device_key,
    device_node_config,
    fill_store_with_role,
    make_context,
    make_message,
    open_test_store,
    permissive_policy,
    tiny_run_config,
)


def _global_init(cfg):
    rt = get_runtime(cfg)
    return {n: rt.init[n] for n in rt.shared_names}


@pytest.mark.parametrize("strategy", ["fedavg-ft", "ffa", "fedsa", "dual"])
def test_train_reply_holds_only_shared_tensors(tmp_path, strategy) -> None:
    # Prepare
    raw = tiny_run_config(**{"personalization.strategy": strategy})
    cfg = parse_run_config(raw)
    shapes = shared_shapes(cfg)
    ctx = make_context(raw, device_node_config(tmp_path / "dev", 1, 4))
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
    with open_test_store(tmp_path / "dev") as store:
        device = Device.simulated(cfg, store=store, partition_id=0, num_partitions=4)
        result = device.train(g, server_round=1)
        shared = {n: g[n] + result.update[n] for n in g}
        before = device.state.load_personal()
        first = device.evaluate(shared, server_round=1)

    # Execute: a new process would open the same store and build a new Device.
    store = open_test_store(tmp_path / "dev")
    restarted = Device.simulated(cfg, store=store, partition_id=0, num_partitions=4)
    again = restarted.evaluate(shared, server_round=1)

    # Assert
    after = restarted.state.load_personal()
    assert before is not None and set(before) == set(after)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert any(torch.count_nonzero(t) for t in after.values())  # B trained away from 0
    assert again["personal_loss"] == pytest.approx(first["personal_loss"], abs=1e-6)
    assert first["global_loss"] == pytest.approx(first["base_loss"], abs=1e-6)  # fedsa cold start
    assert restarted.state.meta.rounds_trained == 1
    meta = store.get_json("device")
    assert meta["user"] == device.user and meta["strategy"] == "fedsa"
    assert meta["global_loss"] == pytest.approx(again["global_loss"])
    kept = restarted.state.load_global()  # stored in fp16: 11 significant bits
    assert all(torch.allclose(kept[n], shared[n], rtol=1e-3, atol=1e-6) for n in shared)
    store.close()


def test_the_losses_evaluated_are_those_of_the_global_tensors_the_store_keeps(tmp_path) -> None:
    # Prepare: a global adapter whose values fp16 cannot hold exactly.
    cfg = parse_run_config(tiny_run_config(**{"personalization.strategy": "blend"}))
    gen = torch.Generator().manual_seed(0)
    shared = {
        n: t + 0.05 * torch.randn(t.shape, generator=gen) for n, t in _global_init(cfg).items()
    }

    # Execute
    with open_test_store(tmp_path / "dev") as store:
        device = Device.simulated(cfg, store=store, partition_id=0, num_partitions=4)
        reported = device.evaluate(shared, server_round=1)
        kept = device.state.load_global()
        replayed = device.held_out_report(kept)

    # Assert: the store rounded the tensors, and the reported losses are the kept tensors',
    # to the bit (what the device serves and what a replay of the run measures).
    assert kept is not None and any(not torch.equal(kept[n], shared[n]) for n in shared)
    assert replayed["global_loss"] == reported["global_loss"]
    assert replayed["personal_loss"] == reported["personal_loss"]


def test_evaluate_then_export_a_loadable_personal_adapter(tmp_path) -> None:
    # Prepare
    raw = tiny_run_config(**{"personalization.strategy": "dual"})
    cfg = parse_run_config(raw)
    ctx = make_context(raw, device_node_config(tmp_path / "dev", 2, 4))
    client_train(make_message(to_arrayrecord(_global_init(cfg)), "train"), ctx)

    # Execute
    reply = client_evaluate(make_message(to_arrayrecord(_global_init(cfg)), "evaluate"), ctx)
    with open_test_store(tmp_path / "dev") as store:  # the device's assistant exports it
        adapter = Assistant(store).export_adapter(tmp_path / "adapter")

    # Assert
    metrics = dict(reply.content["metrics"])
    assert "arrays" not in reply.content
    # Everything allowed but the baseline (not asked for) and blend's mixing weight.
    assert set(metrics) == ALLOWED_EVAL_METRICS - {
        "local_only_loss",
        "mix_weight",
        "losses_withheld",
    }
    assert metrics["win"] == int(metrics["personal_loss"] < metrics["global_loss"])
    model = PeftModel.from_pretrained(load_base_model("tiny"), str(adapter))
    assert model.peft_config["default"].r == 2 * cfg.model.lora_r
    note = json.loads((adapter / "fedpersona.json").read_text())
    assert note["strategy"] == "dual" and "rank-2r" in note["combination"]


def test_state_from_another_strategy_is_refused(tmp_path) -> None:
    cfg = parse_run_config(tiny_run_config(**{"personalization.strategy": "fedsa"}))
    with open_test_store(tmp_path / "dev") as store:
        device = Device.simulated(cfg, store=store, partition_id=0, num_partitions=4)
        device.state.save_meta()
        other = parse_run_config(tiny_run_config(**{"personalization.strategy": "dual"}))
        with pytest.raises(ValueError, match="strategy='fedsa'"):
            Device.simulated(other, store=store, partition_id=0, num_partitions=4)


def test_corrupted_state_is_reported_not_overwritten(tmp_path) -> None:
    cfg = parse_run_config(tiny_run_config())
    with open_test_store(tmp_path / "dev") as store:
        device = Device.simulated(cfg, store=store, partition_id=0, num_partitions=4)
        device.train(_global_init(cfg), server_round=1)
        corrupted = b"\x00garbage" + store.get_blob("personal")[9:]
        store.put_blob("personal", corrupted)
        ledger = store.get_json("ledger")
        with pytest.raises(ValueError, match="corrupted personal tensors"):
            device.train(_global_init(cfg), server_round=2)
        assert store.get_blob("personal") == corrupted
        assert store.get_json("ledger") == ledger  # nothing charged for the failed round


def test_a_real_device_needs_no_partition_id_and_an_empty_store_declines(tmp_path) -> None:
    # Prepare: a device as a user runs one: its store and key, nothing else.
    raw = tiny_run_config()
    cfg = parse_run_config(raw)
    node = device_node_config(tmp_path / "dev", 0, 4, fill=False)
    node = {k: node[k] for k in ("data-dir", "key-file")}
    with open_test_store(tmp_path / "dev") as store:
        permissive_policy().save(store)  # its owner accepts the tests' small federation
    msg = make_message(to_arrayrecord(_global_init(cfg)), "train")

    # Execute: an empty store, then the same store after the user imported their writing.
    empty = client_train(msg, make_context(raw, node)).content["metrics"]
    fill_store_with_role(tmp_path / "dev", 0, 4)
    filled = client_train(msg, make_context(raw, node)).content["metrics"]

    # Assert: declined with nothing charged, then trained; no partition id either way.
    assert empty["declined"] == 1 and empty["weight"] == 0 and empty["user_epsilon"] == 0
    assert filled["declined"] == 0 and filled["user_epsilon"] > 0
    assert "partition_id" not in empty and "partition_id" not in filled
    with open_test_store(tmp_path / "dev") as store:
        ledger = store.get_json("ledger")
    assert "data.min-examples" in ledger["declined"][0]["reason"]
    assert {e["round"] for e in ledger["events"]} == {1}


def test_a_node_without_a_store_or_a_partition_is_a_clear_error(tmp_path, caplog) -> None:
    raw = tiny_run_config()
    cfg = parse_run_config(raw)
    ctx = make_context(raw, {"key-file": str(tmp_path / "k")})
    with pytest.raises(DeviceError) as err:
        client_train(make_message(to_arrayrecord(_global_init(cfg)), "train"), ctx)
    assert "data-dir" in caplog.text and str(tmp_path) not in str(err.value)


def _update_with(tmp_path, name: str, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """The shared update of one noiseless round on a store holding exactly ``pairs``."""
    cfg = parse_run_config(tiny_run_config(**{"dp.noise-mode": "none", "data.min-examples": 1}))
    with open_test_store(tmp_path / name) as store:
        store.add_examples(pairs, source="import:text", ts=1_000.0)
        device = Device(cfg, store=store, num_partitions=4, policy=permissive_policy())
        return device.train(_global_init(cfg), server_round=1).update


def test_a_device_trains_on_its_stores_examples_and_never_on_its_held_out_slice(tmp_path) -> None:
    # Prepare: 20 examples (the newest 4 are held out), and variations of them.
    pairs = [
        (f"What of day {i}?", f"On day {i} the tide ran {'high' if i % 2 else 'low'}.")
        for i in range(20)
    ]
    more = [(f"And night {i}?", f"At night {i} the stars were out.") for i in range(4)]
    other_held_out = pairs[:16] + [(p, r.upper()) for p, r in pairs[16:]]

    # Execute
    base = _update_with(tmp_path, "a", pairs)
    again = _update_with(tmp_path, "b", pairs)
    plus_four = _update_with(tmp_path, "c", pairs[:16] + more + pairs[16:])
    held_out_changed = _update_with(tmp_path, "d", other_held_out)

    # Assert: the same examples give the same update; four more training examples change it;
    # what is held out (the newest) does not touch training.
    same = lambda a, b: all(torch.equal(a[n], b[n]) for n in a)  # noqa: E731
    assert same(base, again)
    assert not same(base, plus_four)
    assert same(base, held_out_changed)


def test_the_held_out_slice_reports_on_one_part_and_decides_on_the_rest(tmp_path) -> None:
    # Prepare: 40 examples (the newest 8 held out at test-fraction 0.2), 2 reported, up to 5
    # for the device's own decisions.
    pairs = [(f"What of day {i}?", f"On day {i} it rained.") for i in range(40)]
    raw = tiny_run_config(
        **{"data.min-examples": 1, "data.max-test-samples": 2, "data.max-select-samples": 5}
    )
    cfg = parse_run_config(raw)

    # Execute
    with open_test_store(tmp_path / "d") as store:
        store.add_examples(pairs, source="import:text", ts=1_000.0)
        device = Device(cfg, store=store, num_partitions=4, policy=permissive_policy())
        held_out = [e.prompt for e in device.held_out]
        test = [e.prompt for e in device.held_out[0::2][:2]]
        n_train, n_select, n_test = map(len, (device.train_set, device.select_set, device.test_set))

    # Assert: every other held-out example is reported (2 of them); the decisions use 5 of the
    # other 6, none of them reported or trained on.
    assert len(held_out) == 8 and n_train == 32
    assert (n_test, n_select) == (2, 5)
    assert len(set(test)) == 2 and set(test) <= set(held_out)


def test_wrong_shapes_from_the_server_are_rejected(tmp_path, caplog) -> None:
    raw = tiny_run_config()
    cfg = parse_run_config(raw)
    bad = {n: torch.zeros(t.shape[0] + 1, t.shape[1]) for n, t in _global_init(cfg).items()}
    ctx = make_context(raw, device_node_config(tmp_path / "dev", 0, 4))
    with pytest.raises(DeviceError, match="rejected-message"):
        client_train(make_message(to_arrayrecord(bad), "train"), ctx)
    assert "shape mismatch" in caplog.text
    with open_test_store(tmp_path / "dev") as store:
        assert store.get_blob("personal") is None and store.get_json("ledger") is None


def _noiseless(**extra: object) -> dict:
    return tiny_run_config(
        **{"dp.noise-mode": "none", "dp.clip-norm": 0.0, "eval.local-only": True, **extra}
    )


def test_blend_trains_its_personal_adapter_alone_and_sends_that_change(tmp_path) -> None:
    # Prepare: a blend device, and two different global adapters the server might send.
    cfg = parse_run_config(_noiseless(**{"personalization.strategy": "blend"}))
    rt = get_runtime(cfg)
    g0 = _global_init(cfg)
    gen = torch.Generator().manual_seed(7)  # not the global RNG: earlier tests move it
    g1 = {n: t + 0.01 * torch.randn(t.shape, generator=gen) for n, t in g0.items()}
    personal = [n for n in rt.personal_names]

    # Execute: one round from each global adapter on copies of the same store.
    results, after = [], []
    for i, g in enumerate((g0, g1)):
        with open_test_store(tmp_path / f"dev{i}") as store:
            device = Device.simulated(cfg, store=store, partition_id=0, num_partitions=4)
            results.append(device.train(g, server_round=1))
            after.append(device.state.load_personal())
            metrics = device.evaluate(g, server_round=1)

    # Assert: both adapters start alike; the personal adapter never saw the global one; the
    # update is the personal adapter's change under the global names.
    for name in personal:
        twin = name.replace(".personal.", ".default.")
        assert torch.equal(rt.init[name], rt.init[twin])
    assert all(torch.equal(after[0][n], after[1][n]) for n in personal)
    for name, delta in results[0].update.items():
        source = name.replace(".default.", ".personal.")
        # (the stored personal adapter is fp16: LoRA tensors are kept compact on the device)
        torch.testing.assert_close(delta, after[0][source] - rt.init[source], atol=2e-4, rtol=0)
    assert set(results[0].update) == set(rt.shared_names)
    # Evaluation: a weight from the grid, and at weight 0 the served model is the local-only.
    assert metrics["mix_weight"] in MIX_WEIGHTS
    if metrics["mix_weight"] == 0.0:
        assert metrics["personal_loss"] == pytest.approx(metrics["local_only_loss"])
    assert metrics["local_only_loss"] < metrics["base_loss"]


def test_the_local_only_baseline_trains_with_the_devices_compute(tmp_path) -> None:
    # Prepare
    from client.federation import baseline
    from common.train import train_steps

    # fp32: the check is of steps and batches; under bf16, Adam's ±lr steps magnify rounding
    # on the elements whose gradient is near 0.
    cfg = parse_run_config(
        _noiseless(**{"personalization.strategy": "fedsa", "train.precision": "float32"})
    )
    rt = get_runtime(cfg)

    # Execute: two rounds, then the same steps on a fresh LoRA by hand.
    with open_test_store(tmp_path / "dev") as store:
        device = Device.simulated(cfg, store=store, partition_id=0, num_partitions=4)
        for r in (1, 2):
            device.train(_global_init(cfg), server_round=r)
        kept = baseline.load(store)
        metrics = device.evaluate(_global_init(cfg), server_round=2)
        names = baseline.baseline_names(rt.strategy, rt.shapes)
        tensors = dict(rt.init)
        for r in (1, 2):
            load_lora_tensors(rt.model, tensors)
            seed = zlib.crc32(f"{cfg.seed}:{r}:{device.user}".encode())
            train_steps(
                rt.model,
                names,
                list(device.train_set),
                steps=cfg.train.local_steps,
                batch_size=cfg.train.batch_size,
                learning_rate=cfg.train.learning_rate,
                seed=seed,
                pad_id=device.pad_id,
                precision="float32",
            )
            tensors.update(get_lora_tensors(rt.model, names))

    # Assert: A and B of the whole adapter, the device's steps and batches, nothing more.
    assert set(kept) == set(names) and any(".lora_A." in n for n in names)
    # (Adam steps each element by about ±lr: compare each tensor's change, not elements.)
    for name in names:
        moved = float((tensors[name] - rt.init[name]).norm())
        assert float((kept[name] - tensors[name]).norm()) <= 0.02 * moved, name
    assert metrics["local_only_loss"] < metrics["base_loss"]


def test_blend_federates_only_the_chosen_part_of_its_global_adapter(tmp_path) -> None:
    # Prepare: the tiny model's layer 1, B only.
    cfg = parse_run_config(
        _noiseless(
            **{
                "personalization.strategy": "blend",
                "personalization.global-layers": "1-1",
                "personalization.global-part": "B",
            }
        )
    )
    rt = get_runtime(cfg)

    # Execute
    with open_test_store(tmp_path / "dev") as store:
        device = Device.simulated(cfg, store=store, partition_id=0, num_partitions=4)
        result = device.train(_global_init(cfg), server_round=1)
        personal = device.state.load_personal()

    # Assert: the shared tensors are the global B of layer 1, and their update is the
    # personal adapter's change there; the personal adapter itself trained everywhere.
    assert rt.shared_names and all(
        ".layers.1." in n and ".lora_B.default." in n for n in rt.shared_names
    )
    for name, delta in result.update.items():
        source = name.replace(".default.", ".personal.")
        torch.testing.assert_close(delta, personal[source] - rt.init[source], atol=2e-4, rtol=0)
    moved = {n for n in rt.personal_names if not torch.equal(personal[n].float(), rt.init[n])}
    assert any(".layers.0." in n for n in moved) and any(".lora_A." in n for n in moved)


def _chat_then_round(data_dir, endorsed: list[tuple[str, str]], **run: object):
    """A user asks, endorses each answer (rating, preferred answer or edit), then the device
    takes part in one federated round; return (served tensors before, after, round metrics,
    round update)."""
    raw = tiny_run_config(**{"data.min-examples": 2, "dp.noise-mode": "none", **run})
    cfg = parse_run_config(raw)
    with open_test_store(data_dir) as store:
        init_device(store, model="tiny", strategy=str(run.get("personalization.strategy", "fedsa")))
        permissive_policy().save(store)  # its owner accepts the tests' small federation
        assistant = Assistant(store, feedback_lr=0.2)
        for i, (request, reply) in enumerate(endorsed):
            answer = assistant.ask(request, n=1, max_new_tokens=4, seed=i)
            signal = [{"rating": 5}, {"preferred": reply}, {"edit": reply}][i % 3]
            assistant.feedback(answer.interaction_id, **signal)
        before = assistant.personal_tensors()
    node = {"data-dir": str(data_dir), "key-file": str(device_key(data_dir))}
    msg = make_message(to_arrayrecord(_global_init(cfg)), "train")
    reply = client_train(msg, make_context(raw, node))
    update = {n: torch.from_numpy(a.numpy()) for n, a in reply.content["arrays"].items()}
    with open_test_store(data_dir) as store:
        after = Assistant(store).personal_tensors()
    return before, after, reply.content["metrics"], update


@pytest.mark.parametrize("strategy", ["fedsa", "blend"])
def test_chat_feedback_then_a_round_trains_on_it_and_changes_what_is_served(
    tmp_path, strategy
) -> None:
    # Prepare: six exchanges the user endorses, and the same with one endorsed text changed
    # (one of the older ones, which train; the newest is the device's held-out slice).
    endorsed = [(f"What should I cook on day {i}?", f"Soup with leeks, day {i}.") for i in range(6)]
    changed = [endorsed[0], (endorsed[1][0], "Bread and cheese, nothing else."), *endorsed[2:]]

    # Execute
    before, after, metrics, update = _chat_then_round(
        tmp_path / "a", endorsed, **{"personalization.strategy": strategy}
    )
    *_, other_metrics, other_update = _chat_then_round(
        tmp_path / "b", changed, **{"personalization.strategy": strategy}
    )

    # Assert: the round trained (on the endorsed exchanges: one changed text changes the
    # update), and the adapter the assistant serves is not what it was.
    assert metrics["declined"] == 0 and other_metrics["declined"] == 0
    assert any(not torch.equal(update[n], other_update[n]) for n in update)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    with open_test_store(tmp_path / "a") as store:
        examples = device_examples(store)
    assert [e.source for e in examples] == ["endorsed"] * 6
    assert examples[1].reply == "Soup with leeks, day 1."


def _losses_by_weight(table: dict[float, list[float]]):
    return lambda w: table[w]


def test_the_mix_weight_keeps_the_prior_unless_the_evidence_says_otherwise() -> None:
    from common.personalization.blend import MIX_WEIGHTS, pick_mix_weight

    alone = [3.0, 3.2, 2.9, 3.1, 3.3, 3.0]

    def shifted(by: dict[float, float], jitter: float = 0.0):
        return {
            w: [
                x + by.get(w, 0.0) + (jitter if i % 2 else -jitter) * w for i, x in enumerate(alone)
            ]
            for w in MIX_WEIGHTS
        }

    # No evidence either way (the global adapter changes nothing): the prior stands.
    assert pick_mix_weight(_losses_by_weight(shifted({})), prior=0.5) == 0.5
    assert pick_mix_weight(_losses_by_weight(shifted({})), prior=0.0) == 0.0
    # The prior raises every example's loss: the local-only model is served.
    hurts = shifted({0.5: 0.05, 1.0: 0.1, 2.0: 0.2})
    assert pick_mix_weight(_losses_by_weight(hurts), prior=0.5) == 0.0
    # A prior taken too far for this user steps down to the largest weight that still helps.
    too_far = shifted({0.5: -0.03, 1.0: -0.04, 2.0: 0.3})
    assert pick_mix_weight(_losses_by_weight(too_far), prior=2.0) == 1.0
    assert pick_mix_weight(_losses_by_weight(hurts), prior=2.0) == 0.0
    # A small, noisy gain keeps the prior; a consistent larger gain takes the larger weight.
    noisy = shifted({1.0: -0.01}, jitter=0.05)
    assert pick_mix_weight(_losses_by_weight(noisy), prior=0.5) == 0.5
    helps = shifted({0.5: -0.01, 1.0: -0.04, 2.0: -0.03})
    assert pick_mix_weight(_losses_by_weight(helps), prior=0.5) == 1.0
    assert max(MIX_WEIGHTS) == 2.0  # weight 4 left users worse off (blend.MIX_WEIGHTS)
    # One example is no evidence: the local-only model. Two that agree on a gain of 5 standard
    # errors are not evidence either (a t of 5 at one degree of freedom is p ~ 0.06); six that
    # agree as well are.
    assert pick_mix_weight(lambda w: [3.0 - w], prior=0.5) == 0.0
    two = {w: [3.0, 3.2] for w in MIX_WEIGHTS} | {2.0: [2.9, 3.05]}
    assert pick_mix_weight(_losses_by_weight(two), prior=0.5) == 0.5
    six = {w: [3.0, 3.2] * 3 for w in MIX_WEIGHTS} | {2.0: [2.9, 3.05] * 3}
    assert pick_mix_weight(_losses_by_weight(six), prior=0.5) == 2.0
    # The prior is earned: a global adapter no better than the base model on these examples
    # (a small federation's noise) gets weight 0 unless a weight shows a gain with evidence.
    base = [4.0] * len(alone)
    assert (
        pick_mix_weight(
            _losses_by_weight(shifted({})), prior=0.5, base=base, global_alone=[3.9] * len(alone)
        )
        == 0.5
    )
    assert (
        pick_mix_weight(
            _losses_by_weight(shifted({})), prior=0.5, base=base, global_alone=[4.1] * len(alone)
        )
        == 0.0
    )
    assert (
        pick_mix_weight(
            _losses_by_weight(helps), prior=0.5, base=base, global_alone=[4.1] * len(alone)
        )
        == 1.0
    )


def test_a_blend_device_serves_no_global_adapter_that_does_not_help(tmp_path) -> None:
    # Prepare: a blend device after one round; a global adapter equal to the initialisation
    # (B = 0: the base model, no better than it) and one with large random B (harmful).
    cfg = parse_run_config(_noiseless(**{"personalization.strategy": "blend"}))
    init = _global_init(cfg)
    gen = torch.Generator().manual_seed(0)
    harmful = {
        n: (torch.randn(t.shape, generator=gen) * 2.0 if ".lora_B." in n else t)
        for n, t in init.items()
    }

    # Execute
    with open_test_store(tmp_path / "dev") as store:
        device = Device.simulated(cfg, store=store, partition_id=0, num_partitions=4)
        device.train(init, server_round=1)
        neutral = device.evaluate(init, server_round=1)
        bad = device.evaluate(harmful, server_round=1)
        served = device.state.meta.mix_weight

    # Assert: the local-only model is served both times; the prior (0.5) is not earned.
    assert cfg.personalization.mix_prior == 0.5
    assert neutral["mix_weight"] == 0.0
    assert neutral["personal_loss"] == pytest.approx(neutral["local_only_loss"])
    assert bad["mix_weight"] == 0.0 and served == 0.0
    assert bad["personal_loss"] == pytest.approx(bad["local_only_loss"])
    assert bad["global_loss"] > bad["base_loss"]


def test_a_blend_device_sending_gradients_trains_the_same_personal_adapter(tmp_path) -> None:
    # Prepare: the same device and round with each personalization.update.
    results, after = {}, {}
    for kind in ("change", "gradient"):
        cfg = parse_run_config(
            _noiseless(**{"personalization.strategy": "blend", "personalization.update": kind})
        )
        with open_test_store(tmp_path / kind) as store:
            device = Device.simulated(cfg, store=store, partition_id=0, num_partitions=4)
            # Execute
            results[kind] = device.train(_global_init(cfg), server_round=1).update
            after[kind] = device.state.load_personal()

    # Assert: training is unchanged; the update is a descent direction, not the change itself.
    assert all(torch.equal(after["change"][n], after["gradient"][n]) for n in after["change"])
    change = torch.cat([t.flatten() for t in results["change"].values()])
    gradient = torch.cat([results["gradient"][n].flatten() for n in results["change"]])
    assert not torch.allclose(change, gradient)
    assert torch.nn.functional.cosine_similarity(change, gradient, dim=0) > 0.2


def test_gradient_updates_are_refused_with_local_dp_sgd() -> None:
    with pytest.raises(ValueError, match="personalization.update"):
        parse_run_config(
            tiny_run_config(**{"personalization.update": "gradient", "dp.local.enabled": True})
        )


def test_a_paused_device_declines_charging_nothing_until_resumed(tmp_path) -> None:
    from client.store.state import set_paused

    # Prepare
    cfg = parse_run_config(tiny_run_config(**{"personalization.strategy": "fedsa"}))
    g = _global_init(cfg)
    with open_test_store(tmp_path / "dev") as store:
        device = Device.simulated(cfg, store=store, partition_id=0, num_partitions=4)
        set_paused(store, True)

        # Execute
        paused = device.train(g, server_round=1)
        set_paused(store, False)
        resumed = device.train(g, server_round=2)

        # Assert: the paused round is a decline with its reason, nothing charged; inside a
        # masked SecAgg+ round (this simulation's) what leaves is its noise share alone.
        assert paused.declined and paused.metrics["declined"] == 1
        assert paused.noise_share and paused.metrics["noise_shares"] == 1
        flat = torch.cat([t.reshape(-1) for t in paused.update.values()])
        assert flat.std().item() == pytest.approx(device.privatize.noise_std, rel=0.1)
        (declined,) = device.ledger.declined
        assert declined["round"] == 1 and "paused by the device's owner" in declined["reason"]
        assert not resumed.declined
        assert [e["round"] for e in device.ledger.events if e["kind"] == "user"] == [2]
        # What left in round 2 is on record: names, shapes, bytes; never values.
        sent = device.state.meta.history[-1]["sent"]
        assert {t["name"] for t in sent["tensors"]} == set(g)
        assert sent["bytes"] == sum(4 * t.numel() for t in g.values())


def test_the_mix_weight_replay_weights_losses_by_reply_tokens_as_the_summary_does() -> None:
    from simulations.mix_weights import mean_loss, shares

    # Per example the two weights tie (2.0 each); per reply token the local-only model wins.
    half = {"0.0": [1.0, 3.0], "1.0": [2.0, 2.0], "tokens": [3, 1]}
    assert mean_loss(half, 0.0) == 1.5 and mean_loss(half, "1.0") == 2.0
    assert shares([{"test": half}], [1.0]) == (0.0, 0.0)
    older = {k: v for k, v in half.items() if k != "tokens"}  # files kept before the tokens
    assert mean_loss(older, 0.0) == mean_loss(older, 1.0) == 2.0
