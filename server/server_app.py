"""fedpersona ServerApp: FedAvg over the shared LoRA tensors (Message API), then outputs."""

from __future__ import annotations

import time
from logging import INFO

from flwr.app import ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common.config import parse_run_config
from common.data import select_users
from common.lora import build_skeleton, export_adapter, init_lora_tensors, lora_shapes
from common.model import load_model_config, model_dir
from common.personalization import GLOBAL_ADAPTER, get_strategy
from common.serialization import NUM_EXAMPLES_KEY, from_arrayrecord, to_arrayrecord
from server.outputs import write_summary
from server.strategy import PersonaFedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` of train + evaluate and write the run's outputs."""
    t0 = time.time()
    cfg = parse_run_config(dict(context.run_config))
    strategy = get_strategy(cfg.strategy)
    run_dir = cfg.run_dir(context.run_id)
    log(INFO, "fedpersona: strategy=%s model=%s -> %s", cfg.strategy, cfg.model.name, run_dir)

    # Shapes only: the server never needs the base model's weights.
    skeleton = build_skeleton(load_model_config(cfg.model.name), cfg.model, strategy)
    init = init_lora_tensors(lora_shapes(skeleton), seed=cfg.model.init_seed)
    del skeleton
    shared_names, _, _ = strategy.split(list(init))
    min_nodes = max(2, cfg.data.num_users)

    fed = PersonaFedAvg(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=max(1, int(min_nodes * cfg.fraction_train)),
        min_evaluate_nodes=max(1, int(min_nodes * cfg.fraction_evaluate)),
        min_available_nodes=min_nodes,
        weighted_by_key=NUM_EXAMPLES_KEY,
    )
    t_setup = time.time()
    result = fed.start(
        grid=grid,
        initial_arrays=to_arrayrecord({n: init[n] for n in shared_names}),
        num_rounds=cfg.num_server_rounds,
        timeout=cfg.round_timeout,
        train_config=ConfigRecord({}),
        evaluate_config=ConfigRecord({}),
    )
    t_rounds = time.time()

    final = dict(init)
    final.update(from_arrayrecord(result.arrays, {n: tuple(init[n].shape) for n in shared_names}))
    export_adapter(
        {n: t for n, t in final.items() if f".{GLOBAL_ADAPTER}." in n},
        cfg.model,
        run_dir / "global_adapter",
        base_model=str(model_dir(cfg.model.name)),
        note={
            "kind": "global",
            "strategy": cfg.strategy,
            "rounds": cfg.num_server_rounds,
            "what": strategy.cold_start,
        },
    )
    n_users = max(cfg.data.num_users, len(fed.clients), max(fed.clients, default=-1) + 1)
    users = [
        u.user
        for u in select_users(
            n_users,
            min_lines=cfg.data.min_lines,
            seed=cfg.seed,
            test_fraction=cfg.data.test_fraction,
        )
    ]
    summary = write_summary(
        run_dir,
        cfg=cfg,
        strategy=strategy,
        rounds=fed.rounds,
        clients=fed.clients,
        users=users,
        timings={
            "setup_s": t_setup - t0,
            "rounds_s": t_rounds - t_setup,
            "total_s": time.time() - t0,
        },
    )
    log(
        INFO,
        "fedpersona: win_rate=%.3f ppl_gain=%.4f; summary in %s",
        summary["win_rate"],
        summary["ppl_gain"],
        run_dir / "summary.json",
    )
