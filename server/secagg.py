"""The SecAgg+ path: Flower's legacy ``DefaultWorkflow`` + ``SecAggPlusWorkflow``, with the
two flwr 1.42 problems fixed and DP done by fedpersona rather than the stock wrappers.

* :class:`RobustSecAggPlusWorkflow` — a client lost during setup or share-keys no longer breaks
  the round: after share-keys only the nodes that completed it count as sampled (nobody holds
  masks with the others). The quantization range is sized each round for the cohort
  actually sampled (devices check it). With fewer than m_min masked vectors collected the
  round aborts **before unmasking** (each device's noise share is sized for m_min: a smaller
  sum would carry less noise than promised — and real devices refuse to help unmask it
  anyway, see ``client/federation/gate.py``). A round that halts at any stage is closed as
discarded. * :class:`SecAggDPStrategy` — devices send their clipped (and, in ``distributed`` mode,
  noised) update with weight 1 (0 when they declined), so SecAgg+ yields the mean update of the
  participants. A round with fewer than m_min participants, or a non-finite sum, is discarded
  and the previous model kept (the stock DP wrapper instead drops every round on any failure).
  In ``central`` mode the server adds N(0, (σC)²)/m after unmasking.

(One file on purpose, over the usual length: the workflow's fixes and the strategy it drives are
one protocol: the strategy's sampling sizes the workflow's quantization range, and the workflow's
abort rule is the strategy's m_min.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO, WARNING

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    bytes_to_ndarray,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

from common import ab, loss_sums
from common.dp import discrete
from common.dp.discrete import DiscreteParams
from common.sampling import fixed_sample, poisson_sample
from common.secagg import SecAggParams, quantization_range_for
from server.recorder import users_in
from server.release import RoundOptions, RoundSchedule


class _MaskedVectorGate:
    """A grid proxy for the collect-masked-vectors stage: replies whose masked vector has the
    wrong count, shapes, dtype or range are logged and dropped, so SecAgg+ treats their sender
    as a dropout (its masks are removed through the survivors' shares) instead of crashing or
    silently broadcasting a malformed vector into the sum."""

    def __init__(self, grid, shapes: list[tuple[int, ...]], mod_range: int) -> None:  # type: ignore[no-untyped-def]
        self._grid = grid
        self._shapes = shapes
        self._mod_range = mod_range
        self.rejected: list[str] = []

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._grid, name)

    def problem(self, msg) -> str:  # type: ignore[no-untyped-def]
        """Why a masked-vector reply is malformed ('' if it is fine)."""
        try:
            raw = msg.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
            vector = [bytes_to_ndarray(b) for b in raw]
        except Exception as err:  # noqa: BLE001 - any undecodable reply is malformed
            return f"undecodable masked vector ({type(err).__name__}: {err})"
        if len(vector) != len(self._shapes):
            return f"{len(vector)} arrays, expected {len(self._shapes)}"
        for i, (arr, shape) in enumerate(zip(vector, self._shapes, strict=True)):
            if tuple(arr.shape) != shape:
                return f"array {i} has shape {tuple(arr.shape)}, expected {shape}"
            if arr.dtype.kind not in "iu":
                return f"array {i} has dtype {arr.dtype}, expected integers"
            if arr.size and (arr.min() < 0 or arr.max() >= self._mod_range):
                return f"array {i} is outside [0, {self._mod_range})"
        return ""

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        """Forward, then drop malformed replies (errors pass through: Flower counts them)."""
        kept = []
        for msg in self._grid.send_and_receive(messages, timeout=timeout):
            reason = "" if msg.has_error() else self.problem(msg)
            if reason:
                log(
                    WARNING,
                    "SecAgg+: rejecting node %s's masked vector: %s",
                    msg.metadata.src_node_id,
                    reason,
                )
                self.rejected.append(reason)
                continue
            kept.append(msg)
        return kept


# How often a stage asks for its replies: at the grid's own interval (Flower's: 0.1 s in a
# simulation, 3 s over gRPC), never more often than every 2 ms per reply still awaited (each
# ask passes every awaited message id, so n devices asked at a fixed interval cost n² over a
# stage that lasts ∝ n), and at least every 5 s.
_PULL_PER_PENDING_S, _PULL_MAX_S = 0.002, 5.0


class _PacedGrid:
    """A grid proxy whose ``send_and_receive`` paces its asks for replies by how many it
    still awaits (:data:`_PULL_PER_PENDING_S`), through the grid's own ``push_messages`` and
    ``pull_messages`` (the in-memory grid of a simulation and the gRPC one of a deployment)."""

    def __init__(self, grid) -> None:  # type: ignore[no-untyped-def]
        self._grid = grid

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None):  # type: ignore[no-untyped-def]
        pending = set(self._grid.push_messages(messages))
        end = time.monotonic() + (timeout or 0.0)
        replies: list = []
        while pending and (timeout is None or time.monotonic() < end):
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if pending:
                floor = float(getattr(self._grid, "pull_interval", 3.0))
                pace = max(floor, min(_PULL_MAX_S, _PULL_PER_PENDING_S * len(pending)))
                time.sleep(pace if timeout is None else min(pace, max(0.0, end - time.monotonic())))
        return replies


def _paced(grid):  # type: ignore[no-untyped-def]
    """``grid`` behind :class:`_PacedGrid` where it is one of Flower's polling grids (the
    in-memory one of a simulation, the gRPC/HTTP one of a deployment); any other as is."""
    from flwr.superlink.grid.http_grid import HttpGrid
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return _PacedGrid(grid) if type(grid) in (InMemoryGrid, HttpGrid) else grid


class RobustSecAggPlusWorkflow(SecAggPlusWorkflow):
    """``SecAggPlusWorkflow`` that survives a client lost before the masked vectors and
    rejects malformed masked vectors (their senders count as dropouts).

    Args:
        shapes: Shapes of the vector each device sums (shared tensors, then the A/B
            counts when they ride along); ``None`` skips the masked-vector check.
        min_masked: The fewest masked vectors a sum may be unmasked from (m_min nodes).
        fixed_range: Keep the quantization range as given (``skellam`` mode: it is the
            identity on the devices' integers) instead of sizing it for each round's cohort.
        neighbours: Each round's neighbourhood size from its cohort
            (:func:`common.secagg.neighbourhood_size`); ``None``: ``num_shares`` as given.
        **kwargs: ``SecAggPlusWorkflow`` arguments.
    """

    def __init__(
        self,
        *,
        shapes: list[tuple[int, ...]] | None = None,
        min_masked: int = 2,
        fixed_range: bool = False,
        neighbours: Callable[[int], int] | None = None,
        **kwargs,
    ) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.neighbours = neighbours
        # SecAgg+ puts the quantized weight factor first.
        self.masked_shapes = [(1,), *shapes] if shapes is not None else None
        self.min_masked = min_masked
        self.fixed_range = fixed_range
        self._planned_quantization_range = self.quantization_range

    def __call__(self, grid, context) -> None:  # type: ignore[no-untyped-def]
        """Flower's protocol; a round that halts after sampling is closed as discarded (the
        strategy records it and checkpoints), not left open."""
        state = WorkflowState()
        steps = (
            self.setup_stage,
            self.share_keys_stage,
            self.collect_masked_vectors_stage,
            self.unmask_stage,
        )
        log(INFO, "Secure aggregation commencing.")
        spent: list[str] = []
        grid = _paced(grid)
        for step in steps:
            start = time.thread_time()
            ok = step(grid, context, state)
            spent.append(f"{step.__name__.removesuffix('_stage')} {time.thread_time() - start:.2f}")
            if not ok or step is steps[-1]:
                # The CPU the workflow's thread spent on each stage (waiting for devices costs
                # none): the coordinator's own cost, read by benchmarks/coordinator.py.
                log(INFO, "SecAgg+ server compute (s): %s", ", ".join(spent))
            if not ok:
                log(INFO, "Secure aggregation halted.")
                if state.nid_to_proxies:  # devices were sampled: nothing is released
                    current_round = context.state.config_records[MAIN_CONFIGS_RECORD][
                        WorkflowKey.CURRENT_ROUND
                    ]
                    context.strategy.aggregate_fit(current_round, [], state.failures)
                return
        log(INFO, "Secure aggregation completed.")

    def setup_stage(self, grid, context, state: WorkflowState) -> bool:  # type: ignore[no-untyped-def]
        """Flower's stage, sized for the cohort actually sampled: the neighbourhoods (when
        derived) and the quantization range (never above the planned one: more nodes than
        planned must not wrap the modulus). A fixed range (``skellam`` mode) stays as it is:
        its bit width was derived for the largest sum the federation can hold."""
        strategy = context.strategy
        configure = strategy.configure_fit
        planned = self._planned_quantization_range

        def sized(*args, **kwargs):  # type: ignore[no-untyped-def]
            chosen = configure(*args, **kwargs)
            cohort = len(chosen)
            if self.neighbours is not None and cohort >= 2:
                shares = self.neighbours(cohort)
                self.num_shares = 1.0 if shares >= cohort else shares
                log(INFO, "SecAgg+: %s devices, %s neighbours each", cohort, min(shares, cohort))
            if not self.fixed_range:
                self.quantization_range = min(planned, quantization_range_for(cohort))
            return chosen

        strategy.configure_fit = sized
        try:
            return super().setup_stage(grid, context, state)
        finally:
            del strategy.configure_fit  # the strategy's own method again

    def unmask_stage(self, grid, context, state: WorkflowState) -> bool:  # type: ignore[no-untyped-def]
        """Flower's stage, only when at least ``min_masked`` masked vectors were collected."""
        masked = len(state.active_node_ids)
        if masked < self.min_masked:
            log(
                WARNING,
                "SecAgg+: %s masked vector(s) < %s (m_min): round aborted before unmasking",
                masked,
                self.min_masked,
            )
            state.failures.append(Exception(f"{masked} masked vectors < {self.min_masked}"))
            return False
        return super().unmask_stage(grid, context, state)

    def collect_masked_vectors_stage(self, grid, context, state: WorkflowState) -> bool:  # type: ignore[no-untyped-def]
        """Flower's stage, behind :class:`_MaskedVectorGate`."""
        if self.masked_shapes is None:
            return super().collect_masked_vectors_stage(grid, context, state)
        gate = _MaskedVectorGate(grid, self.masked_shapes, state.mod_range)
        ok = super().collect_masked_vectors_stage(gate, context, state)
        state.failures.extend(Exception(f"rejected: {r}") for r in gate.rejected)
        return ok

    def share_keys_stage(self, grid, context, state: WorkflowState) -> bool:  # type: ignore[no-untyped-def]
        """Run share-keys, then forget nodes that did not complete setup and share-keys."""
        ok = super().share_keys_stage(grid, context, state)
        dropped = state.sampled_node_ids - state.active_node_ids
        if dropped:
            log(
                WARNING,
                "SecAgg+: %s node(s) lost before masking; continuing without them",
                len(dropped),
            )
        state.sampled_node_ids = set(state.active_node_ids)
        return ok


def secagg_workflow(
    params: SecAggParams,
    *,
    timeout: float,
    min_masked: int,
    evaluate: bool = True,
    shapes: list[tuple[int, ...]] | None = None,
    fixed_range: bool = False,
    neighbours: Callable[[int], int] | None = None,
) -> DefaultWorkflow:
    """Flower's ``DefaultWorkflow`` whose fit rounds run :class:`RobustSecAggPlusWorkflow`
    (``shapes``: what each masked vector must hold; ``min_masked``, ``fixed_range``,
    ``neighbours``: see there). ``params.num_shares`` 0 (derived) needs ``neighbours``.

    Raises:
        ValueError: ``num_shares`` 0 without ``neighbours``.
    """
    if not params.num_shares and neighbours is None:
        raise ValueError("secagg.num-shares = 0 (derived) needs the neighbourhood rule")
    fit = RobustSecAggPlusWorkflow(
        shapes=shapes,
        min_masked=min_masked,
        fixed_range=fixed_range,
        neighbours=neighbours if not params.num_shares else None,
        num_shares=params.num_shares or 1.0,
        reconstruction_threshold=params.reconstruction_threshold,
        max_weight=params.max_weight,
        clipping_range=params.clipping_range,
        quantization_range=params.quantization_range,
        modulus_range=params.modulus_range,
        timeout=timeout,
    )
    if evaluate:
        return DefaultWorkflow(fit_workflow=fit)
    return DefaultWorkflow(fit_workflow=fit, evaluate_workflow=lambda grid, context: None)


class SecAggDPStrategy(RoundSchedule, Strategy):
    """Legacy strategy for the SecAgg+ workflow: mean of participants' updates, DP, records.

    Args:
        options: What both round strategies take (:class:`server.release.RoundOptions`); its
            ``on_round_end`` is called with the run's round after the training phase and
            again after the evaluation.
        shared_names: Shared tensor names, in the order arrays travel.
        initial: Initial global shared tensors (numpy, in ``shared_names`` order).
        min_nodes: Nodes to wait for before sampling.
        ab_scale: Scale of the A/B counts appended to the update (``None``: not appended,
            or, with ``discrete``, appended as integers).
        loss_clip_norm: ``eval.secure-sums``: the clip norm the devices' held-out loss
            entries are scaled by (``common/loss_sums.py``), appended last; ``None``: none.
        discrete: ``skellam`` mode's parameters: devices send their updates as integers
            (:mod:`common.dp.discrete`), which the strategy decodes from the unmasked sum;
            ``None``: devices send real numbers.
        run_id: The run whose rounds seed the rotation (``skellam`` mode).
    """

    assemble_wait = 3600.0  # s for the federation to assemble before round 1
    rejoin_wait = 60.0  # s for lost nodes to come back before a later round

    def __init__(
        self,
        options: RoundOptions,
        *,
        shared_names: list[str],
        initial: list[np.ndarray],
        min_nodes: int,
        ab_scale: float | None = None,
        loss_clip_norm: float | None = None,
        discrete: DiscreteParams | None = None,
        run_id: int | str = "",
    ) -> None:
        super().__init__()
        self.loss_clip_norm = loss_clip_norm
        self.discrete = discrete
        self.run_id = run_id
        self._adopt(options)
        self.fraction_train = options.fraction_train
        self.fraction_evaluate = options.fraction_evaluate
        self._assembled = False
        self.ab_scale = ab_scale
        self.shared_names = shared_names
        self.current = [np.asarray(a, dtype=np.float32) for a in initial]
        self.min_nodes = min_nodes

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """The initial global shared tensors."""
        return ndarrays_to_parameters(self.current)

    def _sample(
        self, client_manager: ClientManager, fraction: float, *, poisson: bool = False
    ) -> list[ClientProxy]:
        """Sample from the nodes online. Before the first round wait (up to an hour) for the
        federation to assemble; later, wait at most ``rejoin_wait`` s for lost nodes to come
        back, then go on with those online (a dead node must not stall the run; the m_min
        check decides whether the round may be released)."""
        timeout = self.rejoin_wait if self._assembled else self.assemble_wait
        self._assembled = client_manager.wait_for(self.min_nodes, timeout=timeout) or (
            self._assembled
        )
        # One look at the nodes, sampled from directly: ClientManager.sample would wait (up to
        # a day) for a node lost between a count and the sampling.
        online = list(client_manager.all().values())
        if poisson:
            return poisson_sample(online, fraction)
        chosen = fixed_sample(online, fraction, minimum=min(2, self.min_nodes))
        if len(chosen) < self.min_nodes:
            log(
                WARNING,
                "%s of %s nodes online: sampling %s",
                len(online),
                self.min_nodes,
                len(chosen),
            )
        return chosen

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Sample clients for a SecAgg+ round (none once the privacy target is reached)."""
        server_round += self.round_offset
        if self._stopping(server_round):
            return []
        config: dict[str, Scalar] = {"server-round": server_round}
        if self.discrete is not None:  # what devices check against their own derivation
            config.update(discrete.offer(self.discrete, self._seed(server_round)))
        fit_ins = FitIns(parameters, config)
        clients = self._sample(
            client_manager, self.fraction_train, poisson=self.sampling == "poisson"
        )
        if self._too_few(server_round, clients):
            clients = []
        self.sampled[server_round] = len(clients)
        return [(c, fit_ins) for c in clients]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Apply the securely aggregated mean update, or discard the round."""
        server_round += self.round_offset
        result = self._aggregate_fit(server_round, results, failures)
        if self.on_round_end is not None:  # checkpoint only a round that was decided
            self.on_round_end(server_round)
        return result

    def _aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        rows = [{k: float(v) for k, v in res.metrics.items()} for _, res in results]
        m = sum(users_in(r) for r in rows)  # users: a simulation node may carry several
        # Stragglers and dropouts: sampled but neither a result nor a reported failure.
        lost = max(0, self.sampled.get(server_round, 0) - len(results) - len(failures))
        mean = parameters_to_ndarrays(results[0][1].parameters) if results else []
        names = self.shared_names
        counts = None
        if self.discrete is not None:
            mean, counts = self._decoded(server_round, mean, results, users=m)
        else:
            mean = self._over_users(mean, results, rows)
        losses = None
        if self.discrete is None and self.loss_clip_norm and len(mean) > len(self.current):
            # The devices' held-out losses rode along last: only the cohort's sums are seen.
            sums = loss_sums.from_masked(mean[-1], users=m, clip_norm=self.loss_clip_norm)
            losses, mean = loss_sums.summarize(sums), mean[:-1]
        if self.discrete is None and self.ab_scale and len(mean) == len(self.current) + 1:
            # The A/B counts rode along, scaled; the mean over the m participants × m × scale
            # is the federation-wide sum (the only thing SecAgg+ reveals).
            counts = ab.from_masked(mean[-1], users=m, ab_scale=self.ab_scale)
            mean = mean[:-1]
        released = self.release.apply(
            server_round,
            dict(zip(names, self.current, strict=True)),
            dict(zip(names, mean, strict=False)) if len(mean) == len(names) else None,
            users=m,
            rows=rows,
            failures=len(failures) + lost,
            ab_counts=counts,
        )
        if losses:
            self.recorder.cohort_losses(server_round, losses)
        if released is None:
            return None, {}
        self.current = [released[n] for n in names]
        return ndarrays_to_parameters(self.current), {}

    @staticmethod
    def _over_users(
        mean: list[np.ndarray],
        results: list[tuple[ClientProxy, FitRes]],
        rows: list[dict[str, float]],
    ) -> list[np.ndarray]:
        """The mean over the updates of users who trained, from Flower's mean over every masked
        vector's weight: a device that declined late sent its noise share alone with weight 1
        (``noise_shares``; ``client/federation/device.py``), which is in the sum and in
        Flower's total weight, but is nobody's update."""
        shares = sum(int(r.get("noise_shares", 0)) for r in rows)
        weight = sum(res.num_examples for _, res in results)
        if not mean or shares <= 0 or weight <= shares:
            return mean
        return [np.asarray(a) * (weight / (weight - shares)) for a in mean]

    def _seed(self, server_round: int) -> int:
        """The rotation's public seed for ``server_round`` of this run."""
        return discrete.round_seed(self.run_id, server_round)

    def _decoded(
        self,
        server_round: int,
        unmasked: list[np.ndarray],
        results: list[tuple[ClientProxy, FitRes]],
        *,
        users: int,
    ) -> tuple[list[np.ndarray], np.ndarray | None]:
        """``skellam`` mode: the mean update over the ``users`` participants (shared tensors
        in order) and the A/B counts, from Flower's weighted mean of the integer vectors.
        Nothing (an empty list) when no device sent a vector."""
        params = self.discrete
        assert params is not None
        weight = sum(res.num_examples for _, res in results)
        finite = all(np.all(np.isfinite(a)) for a in unmasked)
        if not unmasked or weight <= 0 or users <= 0 or not finite:
            return [], None  # nothing to release (the round is discarded)
        total = discrete.unmasked_sum(unmasked[0], weight, params.bits)
        flat = discrete.decode(total, params, self._seed(server_round)) / users
        mean, offset = [], 0
        for arr in self.current:
            mean.append(flat[offset : offset + arr.size].reshape(arr.shape).astype(np.float32))
            offset += arr.size
        counts = None
        if self.ab_scale is not None and len(unmasked) == 2:  # integer counts, summed
            counts = discrete.unmasked_sum(unmasked[1], weight, params.bits).astype(np.float64)
        return mean, counts

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Every sampled device evaluates base / global / personal on its held-out text."""
        server_round += self.round_offset
        if self._evaluation_skipped(server_round):
            # Flower skips the evaluation (and aggregate_evaluate): close the round here.
            self.recorder.evaluated(server_round, [])
            if self.on_round_end is not None:
                self.on_round_end(server_round)
            return []
        self.recorder.start(server_round)
        ins = EvaluateIns(ndarrays_to_parameters(self.current), {"server-round": server_round})
        return [(c, ins) for c in self._sample(client_manager, self.fraction_evaluate)]

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Record the round's per-user losses (a device without a partition by its node)."""
        server_round += self.round_offset
        rows = [
            {
                **{k: float(v) for k, v in res.metrics.items()},
                "node": str(getattr(proxy, "cid", "")),
            }
            for proxy, res in results
        ]
        record = self.recorder.evaluated(server_round, rows)
        if self.on_round_end is not None:
            self.on_round_end(server_round)
        return record.get("personal_loss"), {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """No centralized evaluation: the data lives on the devices."""
        return None
