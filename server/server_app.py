"""fedpersona ServerApp: federate the shared LoRA tensors, then write the run's outputs.

With ``secagg.enabled`` (the default) rounds run through Flower's legacy workflow with SecAgg+
(:mod:`server.secagg`); otherwise through the Message API's FedAvg (:mod:`server.strategy`).
Either way devices clip (and possibly noise) their update, the federation accountant charges
each released round, and ``summary.json`` says what the ε assumes.
"""

from __future__ import annotations

import functools
import math
import time
from logging import INFO

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.server import LegacyContext, ServerConfig
from flwr.serverapp import Grid, ServerApp

from common import ab, loss_sums
from common.config import parse_run_config
from common.secagg import derive_secagg_params, neighbourhood_size
from common.serialization import from_arrayrecord, to_arrayrecord
from server.outputs import write_outputs
from server.progress import Progress, plan_run, start
from server.secagg import SecAggDPStrategy, secagg_workflow
from server.strategy import PersonaFedAvg

app = ServerApp()


def run_secagg(progress: Progress, remaining: int, grid: Grid, context: Context) -> None:
    """``remaining`` rounds through Flower's legacy workflow with SecAgg+."""
    plan, cfg = progress.plan, progress.plan.cfg
    names = plan.shared_names
    with_ab = bool(cfg.ab.interactions)
    with_losses = cfg.eval.secure_sums
    aux = (ab.FIELDS if with_ab else 0) + (len(loss_sums.FIELDS) if with_losses else 0)
    privatize = plan.privatize
    dim = sum(plan.init[n].numel() for n in names)
    coded = privatize.discrete_params(dim) if privatize.discrete else None
    if coded is not None and with_ab:
        ab.check_integer_headroom(cfg.ab.interactions, privatize.max_contributions, coded.bits)
    params = derive_secagg_params(
        privatize,
        num_clients=max(2, plan.num_hosts if plan.hosts else plan.max_cohort),
        # skellam: every node sends weight 1 (SecAgg+'s quantizer is then the identity)
        max_weight=1.0 if coded is not None else float(cfg.users_per_node),
        num_params=dim + (aux if coded is None else 0),
        num_shares=cfg.secagg.num_shares,
        reconstruction_threshold=cfg.secagg.reconstruction_threshold,
    )
    if coded is not None:
        log(
            INFO,
            "fedpersona: skellam noise in SecAgg+'s integers: %s numbers rotated in %s, "
            "%s bits, scale %.4g, wrap-around probability per round <= %.2g",
            dim,
            coded.d,
            coded.bits,
            coded.scale,
            coded.wrap_probability,
        )

    def round_end(server_round: int) -> None:
        progress.current.update(zip(names, legacy.current, strict=True))
        progress.save(server_round, legacy.stopped_at)

    legacy = SecAggDPStrategy(
        progress.round_options(round_end),
        shared_names=names,
        initial=[progress.current[n] for n in names],
        min_nodes=plan.min_nodes,
        ab_scale=ab.scale(cfg.ab.interactions, plan.privatize.clip_norm) if with_ab else None,
        loss_clip_norm=plan.privatize.clip_norm if with_losses else None,
        discrete=coded,
        run_id=context.run_id,
    )
    legacy.stopped_at = progress.stopped_at
    workflow = secagg_workflow(
        params,
        timeout=cfg.secagg.timeout,
        # m_min users; a simulation node hosting k users carries up to k of them
        min_masked=max(1, math.ceil(plan.m_min / cfg.users_per_node)),
        shapes=([plan.shapes[n] for n in names] if coded is None else [(coded.d,)])
        + ([(ab.FIELDS,)] if with_ab else [])
        + ([(len(loss_sums.FIELDS),)] if with_losses else []),
        fixed_range=coded is not None,
        # secagg.num-shares 0: each round's neighbourhoods from its cohort, never fewer than
        # the m_min a device checks its cohort by (client/federation/gate.py)
        neighbours=functools.partial(
            neighbourhood_size,
            threshold=cfg.secagg.reconstruction_threshold,
            dropout=cfg.secagg.dropout_rate,
            corrupt=cfg.secagg.corrupt_rate,
            at_least=plan.m_min,
        ),
    )
    workflow(
        grid,
        LegacyContext(
            context=context,
            config=ServerConfig(num_rounds=remaining, round_timeout=cfg.round_timeout),
            strategy=legacy,
        ),
    )


def run_fedavg(progress: Progress, remaining: int, grid: Grid) -> None:
    """``remaining`` rounds through the Message API's FedAvg (no SecAgg+)."""
    plan, cfg = progress.plan, progress.plan.cfg

    def round_end(server_round: int, arrays: ArrayRecord | None) -> None:
        if arrays is not None:
            progress.current.update(
                (n, t.numpy()) for n, t in from_arrayrecord(arrays, plan.shapes).items()
            )
        progress.save(server_round, fed.stopped_at)

    fed = PersonaFedAvg(
        progress.round_options(round_end),
        shapes=plan.shapes,
        min_train_nodes=plan.n_node_sampled,
        min_evaluate_nodes=max(1, int(plan.num_hosts * cfg.fraction_evaluate)),
        min_available_nodes=plan.min_nodes,
        weighted_by_key="weight",
    )
    fed.stopped_at = progress.stopped_at
    fed.start(
        grid=grid,
        initial_arrays=to_arrayrecord(
            {n: torch.from_numpy(progress.current[n]) for n in plan.shared_names}
        ),
        num_rounds=remaining,
        timeout=cfg.round_timeout,
        train_config=ConfigRecord({}),
        evaluate_config=ConfigRecord({}),
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` of train + evaluate and write the run's outputs.

    After every round the run's state is checkpointed under ``<run_dir>/checkpoint/``; a
    ServerApp started again on the same run dir (same ``output.dir`` / ``output.run-name``,
    ``resume = true``) continues at the next round with the same accounting.
    """
    t0 = time.time()
    cfg = parse_run_config(dict(context.run_config))
    plan = plan_run(cfg, context.run_id, grid)
    log(
        INFO,
        "fedpersona: strategy=%s model=%s secagg=%s dp=%s -> %s",
        cfg.strategy,
        cfg.model.name,
        cfg.secagg.enabled,
        cfg.dp.noise_mode,
        plan.run_dir,
    )
    progress = start(plan, t0)
    remaining = max(0, cfg.num_server_rounds - progress.done)
    t_setup = time.time()
    if remaining and cfg.secagg.enabled:
        run_secagg(progress, remaining, grid, context)
    elif remaining:
        run_fedavg(progress, remaining, grid)
    t_rounds = time.time()
    done, before = progress.done, progress.elapsed_before
    summary = write_outputs(
        progress,
        {
            "setup_s": t_setup - t0,
            "rounds_s": t_rounds - t_setup,
            "total_s": time.time() - t0,
            **({"resumed_after_round": done, "before_restart_s": before} if done else {}),
        },
    )
    log(
        INFO,
        "fedpersona: win_rate=%.3f ppl_gain=%.4f user_epsilon=%s; summary in %s",
        summary["win_rate"],
        summary["ppl_gain"],
        summary["privacy"]["user_level"].get("epsilon_rdp", "inf"),
        plan.run_dir / "summary.json",
    )
