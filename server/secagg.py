"""The SecAgg+ path: Flower's legacy ``DefaultWorkflow`` + ``SecAggPlusWorkflow``, with the
two flwr 1.42 problems fixed and DP done by fedpersona rather than the stock wrappers.

* :class:`RobustSecAggPlusWorkflow` — a client lost during setup or share-keys no longer breaks
  the round: after share-keys only the nodes that completed it count as sampled (nobody holds
  masks with the others).
* :class:`SecAggDPStrategy` — devices send their clipped (and, in ``distributed`` mode, noised)
  update with weight 1 (0 when they declined), so SecAgg+ yields the mean update of the
  participants. A round with fewer than m_min participants, or a non-finite sum, is discarded
  and the previous model kept (the stock DP wrapper instead drops every round on any failure).
  In ``central`` mode the server adds N(0, (σC)²)/m after unmasking.
"""

from __future__ import annotations

import secrets
from logging import INFO, WARNING

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

from common.secagg import SecAggParams
from server.recorder import RoundRecorder


class RobustSecAggPlusWorkflow(SecAggPlusWorkflow):
    """``SecAggPlusWorkflow`` that survives a client lost before the masked vectors."""

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
    params: SecAggParams, *, timeout: float, evaluate: bool = True
) -> DefaultWorkflow:
    """Flower's ``DefaultWorkflow`` whose fit rounds run :class:`RobustSecAggPlusWorkflow`."""
    fit = RobustSecAggPlusWorkflow(
        num_shares=params.num_shares,
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


class SecAggDPStrategy(Strategy):
    """Legacy strategy for the SecAgg+ workflow: mean of participants' updates, DP, records.

    Args:
        shared_names: Shared tensor names, in the order arrays travel.
        initial: Initial global shared tensors (numpy, in ``shared_names`` order).
        recorder: Run bookkeeping (with the federation accountant, if any).
        min_updates: m_min.
        fraction_train: Share of available nodes sampled per round.
        fraction_evaluate: Share of available nodes evaluated per round.
        min_nodes: Nodes to wait for before sampling.
        central_noise_std: σC in central mode, else 0.
        target_epsilon: Stop before the federation ε would pass this (0 = none).
    """

    def __init__(
        self,
        *,
        shared_names: list[str],
        initial: list[np.ndarray],
        recorder: RoundRecorder,
        min_updates: int,
        fraction_train: float,
        fraction_evaluate: float,
        min_nodes: int,
        central_noise_std: float = 0.0,
        target_epsilon: float = 0.0,
        ab_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.ab_scale = ab_scale
        self.shared_names = shared_names
        self.current = [np.asarray(a, dtype=np.float32) for a in initial]
        self.recorder = recorder
        self.min_updates = min_updates
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_nodes = min_nodes
        self.central_noise_std = central_noise_std
        self.target_epsilon = target_epsilon
        self.stopped_at: int | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """The initial global shared tensors."""
        return ndarrays_to_parameters(self.current)

    def _sample(self, client_manager: ClientManager, fraction: float) -> list[ClientProxy]:
        client_manager.wait_for(self.min_nodes, timeout=3600)
        n = max(int(client_manager.num_available() * fraction), min(2, self.min_nodes))
        return client_manager.sample(num_clients=n, min_num_clients=self.min_nodes)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Sample clients for a SecAgg+ round (none once the privacy target is reached)."""
        self.recorder.start(server_round)
        acc = self.recorder.accountant
        if self.stopped_at is not None or (
            acc is not None and acc.next_round_exceeds(self.target_epsilon)
        ):
            self.stopped_at = self.stopped_at or server_round
            log(WARNING, "privacy.target-epsilon reached: no training in round %s", server_round)
            return []
        fit_ins = FitIns(parameters, {"server-round": server_round})
        return [(c, fit_ins) for c in self._sample(client_manager, self.fraction_train)]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Apply the securely aggregated mean update, or discard the round."""
        rows = [{k: float(v) for k, v in res.metrics.items()} for _, res in results]
        m = sum(1 for r in rows if not r.get("declined"))
        mean = parameters_to_ndarrays(results[0][1].parameters) if results else []
        ab_mean = None
        if self.ab_scale and len(mean) == len(self.current) + 1:
            # The A/B counts rode along, scaled; the mean over the m participants × m × scale
            # is the federation-wide sum (the only thing SecAgg+ reveals).
            ab_mean, mean = mean[-1], mean[:-1]
        problem = ""
        if m < self.min_updates:
            problem = f"{m} updates < m_min {self.min_updates}"
        elif len(mean) != len(self.current) or any(
            a.shape != b.shape for a, b in zip(mean, self.current, strict=False)
        ):
            problem = "aggregate has the wrong shapes"
        elif not all(np.isfinite(a).all() for a in mean):
            problem = "aggregate is not finite"
        if problem:
            log(
                WARNING, "round %s discarded: %s; keeping the previous model", server_round, problem
            )
            self.recorder.trained(
                server_round,
                rows,
                failures=len(failures),
                released=False,
                note=f"discarded: {problem}",
            )
            return None, {}
        if self.central_noise_std > 0:
            rng = np.random.default_rng(secrets.randbits(128))
            std = self.central_noise_std / m
            mean = [a + rng.normal(0.0, std, size=a.shape) for a in mean]
            log(INFO, "central DP: added N(0, %.3g²) to the mean update", std)
        self.current = [(c + u).astype(np.float32) for c, u in zip(self.current, mean, strict=True)]
        if ab_mean is not None and self.ab_scale and np.isfinite(ab_mean).all():
            self.recorder.ab(server_round, np.asarray(ab_mean, np.float64) * m * self.ab_scale)
        if self.recorder.accountant is not None:
            self.recorder.accountant.release()
        self.recorder.trained(server_round, rows, failures=len(failures), released=True)
        return ndarrays_to_parameters(self.current), {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Every sampled device evaluates base / global / personal on its held-out text."""
        self.recorder.start(server_round)
        ins = EvaluateIns(ndarrays_to_parameters(self.current), {"server-round": server_round})
        return [(c, ins) for c in self._sample(client_manager, self.fraction_evaluate)]

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Record the round's per-user losses."""
        rows = [{k: float(v) for k, v in res.metrics.items()} for _, res in results]
        record = self.recorder.evaluated(server_round, rows)
        return record.get("personal_loss"), {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """No centralized evaluation: the data lives on the devices."""
        return None
