"""fedpersona ServerApp: federate the shared LoRA tensors, then write the run's outputs.

With ``secagg.enabled`` (the default) rounds run through Flower's legacy workflow with SecAgg+
(:mod:`server.secagg`); otherwise through the Message API's FedAvg (:mod:`server.strategy`).
Either way devices clip (and possibly noise) their update, the federation accountant charges
each released round, and ``summary.json`` says what the ε assumes.
"""

from __future__ import annotations

import math
import time
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.server import LegacyContext, ServerConfig
from flwr.serverapp import Grid, ServerApp

from common import ab
from common.config import RunConfig, parse_run_config
from common.data import select_users
from common.dp.policy import client_noise_std, min_updates
from common.lora import build_skeleton, export_adapter, init_lora_tensors, lora_shapes
from common.model import load_model_config, model_dir
from common.personalization import GLOBAL_ADAPTER, strategy_for
from common.secagg import NOISE_TAIL_SIGMAS, derive_secagg_params
from common.serialization import from_arrayrecord, to_arrayrecord
from server import checkpoint
from server.accountant import FederationAccountant
from server.outputs import write_summary
from server.recorder import RoundRecorder
from server.secagg import SecAggDPStrategy, secagg_workflow
from server.strategy import PersonaFedAvg

app = ServerApp()


def secagg_clip_probability(*, updates: int, num_params: int) -> float:
    """Union bound on the chance that SecAgg+ clips any coordinate of any of ``updates``
    noised updates of ``num_params`` entries in one round.

    An entry of a clipped update lies in [-C, C]; SecAgg+ quantizes within C + 7·std of noise
    (:data:`common.secagg.NOISE_TAIL_SIGMAS`), so an entry is clipped only where its noise
    passes 7 standard deviations (probability erfc(7/√2) ≈ 2.6e-12). A clipped entry changes
    the released sum's distribution, so this probability belongs in δ.
    """
    return min(1.0, updates * num_params * math.erfc(NOISE_TAIL_SIGMAS / math.sqrt(2)))


def privacy_report(  # type: ignore[no-untyped-def]
    cfg: RunConfig,
    *,
    m_min: int,
    sample_rate: float,
    acc,
    num_params: int = 0,
    round_updates: tuple[int, ...] = (),
) -> dict:
    """What the printed ε means and what it assumes.

    ``num_params`` (entries of the shared update) and ``round_updates`` (updates in each
    released round) size the effective δ under SecAgg+ clipping
    (:func:`secagg_clip_probability`).
    """
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
            "sampling": cfg.sampling,
            "assumes": f"{trust}; "
            + (
                f"Poisson sampling by the server, each device with probability q={sample_rate:.3g}"
                " (the sampling the accountant's amplification assumes)"
                if cfg.sampling == "poisson"
                else f"a fixed-size uniform sample of q={sample_rate:.3g} of the devices, "
                "accounted as if Poisson (an approximation)"
            )
            + "; a device credits the sampling only where it drew its own participation "
            "coin or its owner trusts the server's claim (device privacy policy), else it "
            "charges each round it joins at q = 1",
        }
        clipped = (
            sum(secagg_clip_probability(updates=u, num_params=num_params) for u in round_updates)
            if dp.noise_mode == "distributed" and cfg.secagg.enabled
            else 0.0
        )
        user.update(
            {
                "neighbouring": "add or remove one user's entire data (user-level); replacing "
                "one user's data with another's doubles the sensitivity (2C): its ε is that of "
                "σ/2",
                "trust": (
                    "honest-but-curious server that runs SecAgg+ as published; no collusion of "
                    "the server with as many of a round's devices as the SecAgg+ "
                    "reconstruction threshold; at least m_min honest devices in each released "
                    "round, each adding its share of the noise"
                    if dp.noise_mode == "distributed"
                    else "a trusted server that adds the noise to the unmasked sum; devices "
                    "cannot verify it and decline unless their owner trusts server noise"
                ),
                "effective_delta": cfg.privacy.delta + clipped,
                "effective_delta_note": "δ plus the chance that SecAgg+ clipped any noised "
                "coordinate in a released round (union bound over devices and entries: "
                f"{clipped:.2g})"
                if clipped
                else "δ: no SecAgg+ quantization clips the noised updates",
            }
        )
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


def _resume_state(
    cfg: RunConfig, run_dir: Path, shapes: dict[str, tuple[int, ...]]
) -> checkpoint.ServerState | None:
    """The checkpoint to continue from, if ``resume`` and the run dir has a usable one."""
    if not cfg.resume:
        return None
    state = checkpoint.load(run_dir)
    if state is not None:
        checkpoint.check_compatible(state, cfg.to_flat(), shapes)
    return state


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` of train + evaluate and write the run's outputs.

    After every round the run's state is checkpointed under ``<run_dir>/checkpoint/``; a
    ServerApp started again on the same run dir (same ``output.dir`` / ``output.run-name``,
    ``resume = true``) continues at the next round with the same accounting.
    """
    t0 = time.time()
    cfg = parse_run_config(dict(context.run_config))
    strategy = strategy_for(cfg)
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
    shapes = {n: tuple(init[n].shape) for n in shared_names}
    num_nodes = cfg.data.num_users or max(2, len(list(grid.get_node_ids())))
    m_min = min_updates(cfg, num_nodes)
    n_sampled = max(2, int(num_nodes * cfg.fraction_train))
    sample_rate = cfg.fraction_train if cfg.sampling == "poisson" else n_sampled / num_nodes
    # The most devices one sum can hold: a Poisson cohort may be any size.
    max_cohort = num_nodes if cfg.sampling == "poisson" else n_sampled
    # Nodes, and how the server samples them: one device per node, or (simulation) nodes that
    # each host several users, sample them themselves and weight their mean by the count.
    hosts = cfg.users_per_node > 1
    num_hosts = math.ceil(num_nodes / cfg.users_per_node) if hosts else num_nodes
    node_fraction = 1.0 if hosts else cfg.fraction_train
    node_sampling = "fixed" if hosts else cfg.sampling
    n_node_sampled = num_hosts if hosts else n_sampled
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
    current = {n: init[n].numpy() for n in shared_names}
    stopped_at: int | None = None
    done, elapsed_before = 0, 0.0
    resumed = _resume_state(cfg, run_dir, shapes)
    if resumed is not None:
        done, elapsed_before, stopped_at = resumed.round, resumed.elapsed_s, resumed.stopped_at
        current = dict(zip(resumed.shared_names, resumed.shared, strict=True))
        if acc is not None and resumed.accountant is not None:
            acc.load_state_dict(resumed.accountant)
        recorder.restore(
            rounds=resumed.rounds,
            clients=resumed.clients,
            ab_rounds=resumed.ab_rounds,
            pending_train=resumed.pending_train,
        )
        checkpoint.restore_rng(resumed.rng)
        log(
            INFO,
            "fedpersona: resuming %s after round %s of %s (user ε so far %s)",
            run_dir,
            done,
            cfg.num_server_rounds,
            acc.epsilon("rdp") if acc is not None else "n/a",
        )
    remaining = max(0, cfg.num_server_rounds - done)

    def save_checkpoint(server_round: int, stopped: int | None) -> None:
        """Persist the run's state after ``server_round`` (atomically)."""
        book = recorder.export_state()
        checkpoint.save(
            run_dir,
            checkpoint.ServerState(
                round=server_round,
                shared_names=list(shared_names),
                shared=[current[n] for n in shared_names],
                config=cfg.to_flat(),
                accountant=acc.state_dict() if acc is not None else None,
                rounds=book["rounds"],
                clients=book["clients"],
                ab_rounds=book["ab_rounds"],
                pending_train=book["pending_train"],
                stopped_at=stopped,
                rng=checkpoint.capture_rng(),
                elapsed_s=elapsed_before + time.time() - t0,
            ),
        )

    central_std = (
        cfg.dp.noise_multiplier * cfg.dp.clip_norm
        if cfg.dp.noise_mode == "central" and cfg.dp.adds_noise
        else 0.0
    )
    t_setup = time.time()
    if remaining and cfg.secagg.enabled:
        with_ab = bool(cfg.ab.interactions)
        params = derive_secagg_params(
            clip_norm=cfg.dp.clip_norm,
            noise_std=client_noise_std(cfg, num_nodes),
            num_clients=max(2, num_hosts if hosts else max_cohort),
            max_weight=float(cfg.users_per_node),
            num_params=sum(init[n].numel() for n in shared_names) + (ab.FIELDS if with_ab else 0),
            num_shares=cfg.secagg.num_shares,
            reconstruction_threshold=cfg.secagg.reconstruction_threshold,
        )

        def secagg_round_end(server_round: int) -> None:
            current.update(zip(shared_names, legacy.current, strict=True))
            save_checkpoint(server_round, legacy.stopped_at)

        legacy = SecAggDPStrategy(
            shared_names=shared_names,
            initial=[current[n] for n in shared_names],
            recorder=recorder,
            min_updates=m_min,
            fraction_train=node_fraction,
            fraction_evaluate=cfg.fraction_evaluate,
            min_nodes=max(2, num_hosts) if hosts else max(2, cfg.data.num_users),
            central_noise_std=central_std,
            target_epsilon=cfg.privacy.target_epsilon,
            ab_scale=ab.scale(cfg.ab.interactions, cfg.dp.clip_norm) if with_ab else None,
            round_offset=done,
            on_round_end=secagg_round_end,
            sampling=node_sampling,
            evaluate_every=cfg.evaluate_every,
            num_rounds=cfg.num_server_rounds,
            server_learning_rate=cfg.server_learning_rate,
        )
        legacy.stopped_at = stopped_at
        workflow = secagg_workflow(
            params,
            timeout=cfg.secagg.timeout,
            # m_min users; a simulation node hosting k users carries up to k of them
            min_masked=max(1, math.ceil(m_min / cfg.users_per_node)),
            shapes=[shapes[n] for n in shared_names] + ([(ab.FIELDS,)] if with_ab else []),
        )
        workflow(
            grid,
            LegacyContext(
                context=context,
                config=ServerConfig(num_rounds=remaining, round_timeout=cfg.round_timeout),
                strategy=legacy,
            ),
        )
    elif remaining:

        def fedavg_round_end(server_round: int, arrays: ArrayRecord | None) -> None:
            if arrays is not None:
                current.update((n, t.numpy()) for n, t in from_arrayrecord(arrays, shapes).items())
            save_checkpoint(server_round, fed.stopped_at)

        fed = PersonaFedAvg(
            recorder=recorder,
            min_updates=m_min,
            central_noise_std=central_std,
            target_epsilon=cfg.privacy.target_epsilon,
            shapes=shapes,
            round_offset=done,
            on_round_end=fedavg_round_end,
            sampling=node_sampling,
            evaluate_every=cfg.evaluate_every,
            num_rounds=cfg.num_server_rounds,
            server_learning_rate=cfg.server_learning_rate,
            fraction_train=node_fraction,
            fraction_evaluate=cfg.fraction_evaluate,
            min_train_nodes=n_node_sampled,
            min_evaluate_nodes=max(1, int(num_hosts * cfg.fraction_evaluate)),
            min_available_nodes=max(2, num_hosts) if hosts else max(2, cfg.data.num_users),
            weighted_by_key="weight",
        )
        fed.stopped_at = stopped_at
        fed.start(
            grid=grid,
            initial_arrays=to_arrayrecord({n: torch.from_numpy(current[n]) for n in shared_names}),
            num_rounds=remaining,
            timeout=cfg.round_timeout,
            train_config=ConfigRecord({}),
            evaluate_config=ConfigRecord({}),
        )
    t_rounds = time.time()

    final = {n: t for n, t in init.items() if f".{GLOBAL_ADAPTER}." in n}
    final.update({n: torch.from_numpy(np.array(a)) for n, a in current.items()})
    export_adapter(
        final,
        cfg.model,
        run_dir / "global_adapter",
        base_model=str(model_dir(cfg.model.name)),
        note={"kind": "global", "strategy": cfg.strategy, "what": strategy.cold_start},
    )
    partitions = [k for k in recorder.clients if isinstance(k, int)]
    n_users = max(cfg.data.num_users, max(partitions, default=-1) + 1)
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
        privacy=privacy_report(
            cfg,
            m_min=m_min,
            sample_rate=sample_rate,
            acc=acc,
            num_params=int(sum(np.size(a) for a in current.values())),
            round_updates=tuple(
                int(r.get("updates", 0)) for r in recorder.rounds if r.get("released")
            ),
        ),
        ab_test=ab.summarize(recorder.ab_rounds, secure=cfg.secagg.enabled)
        if recorder.ab_rounds
        else None,
        timings={
            "setup_s": t_setup - t0,
            "rounds_s": t_rounds - t_setup,
            "total_s": time.time() - t0,
            **({"resumed_after_round": done, "before_restart_s": elapsed_before} if done else {}),
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
