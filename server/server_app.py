"""fedpersona ServerApp: federate the shared LoRA tensors, then write the run's outputs.

With ``secagg.enabled`` (the default) rounds run through Flower's legacy workflow with SecAgg+
(:mod:`server.secagg`); otherwise through the Message API's FedAvg (:mod:`server.strategy`).
Either way devices clip (and possibly noise) their update, the federation accountant charges
each released round, and ``summary.json`` says what the ε assumes.
"""

from __future__ import annotations

import time
from logging import INFO

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from flwr.common.logger import log
from flwr.server import LegacyContext, ServerConfig
from flwr.serverapp import Grid, ServerApp

from common import ab
from common.config import RunConfig, parse_run_config
from common.data import select_users
from common.dp.policy import client_noise_std, min_updates
from common.lora import build_skeleton, export_adapter, init_lora_tensors, lora_shapes
from common.model import load_model_config, model_dir
from common.personalization import GLOBAL_ADAPTER, get_strategy
from common.secagg import derive_secagg_params
from common.serialization import from_arrayrecord, to_arrayrecord
from server.accountant import FederationAccountant
from server.outputs import write_summary
from server.recorder import RoundRecorder
from server.secagg import SecAggDPStrategy, secagg_workflow
from server.strategy import PersonaFedAvg

app = ServerApp()


def privacy_report(cfg: RunConfig, *, m_min: int, sample_rate: float, acc) -> dict:  # type: ignore[no-untyped-def]
    """What the printed ε means and what it assumes."""
    dp = cfg.dp
    if not dp.adds_noise:
        user = {
            "mode": dp.noise_mode,
            "epsilon": float("inf"),
            "note": "no user-level DP: updates are not noised",
        }
    else:
        trust = (
            f"at least m_min={m_min} of each round's participants are honest (each adds "
            f"N(0, (σC)²/m_min) before SecAgg+); the server never sees a noise-free sum"
            if dp.noise_mode == "distributed"
            else "a trusted server (it adds the noise after unmasking the sum)"
        )
        user = {
            "mode": dp.noise_mode,
            "noise_multiplier": dp.noise_multiplier,
            "clip_norm": dp.clip_norm,
            "min_updates": m_min,
            "sample_rate": sample_rate,
            "rounds_released": len(acc.history),
            "delta": cfg.privacy.delta,
            "epsilon_rdp": acc.epsilon("rdp"),
            "epsilon_prv": acc.epsilon("prv"),
            "assumes": f"{trust}; uniform sampling of q={sample_rate:.3g} by the server "
            "(devices do not credit it unless privacy.verifiable-sampling)",
        }
    return {
        "user_level": user,
        "record_level": {
            "enabled": dp.local_enabled,
            "noise_multiplier": dp.local_noise_multiplier if dp.local_enabled else 0.0,
            "max_grad_norm": dp.local_max_grad_norm,
            "note": "per device, from its own Opacus accountant: see clients[].record_epsilon",
        },
        "secure_aggregation": "SecAgg+" if cfg.secagg.enabled else "off",
        "not_covered": "the scalar metrics devices report in the clear (train and held-out "
        "losses, counts) are not part of any ε above",
        "device_epsilon_cap": cfg.privacy.epsilon_cap,
    }


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` of train + evaluate and write the run's outputs."""
    t0 = time.time()
    cfg = parse_run_config(dict(context.run_config))
    strategy = get_strategy(cfg.strategy)
    run_dir = cfg.run_dir(context.run_id)
    log(
        INFO,
        "fedpersona: strategy=%s model=%s secagg=%s dp=%s -> %s",
        cfg.strategy,
        cfg.model.name,
        cfg.secagg.enabled,
        cfg.dp.noise_mode,
        run_dir,
    )

    # Shapes only: the server never needs the base model's weights.
    skeleton = build_skeleton(load_model_config(cfg.model.name), cfg.model, strategy)
    init = init_lora_tensors(lora_shapes(skeleton), seed=cfg.model.init_seed)
    del skeleton
    shared_names, _, _ = strategy.split(list(init))
    num_nodes = cfg.data.num_users or max(2, len(list(grid.get_node_ids())))
    m_min = min_updates(cfg, num_nodes)
    n_sampled = max(2, int(num_nodes * cfg.fraction_train))
    sample_rate = n_sampled / num_nodes
    acc = (
        FederationAccountant(
            noise_multiplier=cfg.dp.noise_multiplier,
            sample_rate=sample_rate,
            delta=cfg.privacy.delta,
        )
        if cfg.dp.adds_noise
        else None
    )
    recorder = RoundRecorder(acc)
    central_std = (
        cfg.dp.noise_multiplier * cfg.dp.clip_norm
        if cfg.dp.noise_mode == "central" and cfg.dp.adds_noise
        else 0.0
    )
    t_setup = time.time()
    if cfg.secagg.enabled:
        params = derive_secagg_params(
            clip_norm=cfg.dp.clip_norm,
            noise_std=client_noise_std(cfg, num_nodes),
            num_clients=n_sampled,
            num_params=sum(init[n].numel() for n in shared_names)
            + (ab.FIELDS if cfg.ab.interactions else 0),
            num_shares=cfg.secagg.num_shares,
            reconstruction_threshold=cfg.secagg.reconstruction_threshold,
        )
        legacy = SecAggDPStrategy(
            shared_names=shared_names,
            initial=[init[n].numpy() for n in shared_names],
            recorder=recorder,
            min_updates=m_min,
            fraction_train=cfg.fraction_train,
            fraction_evaluate=cfg.fraction_evaluate,
            min_nodes=max(2, cfg.data.num_users),
            central_noise_std=central_std,
            target_epsilon=cfg.privacy.target_epsilon,
            ab_scale=ab.scale(cfg.ab.interactions, cfg.dp.clip_norm)
            if cfg.ab.interactions
            else None,
        )
        workflow = secagg_workflow(params, timeout=cfg.secagg.timeout)
        workflow(
            grid,
            LegacyContext(
                context=context,
                config=ServerConfig(
                    num_rounds=cfg.num_server_rounds, round_timeout=cfg.round_timeout
                ),
                strategy=legacy,
            ),
        )
        final_shared = {n: np.asarray(a) for n, a in zip(shared_names, legacy.current, strict=True)}
    else:
        fed = PersonaFedAvg(
            recorder=recorder,
            min_updates=m_min,
            central_noise_std=central_std,
            target_epsilon=cfg.privacy.target_epsilon,
            fraction_train=cfg.fraction_train,
            fraction_evaluate=cfg.fraction_evaluate,
            min_train_nodes=n_sampled,
            min_evaluate_nodes=max(1, int(num_nodes * cfg.fraction_evaluate)),
            min_available_nodes=max(2, cfg.data.num_users),
            weighted_by_key="weight",
        )
        result = fed.start(
            grid=grid,
            initial_arrays=to_arrayrecord({n: init[n] for n in shared_names}),
            num_rounds=cfg.num_server_rounds,
            timeout=cfg.round_timeout,
            train_config=ConfigRecord({}),
            evaluate_config=ConfigRecord({}),
        )
        final_shared = {
            n: t.numpy()
            for n, t in from_arrayrecord(
                result.arrays, {n: tuple(init[n].shape) for n in shared_names}
            ).items()
        }
    t_rounds = time.time()

    final = {n: t for n, t in init.items() if f".{GLOBAL_ADAPTER}." in n}
    final.update({n: torch.from_numpy(np.array(a)) for n, a in final_shared.items()})
    export_adapter(
        final,
        cfg.model,
        run_dir / "global_adapter",
        base_model=str(model_dir(cfg.model.name)),
        note={"kind": "global", "strategy": cfg.strategy, "what": strategy.cold_start},
    )
    n_users = max(cfg.data.num_users, max(recorder.clients, default=-1) + 1)
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
        rounds=recorder.rounds,
        clients=recorder.clients,
        users=users,
        privacy=privacy_report(cfg, m_min=m_min, sample_rate=sample_rate, acc=acc),
        ab_test=ab.summarize(recorder.ab_rounds, secure=cfg.secagg.enabled)
        if recorder.ab_rounds
        else None,
        timings={
            "setup_s": t_setup - t0,
            "rounds_s": t_rounds - t_setup,
            "total_s": time.time() - t0,
        },
    )
    log(
        INFO,
        "fedpersona: win_rate=%.3f ppl_gain=%.4f user_epsilon=%s; summary in %s",
        summary["win_rate"],
        summary["ppl_gain"],
        summary["privacy"]["user_level"].get("epsilon_rdp", "inf"),
        run_dir / "summary.json",
    )
