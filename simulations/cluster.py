"""Where a simulation's ClientApps run: this machine's own Ray, or a Ray cluster the user
already has.

``fedpersona simulate --ray-address ADDRESS`` (or ``$RAY_ADDRESS``, as every Ray program reads
it) hands the address to Flower's simulation process, whose ``ray.init()`` then joins that
cluster instead of starting one; the ServerApp stays on this machine, each node's ClientApps
run wherever Ray places them. What each ClientApp asks of Ray comes from the run config
(``simulation.client-cpus|gpus|memory-mb|resources``, :class:`ClientResources`).

Before anything starts, :func:`probe` checks every node that could host a ClientApp (it has
the resources a ClientApp asks for): that it runs the same fedpersona (the same code, by a
hash of its modules) and the same pinned packages as this machine, and that it sees the run
directory (the simulated devices' encrypted stores live there, and a user's next round may
run on another node: the directory must be on a filesystem every node mounts at the same
path). A node that fails names itself and why; an address nothing answers on fails within
:data:`PROBE_TIMEOUT_S`. The probe runs in its own process, so no Ray connection outlives it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import RunConfig, parse_resources

RAY_ADDRESS_ENV = "RAY_ADDRESS"
# What the simulation process's Ray backend reads (simulations/engine.py).
RESOURCES_ENV = "FEDPERSONA_CLIENT_RESOURCES"
PLACEMENT_ENV = "FEDPERSONA_ENGINE_PLACEMENT"
# Where the engine records which Ray node ran how many ClientApp calls (in the run dir).
PLACEMENT_FILE = "engine-nodes.json"
PROBE_TIMEOUT_S = 120.0
# The packages whose versions every node must share with this one.
PINNED = ("flwr", "ray", "torch", "transformers", "peft", "numpy")
# The project's own packages, hashed into its fingerprint.
PROJECT_PACKAGES = ("client", "common", "server", "simulations")


class ClusterError(RuntimeError):
    """A Ray cluster that cannot run this simulation (the message says which node and why)."""


@dataclass(frozen=True)
class ClientResources:
    """What one simulated node's ClientApp asks of Ray."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_mb: int = 0
    custom: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, cfg: RunConfig) -> ClientResources:
        """The run config's ``simulation.client-*`` keys."""
        return cls(
            cpus=cfg.client_cpus,
            gpus=cfg.client_gpus,
            memory_mb=cfg.client_memory_mb,
            custom=parse_resources(cfg.client_resources),
        )

    def ray_options(self) -> dict[str, Any]:
        """Keyword arguments of Ray's ``ActorClass.options``."""
        out: dict[str, Any] = {"num_cpus": self.cpus, "num_gpus": self.gpus}
        if self.memory_mb:
            out["memory"] = self.memory_mb * 2**20
        if self.custom:
            out["resources"] = dict(self.custom)
        return out

    def to_json(self) -> str:
        return json.dumps(
            {
                "cpus": self.cpus,
                "gpus": self.gpus,
                "memory_mb": self.memory_mb,
                "custom": self.custom,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ClientResources:
        data = json.loads(text)
        return cls(
            cpus=float(data["cpus"]),
            gpus=float(data["gpus"]),
            memory_mb=int(data["memory_mb"]),
            custom={str(k): float(v) for k, v in data["custom"].items()},
        )

    def fits(self, node_resources: dict[str, float]) -> int:
        """How many such ClientApps a node with ``node_resources`` (Ray's totals: ``CPU``,
        ``GPU``, ``memory`` in bytes, custom names) holds at once."""
        asks = {"CPU": self.cpus, "GPU": self.gpus, **self.custom}
        if self.memory_mb:
            asks["memory"] = float(self.memory_mb * 2**20)
        counts = [
            int(node_resources.get(name, 0.0) / amount + 1e-9)
            for name, amount in asks.items()
            if amount > 0
        ]
        return min(counts) if counts else 0

    def describe(self) -> str:
        parts = [f"{self.cpus:g} CPU"]
        if self.gpus:
            parts.append(f"{self.gpus:g} GPU")
        if self.memory_mb:
            parts.append(f"{self.memory_mb} MiB")
        parts += [f"{k}={v:g}" for k, v in sorted(self.custom.items())]
        return ", ".join(parts)


def resolve_address(flag: str | None, environ: dict[str, str] | None = None) -> str | None:
    """The Ray cluster to run on: ``--ray-address``, else ``$RAY_ADDRESS``; ``None`` (or
    ``"local"``): a Ray of the simulation's own on this machine."""
    environ = os.environ if environ is None else environ
    address = (flag or environ.get(RAY_ADDRESS_ENV) or "").strip()
    return None if address in ("", "local") else address


def code_fingerprint() -> str:
    """A hash of the project's modules as this interpreter imports them (their paths
    relative to the package and their bytes): equal on two nodes that run the same code."""
    digest = hashlib.sha256()
    for package in PROJECT_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(f"No module named {package!r}")
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{package}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def node_facts(run_dir: str, marker: str) -> dict[str, Any]:
    """What a node reports of itself (run on that node): where it is, its fedpersona and
    pinned packages, and whether it sees ``run_dir`` (``marker``, written there by the
    driver) and can write to it."""
    facts: dict[str, Any] = {"host": socket.gethostname(), "python": sys.version.split()[0]}
    try:
        facts["fedpersona"] = code_fingerprint()
        importlib.import_module("client.client_app")
    except Exception as err:  # noqa: BLE001 — any failure to import is what we report
        facts["fedpersona_error"] = f"{type(err).__name__}: {err}"
    facts["packages"] = {}
    for name in PINNED:
        try:
            facts["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            facts["packages"][name] = None
    path = Path(run_dir)
    facts["sees_run_dir"] = (path / marker).is_file()
    try:
        probe = path / f".probe-{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
        facts["writes_run_dir"] = True
    except OSError:
        facts["writes_run_dir"] = False
    return facts


def problems(nodes: list[dict[str, Any]], here: dict[str, Any]) -> list[str]:
    """What keeps each node from running this simulation's ClientApps, one line a node."""
    out = []
    for node in nodes:
        name = f"Ray node {node['node_id'][:12]} ({node.get('ip', '?')})"
        facts = node.get("facts")
        if facts is None:
            out.append(f"{name} did not answer the probe: {node.get('error', 'no reply')}")
            continue
        why = []
        if "fedpersona_error" in facts:
            why.append(f"cannot import fedpersona's ClientApp ({facts['fedpersona_error']})")
        elif facts.get("fedpersona") != here["fedpersona"]:
            why.append(
                f"runs other fedpersona code (fingerprint {facts.get('fedpersona')} here "
                f"{here['fedpersona']})"
            )
        for pkg, version in here["packages"].items():
            if facts["packages"].get(pkg) != version:
                why.append(f"has {pkg} {facts['packages'].get(pkg)} (here {version})")
        if not facts["sees_run_dir"] or not facts["writes_run_dir"]:
            why.append("does not see and write the run directory (it must be shared)")
        if why:
            out.append(f"{name}: " + "; ".join(why))
    return out


def probe(
    address: str, run_dir: Path, resources: ClientResources, *, timeout: float = PROBE_TIMEOUT_S
) -> list[dict[str, Any]]:
    """Check the cluster at ``address`` for this run (see the module's doc) and return the
    nodes that can host its ClientApps, with what each reported.

    Raises:
        ClusterError: Nothing answers at ``address`` within ``timeout``, no node has the
            resources a ClientApp asks for, or a node that has them cannot run it.
    """
    _check_reachable(address)
    marker = f".cluster-probe-{uuid.uuid4().hex}"
    (run_dir / marker).write_text("fedpersona")
    cmd = [sys.executable, "-m", "simulations.cluster", address, str(run_dir), marker]
    env = {**os.environ, RESOURCES_ENV: resources.to_json(), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop(RAY_ADDRESS_ENV, None)
    try:
        # From the run dir, not the checkout: Ray hands a driver's sys.path to the job's
        # workers, and `python -m` puts its working directory there.
        done = subprocess.run(
            cmd,
            env=env,
            cwd=run_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        raise ClusterError(
            f"the Ray cluster at {address} did not answer within {timeout:.0f} s "
            "(is `ray start --head` running there, and is the address host:port of its GCS?)"
        ) from None
    finally:
        (run_dir / marker).unlink(missing_ok=True)
    lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ClusterError(f"cannot use the Ray cluster at {address}: {' | '.join(tail)}")
    report = json.loads(lines[-1])
    if report.get("error"):
        raise ClusterError(f"the Ray cluster at {address}: {report['error']}")
    bad = problems(report["nodes"], node_facts(str(run_dir), marker="-"))
    if bad:
        raise ClusterError(
            f"the Ray cluster at {address} cannot run this simulation:\n  "
            + "\n  ".join(bad)
            + "\nInstall the same fedpersona wheel and pinned packages on every node and "
            "share the run directory (docs/cluster.md)."
        )
    return report["nodes"]


def engine_environment(
    env: dict[str, str], run_dir: Path, address: str | None, resources: ClientResources
) -> dict[str, str]:
    """What the simulation process needs beyond Flower's: fedpersona's ``flwr-simulation``
    first on ``PATH`` (:mod:`simulations.engine`), the ClientApps' resources, where to record
    their placement, and the Ray cluster to join (none: it starts its own)."""
    bin_dir = Path(env["FLWR_HOME"]) / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "flwr-simulation"
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m simulations.engine "$@"\n')
    shim.chmod(0o755)
    out = {
        "PATH": os.pathsep.join([str(bin_dir), env["PATH"]]),
        RESOURCES_ENV: resources.to_json(),
        PLACEMENT_ENV: str(run_dir / PLACEMENT_FILE),
    }
    if address is not None:
        out[RAY_ADDRESS_ENV] = address
    else:
        env.pop(RAY_ADDRESS_ENV, None)
    return out


def record_placement(
    run_dir: Path, address: str | None, on_line: Callable[[str], None] | None
) -> None:
    """Where the ClientApps ran (``engine-nodes.json``), into ``summary.json``'s ``ray``."""
    path = run_dir / PLACEMENT_FILE
    if not path.exists():
        return
    placement = {"address": address or "local", **json.loads(path.read_text())}
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["ray"] = placement
    summary_path.write_text(json.dumps(summary, indent=1))
    if on_line:
        nodes = placement["nodes"]
        on_line(
            f"fedpersona: ClientApps ran on {len(nodes)} Ray node(s): "
            + ", ".join(
                f"{node[:8]} ({row['ip']}) {row['calls']} calls" for node, row in nodes.items()
            )
            + (f"; {placement['lost_actors']} actor(s) lost" if placement["lost_actors"] else "")
        )


def describe_cluster(address: str, nodes: list[dict[str, Any]], resources: ClientResources) -> str:
    """One line on what :func:`probe` found."""
    return (
        f"Ray cluster at {address}: {len(nodes)} node(s) can host ClientApps "
        f"({resources.describe()} each), {sum(n['fits'] for n in nodes)} at once"
    )


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail at once when nothing accepts connections at a ``host:port`` address (Ray itself
    retries for minutes); other forms (``auto``, ``ray://…``) are left to Ray.

    Raises:
        ClusterError: Nothing listens there.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "/" in host:
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return
    except OSError as err:
        raise ClusterError(
            f"nothing answers at the Ray address {address} ({err.strerror or err}): start the "
            "cluster's head there (`ray start --head --port PORT`) or fix --ray-address / "
            f"${RAY_ADDRESS_ENV}"
        ) from None


def _probe_cluster(address: str, run_dir: str, marker: str) -> dict[str, Any]:
    """The probe's own process: join the cluster, run :func:`node_facts` on every alive node
    that can host a ClientApp (pinned to it), leave."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    resources = ClientResources.from_json(os.environ[RESOURCES_ENV])
    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        hosts = [n for n in alive if resources.fits(n.get("Resources", {}))]
        if not hosts:
            return {
                "error": f"none of its {len(alive)} node(s) has what a ClientApp asks for "
                f"({resources.describe()}; simulation.client-*)"
            }
        remote = ray.remote(num_cpus=0)(node_facts)
        pending = {
            n["NodeID"]: remote.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(run_dir, marker)
            for n in hosts
        }
        nodes = []
        for node in hosts:
            row = {"node_id": node["NodeID"], "ip": node.get("NodeManagerAddress"), "fits": 0}
            row["fits"] = resources.fits(node.get("Resources", {}))
            try:
                row["facts"] = ray.get(pending[node["NodeID"]], timeout=60)
            except Exception as err:  # noqa: BLE001 — a node that fails is reported, by name
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            nodes.append(row)
        return {"nodes": nodes}
    finally:
        ray.shutdown()


if __name__ == "__main__":
    print(json.dumps(_probe_cluster(*sys.argv[1:4])), flush=True)
