"""An in-process Flower ``Grid`` that delivers messages to a real ``ClientApp``.

Server workflows (Flower's own ``DefaultWorkflow`` / ``SecAggPlusWorkflow`` and fedpersona's
strategies) run unchanged against it; it can lose a chosen node at a chosen SecAgg+ stage or
message type, as a crashed device would: no reply arrives.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid(Grid):
    """Deliver each message to ``app`` with that node's persistent ``Context``.

    Args:
        app: The ClientApp every node runs.
        node_configs: ``node_id -> node_config``.
        run_config: The run config every node sees.
        drop: ``stage or message type -> node ids`` that never answer it.
    """

    def __init__(
        self,
        app: ClientApp,
        node_configs: dict[int, dict[str, Any]],
        run_config: dict[str, Any] | None = None,
        drop: dict[str, set[int]] | None = None,
    ) -> None:
        self.app = app
        self.contexts = {
            nid: Context(
                run_id=1,
                node_id=nid,
                node_config=cfg,
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for nid, cfg in node_configs.items()
        }
        self.drop = drop or {}
        self.delivered: list[tuple[int, str]] = []
        self.sent: list[Message] = []  # every message as the server sent it
        # What the server received: (node, stage or message type, reply).
        self.received: list[tuple[int, str, Message]] = []
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    # Grid API -----------------------------------------------------------------------
    def set_run(self, run):  # type: ignore[no-untyped-def]  # noqa: D102
        pass

    @property
    def run(self):  # type: ignore[no-untyped-def]  # noqa: D102
        return SimpleNamespace(run_id=1)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]  # noqa: D102
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Run the ClientApp for each message; lost nodes simply do not answer."""
        replies = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            stage = msg.metadata.message_type
            if RECORD_KEY_CONFIGS in msg.content.config_records:
                stage = str(msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, stage))
            self.delivered.append((nid, stage))
            self.sent.append(copy.deepcopy(msg))
            if nid in self.drop.get(stage, set()):
                continue
            TaskIdentity.node_id = nid
            # A real transport serializes each message: no two nodes share one content object
            # (secaggplus_mod pops keys from what it receives).
            msg = copy.deepcopy(msg)
            try:
                reply = self.app(msg, self.contexts[nid])
            except Exception as err:  # noqa: BLE001 - a crashing client is an error reply
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            finally:
                TaskIdentity.node_id = 0
            replies.append(reply)
            self.received.append((nid, stage, reply))
        return replies


def secagg_device_round(
    raw: dict[str, Any],
    nodes: dict[int, dict[str, Any]],
    *,
    min_updates: int,
    threshold: float = 0.67,  # secagg.reconstruction-threshold's default
    drop: dict[str, set[int]] | None = None,
    min_masked: int | None = None,
    params_override: dict[str, Any] | None = None,
    offer_override: dict[str, Any] | None = None,
    server_run_id: int = 1,
) -> tuple[InProcessGrid, Any]:
    """One SecAgg+ round of fedpersona's real ClientApp on ``nodes`` (run config ``raw``),
    through Flower's workflow as the ServerApp builds it: quantization derived for all the
    nodes, noise shares sized by ``dp.min-clients`` (else all of them), and a strategy that
    releases at least ``min_updates`` and unmasks a sum of at least ``min_masked`` (default
    ``min_updates``). ``params_override`` replaces SecAgg+ parameters (a server that bends
    them). In ``skellam`` mode the server derives the integer encoding as the ServerApp does;
    ``offer_override`` replaces fields of it and ``server_run_id`` seeds its rotation (a server
    that publishes other parameters than the devices derive). Returns the grid (what was
    delivered and received) and the strategy (its recorder, its current model)."""
    from dataclasses import replace

    import numpy as np
    from flwr.server import LegacyContext, ServerConfig

    from client.client_app import app as fedpersona_app
    from client.federation.runtime import get_runtime
    from common import ab, loss_sums
    from common.config import parse_run_config
    from common.dp.privatize import Privatize
    from common.secagg import derive_secagg_params
    from server.recorder import RoundRecorder
    from server.release import RoundOptions
    from server.secagg import SecAggDPStrategy, secagg_workflow

    cfg = parse_run_config(raw)
    rt = get_runtime(cfg)
    n = len(nodes)
    grid = InProcessGrid(fedpersona_app, nodes, run_config=raw, drop=drop)
    privatize = Privatize.of(cfg, n)
    dim = sum(int(np.prod(rt.shapes[name])) for name in rt.shared_names)
    coded = privatize.discrete_params(dim) if privatize.discrete else None
    params = derive_secagg_params(
        privatize,
        num_clients=n,
        num_params=dim + (0 if coded else ab.FIELDS + len(loss_sums.FIELDS)),
        num_shares=1.0,
        reconstruction_threshold=threshold,
    )
    params = replace(params, **(params_override or {}))
    strategy = SecAggDPStrategy(
        RoundOptions(recorder=RoundRecorder(None), min_updates=min_updates),
        shared_names=rt.shared_names,
        initial=[rt.init[name].numpy() for name in rt.shared_names],
        min_nodes=n,
        ab_scale=ab.scale(cfg.ab.interactions, cfg.dp.clip_norm),
        loss_clip_norm=cfg.dp.clip_norm if cfg.eval.secure_sums else None,
        discrete=replace(coded, **(offer_override or {})) if coded else None,
        run_id=server_run_id,
    )
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    masked = min_updates if min_masked is None else min_masked
    workflow = secagg_workflow(
        params, timeout=30, min_masked=masked, evaluate=False, fixed_range=coded is not None
    )
    workflow(grid, LegacyContext(context=ctx, config=ServerConfig(num_rounds=1), strategy=strategy))
    return grid, strategy
