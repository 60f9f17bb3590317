"""The training-speed benchmark counts what it says: real tokens, model FLOPs, every path."""

from __future__ import annotations

import pytest

from benchmarks import train as bench_train
from common.config import ModelConfig
from common.data import Encoded
from common.lora import build_peft_model
from common.model import TINY_CONFIG, load_base_for
from common.personalization import get_strategy
from tests.conftest import cpu_bf16


def test_model_flops_are_the_linear_maps_attention_and_the_head_on_replies() -> None:
    # Prepare: the tiny Llama with LoRA on layer 1 only (layer 0 is not trained through).
    cfg = ModelConfig(name="tiny", lora_layers="1-1")
    model = build_peft_model(load_base_for(cfg), cfg, get_strategy("fedsa"))
    d, i = TINY_CONFIG["hidden_size"], TINY_CONFIG["intermediate_size"]
    kv = d * TINY_CONFIG["num_key_value_heads"] // TINY_CONFIG["num_attention_heads"]
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * i  # q, o; k, v; gate, up, down
    vocab = model.get_base_model().config.vocab_size
    sample = Encoded(tuple(range(10, 20)), (-100,) * 4 + tuple(range(14, 20)))  # 6 targets

    # Execute
    flops = bench_train.model_flops(model, [[sample]], first_lora_layer=1)

    # Assert: 2 layers forward + 1 backward; attention; the head forward + backward on 6.
    n = 10
    expected = 2 * per_layer * n * 3 + 2 * n * n * d * (2 + 2) + 4 * vocab * d * 6
    assert flops == expected


@pytest.mark.parametrize("kind", ["native", "emulated"])
def test_every_training_path_is_timed_on_the_same_real_tokens(kind: str) -> None:
    # Execute: the CPU's bf16 answered both ways, whatever this machine has (a small peak
    # matmul: an emulated bf16 2048³ one takes minutes)
    with cpu_bf16(kind):
        r = bench_train.bench("tiny", steps=2, repeats=2, peak_n=128)

    # Assert
    fp32_paths = {
        "old loop (padded, fp32, full logits)",
        "padded, fp32",
        "packed, fp32",
        "device round (auto)",
    }
    bf16_paths = {"padded, bf16", "packed, bf16"}
    table = bench_train.markdown(r)
    assert r["cpu_native_bf16"] == (kind == "native")
    if kind == "native":
        assert set(r["paths"]) == fp32_paths | bf16_paths
        assert set(r["matmul_peak_tflops"]) == {"float32", "bfloat16"}
        assert r["auto_precision"] in ("float32", "bfloat16")
        assert "emulated" not in table
    else:  # bf16 neither timed nor chosen, and the table says why
        assert set(r["paths"]) == fp32_paths
        assert set(r["matmul_peak_tflops"]) == {"float32"}
        assert r["auto_precision"] == "float32"
        assert all(p["of_bf16_peak"] is None for p in r["paths"].values())
        assert "bf16: emulated on this CPU, not measured" in table
    assert 0 < r["real_tokens"] <= r["padded_tokens"]
    for p in r["paths"].values():
        assert p["seconds"] > 0
        assert p["real_tokens_per_s"] == pytest.approx(r["real_tokens"] / p["seconds"])
        assert len(p["ratio_each"]) == 2  # each repeat's ratio, paired on its own batches
        assert min(p["ratio_each"]) <= p["ratio_to_old_loop"] <= max(p["ratio_each"])
        if p["of_bf16_peak"] is not None:
            assert (p["of_bf16_peak"] < p["of_fp32_peak"]) == (
                r["matmul_peak_tflops"]["bfloat16"] > r["matmul_peak_tflops"]["float32"]
            )
    assert "device round / its bare loop" in table


def test_the_growth_plot_draws_every_model_and_population(tmp_path) -> None:
    from benchmarks.scaling import growth_plot
    from benchmarks.suite import markdown

    rows = [
        {
            "model": m,
            "population": pop,
            "clients_per_round": k,
            "seconds_per_round": s,
            "peak_rss_mib": 5000.0 + k,
        }
        for m, pop, k, s in [
            ("tiny", 1000, 10, 11.0),
            ("tiny", 1000, 100, 140.0),
            ("smollm2", 100, 10, 30.0),
        ]
    ]
    growth_plot(rows, tmp_path / "growth.png")
    assert (tmp_path / "growth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = markdown(
        {
            "privacy_round": {"secagg_dp": 1.0, "plain": 1.0, "ratio": 1.0},
            "privacy_opacus": {"opacus_step_s": 1.0, "plain_step_s": 1.0, "ratio": 1.0},
            "throughput": {
                "device_tokens_per_s": 1.0,
                "bare_tokens_per_s": 1.0,
                "ratio_device_over_bare": 1.0,
            },
            "device_bench": {
                "swap_inplace_ms": 1.0,
                "swap_reload_base_ms": 1.0,
                "ratio_reload_over_inplace": 1.0,
                "one_feedback_ms": 1.0,
            },
            "scaling": rows,
            "model": "smollm2",
            "device": "cpu",
            "threads": 2,
            "total_s": 60.0,
        }
    )
    assert "| smollm2 | 100 | 10 | 30.0 | 5010 |" in table


def test_the_engine_overhead_is_the_worker_time_outside_device_train(tmp_path) -> None:
    # Prepare: a run of 3 rounds (round 1 loads the model and is left out), 2 workers; in
    # rounds 2–3 the nodes answered 3 train messages (4 client-rounds) in 7 s, 6 s of which
    # were Device.train, and the training phases took 5 + 5 s of wall time.
    import json

    from benchmarks.scaling import engine_overhead
    from client.federation.simulated import ENGINE_TIMINGS

    rounds = [{"round": r, "train_seconds": s} for r, s in [(1, 30.0), (2, 5.0), (3, 5.0)]]
    (tmp_path / "summary.json").write_text(json.dumps({"rounds": rounds}))
    lines = [
        {"round": 1, "users": 2, "node_s": 20.0, "device_s": 2.0},
        {"round": 2, "users": 1, "node_s": 3.0, "device_s": 2.5},
        {"round": 2, "users": 2, "node_s": 2.0, "device_s": 1.5},
        {"round": 3, "users": 1, "node_s": 2.0, "device_s": 2.0},
    ]
    (tmp_path / ENGINE_TIMINGS).write_text("".join(json.dumps(x) + "\n" for x in lines))

    # Execute
    e = engine_overhead(tmp_path, actors=2)

    # Assert: 20 worker-seconds, 6 of them in Device.train; 1 of the nodes' 7 s around it.
    assert e["client_rounds"] == 4
    assert e["device_s_per_client"] == pytest.approx(1.5)
    assert e["engine_overhead"] == pytest.approx(1 - 6 / 20)
    assert e["node_overhead"] == pytest.approx(1 - 6 / 7)


def test_a_node_times_only_into_its_servers_run_folder_and_never_fails_the_round(
    tmp_path, caplog
) -> None:
    # Prepare: a simulated node whose run has no folder yet, then one whose folder is a file's
    # child (unwritable), then the server's real folder.
    import json

    from client.federation.simulated import ENGINE_TIMINGS, engine_time
    from common.config import parse_run_config
    from tests.conftest import make_context, tiny_run_config

    def node(run_dir) -> tuple:
        raw = tiny_run_config(
            **{"output.dir": str(run_dir.parent), "output.run-name": run_dir.name}
        )
        return make_context(raw, {"partition-id": 0, "num-partitions": 2}), parse_run_config(raw)

    missing, ours = tmp_path / "no-run", tmp_path / "run"
    ours.mkdir()
    (ours / ENGINE_TIMINGS).mkdir()  # a folder where the file goes: the append fails

    # Execute / Assert: no folder → nothing written, nothing raised.
    engine_time(*node(missing), 1, started=0.0, device_s=1.0, users=1)
    assert not missing.exists()
    # An unwritable line → a warning, the round goes on.
    engine_time(*node(ours), 1, started=0.0, device_s=1.0, users=1)
    assert "engine timings not written" in caplog.text
    # A deployed device (a data dir in its node config) writes nothing; a simulated one writes.
    (ours / ENGINE_TIMINGS).rmdir()
    ctx, cfg = node(ours)
    ctx.node_config["data-dir"] = str(tmp_path / "device")
    engine_time(ctx, cfg, 1, started=0.0, device_s=1.0, users=1)
    assert not (ours / ENGINE_TIMINGS).exists()
    engine_time(*node(ours), 2, started=0.0, device_s=1.0, users=3)
    line = json.loads((ours / ENGINE_TIMINGS).read_text())
    assert line["round"] == 2 and line["users"] == 3 and line["device_s"] == 1.0
