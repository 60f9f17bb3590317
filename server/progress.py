"""A run's plan and its progress between rounds: what the ServerApp needs before its first round
(:func:`plan_run`), the state it carries from round to round and checkpoints (:class:`Progress`),
and how a run starts or resumes (:func:`start`). ``server/outputs.py`` reads a finished run's
:class:`Progress`; ``server/server_app.py`` drives the rounds."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.common.logger import log
from flwr.serverapp import Grid

from common.config import RunConfig
from common.dp.privatize import Privatize
from common.lora import build_skeleton, init_lora_tensors, lora_shapes
from common.model import load_model_config
from common.personalization import strategy_for
from server import checkpoint
from server.accountant import FederationAccountant
from server.optimizer import ServerStep
from server.recorder import RoundRecorder
from server.release import RoundOptions


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


@dataclass
class Plan:
    """What a run needs before its first round, from the config and the nodes online."""

    cfg: RunConfig
    run_dir: Path
    init: dict[str, torch.Tensor]
    shared_names: list[str]
    shapes: dict[str, tuple[int, ...]]
    num_nodes: int
    m_min: int
    sample_rate: float
    max_cohort: int
    # Nodes and how the server samples them: one device per node, or (simulation) nodes that
    # each host several users, sample them themselves and weight their mean by the count.
    hosts: bool
    num_hosts: int
    node_fraction: float
    node_sampling: str
    n_node_sampled: int
    min_nodes: int
    privatize: Privatize

    @property
    def rounding(self) -> tuple[float, float, float] | None:
        """``skellam`` mode: the rounding the accountant charges with (``None`` otherwise)."""
        if not self.privatize.discrete:
            return None
        dim = sum(self.init[n].numel() for n in self.shared_names)
        return self.privatize.discrete_params(dim).charge


def plan_run(cfg: RunConfig, run_id: int, grid: Grid) -> Plan:
    """Shapes (never the base model's weights), m_min, sampling and noise of a run."""
    strategy = strategy_for(cfg)
    skeleton = build_skeleton(load_model_config(cfg.model.name), cfg.model, strategy)
    init = init_lora_tensors(lora_shapes(skeleton), seed=cfg.model.init_seed)
    del skeleton
    shared_names, _, _ = strategy.split(list(init))
    num_nodes = cfg.data.num_users or max(2, len(list(grid.get_node_ids())))
    n_sampled = max(2, int(num_nodes * cfg.fraction_train))
    hosts = cfg.users_per_node > 1
    num_hosts = math.ceil(num_nodes / cfg.users_per_node) if hosts else num_nodes
    return Plan(
        cfg=cfg,
        run_dir=cfg.run_dir(run_id),
        init=init,
        shared_names=shared_names,
        shapes={n: tuple(init[n].shape) for n in shared_names},
        num_nodes=num_nodes,
        m_min=cfg.m_min(num_nodes),
        sample_rate=cfg.fraction_train if cfg.sampling == "poisson" else n_sampled / num_nodes,
        # The most devices one sum can hold: a Poisson cohort may be any size.
        max_cohort=num_nodes if cfg.sampling == "poisson" else n_sampled,
        hosts=hosts,
        num_hosts=num_hosts,
        node_fraction=1.0 if hosts else cfg.fraction_train,
        node_sampling="fixed" if hosts else cfg.sampling,
        n_node_sampled=num_hosts if hosts else n_sampled,
        min_nodes=max(2, num_hosts) if hosts else max(2, cfg.data.num_users),
        privatize=Privatize.of(cfg, num_nodes),
    )


@dataclass
class Progress:
    """A run's state between rounds: the global shared tensors, the books, the checkpoint."""

    plan: Plan
    current: dict[str, np.ndarray]
    recorder: RoundRecorder
    acc: FederationAccountant | None
    done: int = 0
    stopped_at: int | None = None
    elapsed_before: float = 0.0
    t0: float = field(default_factory=time.time)
    step: ServerStep = field(default_factory=ServerStep)

    def round_options(self, on_round_end: Callable[..., None]) -> RoundOptions:
        """What both round strategies (SecAgg+ and FedAvg) are given alike: the books, m_min,
        noise, privacy target, sampling, schedule, server step and where the run resumes."""
        plan, cfg = self.plan, self.plan.cfg
        return RoundOptions(
            recorder=self.recorder,
            min_updates=plan.m_min,
            central_noise_std=plan.privatize.central_std,
            target_epsilon=cfg.privacy.target_epsilon,
            fraction_train=plan.node_fraction,
            fraction_evaluate=cfg.fraction_evaluate,
            sampling=plan.node_sampling,
            evaluate_every=cfg.evaluate_every,
            num_rounds=cfg.num_server_rounds,
            round_offset=self.done,
            on_round_end=on_round_end,
            server_step=self.step,
            on_release=self.keep_released,
        )

    def keep_released(self, server_round: int, change: dict[str, np.ndarray]) -> None:
        """Keep a released round's mean change under ``<run_dir>/released/``."""
        checkpoint.save_released(self.plan.run_dir, server_round, change)

    def save(self, server_round: int, stopped: int | None) -> None:
        """Persist the run's state after ``server_round`` (atomically)."""
        book = self.recorder.export_state()
        names = self.plan.shared_names
        checkpoint.save(
            self.plan.run_dir,
            checkpoint.ServerState(
                round=server_round,
                shared_names=list(names),
                shared=[self.current[n] for n in names],
                config=self.plan.cfg.to_flat(),
                accountant=self.acc.state_dict() if self.acc is not None else None,
                rounds=book["rounds"],
                clients=book["clients"],
                ab_rounds=book["ab_rounds"],
                pending_train=book["pending_train"],
                stopped_at=stopped,
                rng=checkpoint.capture_rng(),
                elapsed_s=self.elapsed_before + time.time() - self.t0,
                optimizer=self.step.state_dict(),
            ),
        )


def start(plan: Plan, t0: float) -> Progress:
    """A fresh run's state, or the checkpointed one when ``resume`` finds it."""
    cfg = plan.cfg
    acc = (
        FederationAccountant(
            noise_multiplier=cfg.dp.noise_multiplier,
            sample_rate=plan.sample_rate,
            delta=cfg.privacy.delta,
            rounding=plan.rounding,
        )
        if cfg.dp.adds_noise
        else None
    )
    progress = Progress(
        plan,
        {n: plan.init[n].numpy() for n in plan.shared_names},
        RoundRecorder(acc),
        acc,
        t0=t0,
        step=ServerStep.of(cfg.server),
    )
    resumed = _resume_state(cfg, plan.run_dir, plan.shapes)
    if resumed is None:
        return progress
    progress.done, progress.elapsed_before = resumed.round, resumed.elapsed_s
    progress.stopped_at = resumed.stopped_at
    progress.current = dict(zip(resumed.shared_names, resumed.shared, strict=True))
    if resumed.optimizer is not None:
        progress.step.load_state_dict(resumed.optimizer)
    if acc is not None and resumed.accountant is not None:
        acc.load_state_dict(resumed.accountant)
    progress.recorder.restore(
        rounds=resumed.rounds,
        clients=resumed.clients,
        ab_rounds=resumed.ab_rounds,
        pending_train=resumed.pending_train,
    )
    checkpoint.restore_rng(resumed.rng)
    log(
        INFO,
        "fedpersona: resuming %s after round %s of %s (user ε so far %s)",
        plan.run_dir,
        progress.done,
        cfg.num_server_rounds,
        acc.epsilon("rdp") if acc is not None else "n/a",
    )
    return progress
