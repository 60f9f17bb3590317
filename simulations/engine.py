"""fedpersona's ``flwr-simulation``: Flower's own simulation process, with a Ray backend that
knows where its ClientApps run.

``fedpersona simulate`` puts a ``flwr-simulation`` first on the SuperLink's ``PATH`` that runs
this module; it installs :class:`PlacedRayBackend` in place of Flower's ``RayBackend`` and hands
over to Flower's ``flwr_simulation``. The backend differs from Flower's where a cluster needs it:

* each ClientApp asks Ray for what the run config says (``simulation.client-*``: CPUs, GPUs,
  memory, custom resources — Flower's federation config carries whole CPUs and GPUs only),
  and the pool holds as many as the cluster's nodes fit, counted per node on all of them;
* an actor Ray cannot place within :data:`PLACEMENT_WAIT_S` is dropped with a warning instead
  of left pending (a call on it would wait forever);
* an actor lost with its node fails only the call it was running — the round counts that
  device as dropped, as SecAgg+ does any dropout — and is replaced where the cluster still
  has room, instead of being handed the next calls (Flower's pool puts it back);
* its dispatch loop hands every node its next message in one pass over the stored messages
  per sweep (:func:`add_messages_to_queue`), where Flower's scans them all once per node —
  the cost that grew worst with the cohort (docs/cluster.md);
* every call is counted against the Ray node that ran it, in ``engine-nodes.json`` in the run
  directory (``$FEDPERSONA_ENGINE_PLACEMENT``), which ``fedpersona simulate`` adds to the
  summary.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
from collections import Counter
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import ray
from flwr.common.constant import PARTITION_ID_KEY
from flwr.server.superlink.fleet.vce.backend import raybackend
from flwr.simulation.ray_transport.ray_actor import VirtualClientEngineActor
from flwr.supercore import log

from simulations.cluster import PLACEMENT_ENV, RESOURCES_ENV, ClientResources

# Flower's own dispatch loop, for a LinkState add_messages_to_queue cannot read.
vce_api_original: Any = None
# How long Ray may take to place a new ClientApp actor (start its worker process, import).
PLACEMENT_WAIT_S = 120.0
# How long a call waits for a free actor before it fails (every actor busy or lost).
TAKE_WAIT_S = 600.0


@ray.remote
class PlacedClientAppActor(VirtualClientEngineActor):
    """Flower's ClientApp actor, which can say which Ray node it runs on."""

    def where(self) -> str:
        """This actor's Ray node id."""
        return ray.get_runtime_context().get_node_id()


class PlacedActorPool:
    """ClientApp actors, each placed on a known node; idle ones wait in a queue."""

    def __init__(self, resources: ClientResources) -> None:
        self.resources = resources
        self.options = resources.ray_options()
        self.node_of: dict[Any, tuple[str, str]] = {}
        self.calls: Counter[str] = Counter()
        self.ips: dict[str, str] = {}  # every node an actor ran on, lost ones included
        self.lost = 0
        self._idle: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        alive = [n for n in ray.nodes() if n.get("Alive")]
        capacity = sum(resources.fits(n.get("Resources", {})) for n in alive)
        if capacity == 0:
            raise ValueError(
                f"no Ray node has what a ClientApp asks for ({resources.describe()}; "
                f"simulation.client-*): {len(alive)} node(s) alive"
            )
        for actor in self._place(capacity):
            self._idle.put(actor)
        if not self.node_of:
            raise ValueError(f"Ray placed none of {capacity} ClientApp actors")
        log(INFO, "fedpersona: %s ClientApp actors on %s Ray node(s)", self.size, self._nodes())

    @property
    def size(self) -> int:
        return len(self.node_of)

    def _nodes(self) -> int:
        return len({node for node, _ in self.node_of.values()})

    def _place(self, count: int) -> list[Any]:
        """Start ``count`` actors; keep those Ray placed within :data:`PLACEMENT_WAIT_S`."""
        actors = [PlacedClientAppActor.options(**self.options).remote() for _ in range(count)]
        refs = {actor.where.remote(): actor for actor in actors}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=PLACEMENT_WAIT_S)
        ips = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes()}
        placed = []
        for ref in ready:
            try:
                node = ray.get(ref)
            except ray.exceptions.RayError as err:
                log(WARNING, "fedpersona: a ClientApp actor failed to start: %s", err)
                continue
            with self._lock:
                self.node_of[refs[ref]] = (node, ips.get(node, "?"))
                self.ips[node] = ips.get(node, "?")
            placed.append(refs[ref])
        for ref in pending:
            ray.kill(refs[ref])
        if pending:
            log(WARNING, "fedpersona: Ray could not place %s ClientApp actor(s)", len(pending))
        return placed

    def take(self) -> Any:
        """An idle actor (waits while all are busy).

        Raises:
            RuntimeError: No actor is left, or none came free within :data:`TAKE_WAIT_S`.
        """
        if not self.node_of:
            raise RuntimeError("no Ray node is left to run ClientApps")
        try:
            return self._idle.get(timeout=TAKE_WAIT_S)
        except queue.Empty:
            raise RuntimeError(f"no ClientApp actor came free in {TAKE_WAIT_S:.0f} s") from None

    def give(self, actor: Any, *, ran: bool) -> None:
        """Return ``actor`` to the idle queue (``ran``: count the call it completed)."""
        if ran:
            with self._lock:
                self.calls[self.node_of[actor][0]] += 1
        self._idle.put(actor)

    def drop(self, actor: Any) -> None:
        """Forget an actor that died (its node left); where the cluster still has room for
        one more, start a replacement in the background (the calls go on meanwhile)."""
        with self._lock:
            node = self.node_of.pop(actor, None)
            self.lost += 1
        log(WARNING, "fedpersona: ClientApp actor on Ray node %s lost", node and node[0][:12])
        alive = [n for n in ray.nodes() if n.get("Alive")]
        if sum(self.resources.fits(n.get("Resources", {})) for n in alive) > self.size:
            threading.Thread(target=self._replace, daemon=True).start()

    def _replace(self) -> None:
        for actor in self._place(1):
            self._idle.put(actor)

    def placement(self) -> dict[str, Any]:
        """Per Ray node: its IP, the actors on it, the calls they completed."""
        with self._lock:
            nodes: dict[str, dict[str, Any]] = {}
            for node, ip in self.node_of.values():
                row = nodes.setdefault(node, {"ip": ip, "actors": 0, "calls": 0})
                row["actors"] += 1
            for node, calls in self.calls.items():
                row = nodes.setdefault(node, {"ip": self.ips.get(node), "actors": 0, "calls": 0})
                row["calls"] = calls
            return {"nodes": nodes, "lost_actors": self.lost}

    def terminate(self) -> None:
        for actor in list(self.node_of):
            actor.terminate.remote()


# What a call fails with when its actor is gone (its node left; actors are not restarted).
_LOST = (
    ray.exceptions.RayActorError,
    ray.exceptions.ActorUnavailableError,
    ray.exceptions.NodeDiedError,
)


class PlacedRayBackend(raybackend.RayBackend):
    """Flower's ``RayBackend`` on a :class:`PlacedActorPool` (see the module's doc)."""

    def __init__(self, backend_config: dict[str, Any]) -> None:
        text = os.environ.get(RESOURCES_ENV)
        self.resources = ClientResources.from_json(text) if text else None
        self.placement_path = os.environ.get(PLACEMENT_ENV)
        self.placed: PlacedActorPool | None = None
        super().__init__(backend_config)

    def _validate_client_resources(self, config: dict[str, Any]) -> dict[str, Any]:
        if self.resources is None:
            found = super()._validate_client_resources(config)
            self.resources = ClientResources(
                cpus=float(found.get("num_cpus", 1)), gpus=float(found.get("num_gpus", 0))
            )
        return self.resources.ray_options()

    def build(self, app_fn) -> None:  # type: ignore[no-untyped-def]
        self.placed = PlacedActorPool(self.resources or ClientResources())
        self.app_fn = app_fn
        self._record()

    @property
    def num_workers(self) -> int:
        return self.placed.size if self.placed else 0

    def is_worker_idle(self) -> bool:
        return bool(self.placed and not self.placed._idle.empty())

    def process_message(self, message, context):  # type: ignore[no-untyped-def]
        """Run the ClientApp on an idle actor; a lost actor fails this call only."""
        if self.placed is None or self.app_fn is None:
            raise ValueError("the backend is not built")
        pid = str(context.node_config[PARTITION_ID_KEY])
        actor = self.placed.take()
        try:
            _, out, updated = ray.get(actor.run.remote(self.app_fn, message, pid, context))
        except _LOST:
            self.placed.drop(actor)
            self._record()
            raise
        except BaseException:
            self.placed.give(actor, ran=False)
            raise
        self.placed.give(actor, ran=True)
        self._record()
        return out, updated

    def _record(self) -> None:
        """Write the pool's placement to ``$FEDPERSONA_ENGINE_PLACEMENT`` (atomically)."""
        if not self.placement_path or self.placed is None:
            return
        path = Path(self.placement_path)
        tmp = path.with_name(f".{path.name}.{threading.get_ident()}")
        try:
            tmp.write_text(json.dumps(self.placed.placement()))
            os.replace(tmp, path)
        except OSError as err:
            log(WARNING, "fedpersona: placement not written to %s: %s", path, err)

    def terminate(self) -> None:
        if self.placed is not None:
            self._record()
            self.placed.terminate()


def add_messages_to_queue(state, queue, nodes_mapping, f_stop) -> None:  # type: ignore[no-untyped-def]
    """Flower's dispatch loop (``vce_api.add_messages_to_queue``: every 0.1 s, hand each
    node its next undelivered message), in one pass over the stored messages per sweep.

    Flower's asks the LinkState once per node, and each ask scans and re-validates every
    stored message: n nodes × the cohort's messages per sweep, for as long as a round lasts —
    at 100 devices most of the simulation process's CPU, and cubic in the cohort over a
    round. Here one sweep validates each stored message once and delivers at most one per
    node, as Flower's does (a node's context is never in two workers at once). A LinkState
    other than Flower's in-memory one goes through Flower's loop.
    """
    from flwr.supercore.date import now

    store = getattr(state, "message_ins_store", None)
    if store is None or not hasattr(state, "_check_stored_messages"):
        vce_api_original(state, queue, nodes_mapping, f_stop)
        return
    while not f_stop.is_set():
        ready: dict[int, Any] = {}
        with state.lock:
            ids = list(store)
            state._check_stored_messages(set(ids))  # drops expired and foreign messages
            for msg_id in ids:
                message = store.get(msg_id)
                if message is None or message.metadata.delivered_at != "":
                    continue
                node = message.metadata.dst_node_id
                if node in nodes_mapping and node not in ready:
                    ready[node] = message
            delivered_at = now().isoformat()
            for message in ready.values():
                message.metadata.delivered_at = delivered_at
        for message in ready.values():
            queue.put(message)
        f_stop.wait(0.1)


def main() -> None:
    """``flwr-simulation`` with :class:`PlacedRayBackend` in place of Flower's, and
    :func:`add_messages_to_queue` in place of its dispatch loop."""
    global vce_api_original
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.simulation.app import flwr_simulation

    raybackend.RayBackend = PlacedRayBackend  # what Flower's start_vce instantiates
    vce_api_original = vce_api.add_messages_to_queue
    vce_api.add_messages_to_queue = add_messages_to_queue  # what its run_api starts
    sys.argv[0] = "flwr-simulation"  # Flower names its exit event after it
    flwr_simulation()


if __name__ == "__main__":
    main()
