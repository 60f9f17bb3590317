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


def test_device_key_prints_the_public_key_and_keeps_the_private_one(tmp_path) -> None:
    # Execute: twice on a folder with no store (a SuperNode's own, in a container)
    first = _run("device", "key", "--data-dir", tmp_path / "node")
    again = _run("device", "key", "--data-dir", tmp_path / "node")

    # Assert: the same public key, alone on stdout; the private key 0600, never printed.
    assert first.returncode == again.returncode == 0, first.stdout + first.stderr
    assert first.stdout == again.stdout
    assert first.stdout.startswith("ecdsa-sha2-nistp384 ") and len(first.stdout.splitlines()) == 1
    assert (tmp_path / "node" / "node.key").stat().st_mode & 0o777 == 0o600
    assert "PRIVATE KEY" not in first.stdout + first.stderr


def test_each_part_checks_only_what_it_uses(device, certs, tmp_path) -> None:
    data_dir, key = device
    join = ("device", "join", "127.0.0.1:9")
    _one_error_line(
        _run(*join, "--data-dir", data_dir, "--key-file", key, "--part", "bogus"),
        "choose one of worker, supernode, clientapp-executor",
    )
    _one_error_line(_run(*join, "--data-dir", data_dir, "--key-file", key), "--ca is needed")
    # The worker opens the store and needs no CA (it has no network).
    _one_error_line(
        _run(*join, "--part", "worker", "--data-dir", tmp_path / "none", "--key-file", key),
        "no device store at",
    )
    # The SuperNode needs no store: its key and the server.
    node = tmp_path / "node"
    address = f"127.0.0.1:{_closed_port()}"
    done = _run("device", "join", address, "--part", "supernode", "--ca", certs / "ca.crt",
                "--data-dir", node)  # fmt: skip
    _one_error_line(done, "cannot reach the federation at", address)
    assert (node / "node.key.pub").is_file() and (node / "join-supernode.log").is_file()
    assert not (node / "join.log").exists()


def test_the_worker_part_serves_its_socket_in_the_shared_folder_until_stopped(
    device, tmp_path
) -> None:
    import json
    import signal
    import time

    from client.federation.worker import ping

    # Prepare
    data_dir, key = device
    run_dir = tmp_path / "run"
    sock = run_dir / "worker.sock"

    # Execute: the worker alone, as the compose file's worker container runs it
    proc = subprocess.Popen(
        [FEDPERSONA, "device", "join", "127.0.0.1:9", "--part", "worker", "--data-dir",
         str(data_dir), "--key-file", str(key), "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not ping(sock) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        served = ping(sock)
        state = json.loads((data_dir / "federation.json").read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)

    # Assert: its socket answered in the shared folder; the state names the part and its one
    # process; SIGTERM stopped it cleanly and took the socket away, the folder stays.
    assert served, out
    assert state["part"] == "worker" and list(state["processes"]) == ["worker"]
    assert proc.returncode == 0, out
    assert run_dir.is_dir() and not sock.exists()
    assert processes_mentioning(str(run_dir)) == []


def test_connected_means_running_and_a_recent_answer_from_the_server(tmp_path) -> None:
    import json
    import time

    from client.federation.join import PROBE_S, read_state

    def state(server: dict | None) -> dict:
        alive = {"pid": os.getpid()}  # this test's process: alive
        (tmp_path / "federation.json").write_text(
            json.dumps({"pid": os.getpid(), "processes": {"worker": alive}, "server": server})
        )
        return read_state(tmp_path)

    now = time.time()
    assert state({"reachable": True, "checked_at": now, "error": None})["connected"] is True
    stale = {"reachable": True, "checked_at": now - 4 * PROBE_S, "error": None}
    assert state(stale)["connected"] is False
    down = {"reachable": False, "checked_at": now, "error": "cannot reach"}
    assert state(down)["connected"] is False
    assert state(None)["connected"] is None  # not checked here (a worker-only part)
