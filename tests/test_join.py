"""``fedpersona device join`` and ``fedpersona server …`` turned away before anything starts:
one clear line each, a non-zero exit, nothing left running (the whole federation on real
processes is tests/test_federation_commands.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from client.federation.join import JoinPlan, join_lock
from common.keys import make_certs
from simulations.deployment import device_key, processes_mentioning

FEDPERSONA = str(Path(sys.executable).parent / "fedpersona")


def _run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [FEDPERSONA, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "300", **(env or {})},
    )


@pytest.fixture(scope="module")
def device(tmp_path_factory) -> tuple[Path, Path]:
    """An initialised device store and its key file."""
    root = tmp_path_factory.mktemp("dev")
    data_dir = root / "device"
    key = device_key(data_dir)
    done = _run("device", "init", "--data-dir", data_dir, "--key-file", key, "--model", "tiny")
    assert done.returncode == 0, done.stdout + done.stderr
    return data_dir, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    make_certs(out, nodes=0)
    return out


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again once the with ends


def _one_error_line(done: subprocess.CompletedProcess, *needles: str) -> str:
    assert done.returncode == 1, done.stdout + done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "error:" in line]
    assert len(lines) == 1, done.stdout + done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_join_with_nobody_listening_says_it_cannot_reach_the_address(device, certs) -> None:
    data_dir, key = device
    address = f"127.0.0.1:{_closed_port()}"
    done = _run("device", "join", address, "--ca", certs / "ca.crt", "--data-dir", data_dir,
                "--key-file", key)  # fmt: skip
    _one_error_line(done, "cannot reach the federation at", address)
    # The key pair was made (the owner can send it to the operator) and told about, once.
    assert (data_dir / "node.key").stat().st_mode & 0o777 == 0o600
    assert "Send the public key" in done.stdout
    assert (data_dir / "node.key.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert "PRIVATE KEY" not in done.stdout + done.stderr
    assert processes_mentioning(str(data_dir)) == []


def test_join_without_the_ca_file_names_it(device, tmp_path) -> None:
    data_dir, key = device
    missing = tmp_path / "nope" / "ca.crt"
    done = _run("device", "join", "127.0.0.1:9", "--ca", missing, "--data-dir", data_dir,
                "--key-file", key)  # fmt: skip
    _one_error_line(done, "no CA certificate at", str(missing))


def test_join_with_the_wrong_passphrase_stops_before_anything_starts(device, tmp_path) -> None:
    data_dir, _ = device
    wrong = tmp_path / "wrong.key"
    wrong.write_text("x" * 64)
    wrong.chmod(0o600)
    done = _run("device", "join", "127.0.0.1:9", "--ca", tmp_path / "ca.crt", "--data-dir",
                data_dir, "--key-file", wrong)  # fmt: skip
    assert done.returncode == 1
    assert "error:" in done.stdout + done.stderr
    assert processes_mentioning(str(data_dir)) == []


def test_a_second_join_on_one_data_dir_is_refused(device, certs) -> None:
    data_dir, key = device
    with join_lock(data_dir):  # as a running `join` holds it
        done = _run("device", "join", "127.0.0.1:9", "--ca", certs / "ca.crt", "--data-dir",
                    data_dir, "--key-file", key)  # fmt: skip
    _one_error_line(done, "another `fedpersona device join`", f"pid {os.getpid()}")


def test_join_of_a_device_never_initialised_says_what_to_run(certs, tmp_path) -> None:
    done = _run("device", "join", "127.0.0.1:9", "--ca", certs / "ca.crt", "--data-dir",
                tmp_path / "none", "--key-file", tmp_path / "none.key")  # fmt: skip
    _one_error_line(done, "no device store at", "fedpersona device init")


def test_a_malformed_address_is_named(device, certs) -> None:
    data_dir, key = device
    done = _run("device", "join", "fl.example.org", "--ca", certs / "ca.crt", "--data-dir",
                data_dir, "--key-file", key)  # fmt: skip
    _one_error_line(done, "'fl.example.org' is not HOST:PORT")


def test_server_init_refuses_to_overwrite_and_start_refuses_a_port_in_use(tmp_path) -> None:
    # Prepare
    fed = tmp_path / "federation"
    first = _run("server", "init", "--dir", fed, "--host", "fl.example.org")
    assert first.returncode == 0, first.stdout + first.stderr
    ca = (fed / "certs" / "ca.crt").read_bytes()

    # Execute / Assert: a second init changes nothing; a taken port is named.
    _one_error_line(_run("server", "init", "--dir", fed, "--host", "x"), "refusing to overwrite")
    assert (fed / "certs" / "ca.crt").read_bytes() == ca
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _run("server", "start", "--dir", fed, "--port", str(port))
    _one_error_line(done, f"port {port} on 127.0.0.1 is in use")
    assert processes_mentioning(str(fed)) == []


def test_server_commands_on_a_folder_never_initialised_say_what_to_run(tmp_path) -> None:
    for args in (("start",), ("devices", "list"), ("run",)):
        done = _run("server", *args, "--dir", tmp_path / "f")
        _one_error_line(done, "fedpersona server init")


def test_the_plan_keeps_the_node_key_beside_the_store(tmp_path) -> None:
    plan = JoinPlan(address="h:1", ca=tmp_path / "ca.crt", data_dir=tmp_path / "d")
    assert plan.node_key == tmp_path / "d" / "node.key"
    assert plan.node_pub == tmp_path / "d" / "node.key.pub"


def test_the_owner_pauses_and_resumes_from_the_command_line(device) -> None:
    data_dir, key = device
    unlock = ("--data-dir", data_dir, "--key-file", key)

    def federation() -> dict:
        import json

        done = _run("device", "status", "--json", *unlock)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout)["federation"]

    assert _run("device", "federation", "pause", *unlock).returncode == 0
    paused = federation()
    assert paused["paused_since"] is not None and paused["rounds_joined"] == 0
    assert _run("device", "federation", "resume", *unlock).returncode == 0
    assert federation()["paused_since"] is None
