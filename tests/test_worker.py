"""The device worker: the ClientApp forwards training and evaluation to a long-lived process."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, RecordDict

from client import worker
from client.client_app import DeviceError
from client.client_app import evaluate as client_evaluate
from client.client_app import train as client_train
from common.config import parse_run_config
from common.crypto import create_key_file
from common.serialization import to_arrayrecord
from simulations.simulate import PROJECT_DIR
from tests.conftest import (
    device_key,
    device_node_config,
    initial_shared,
    make_context,
    make_message,
    stored_device_state,
    tiny_run_config,
)


def _start_worker(sock: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "common.cli", "device", "worker", "--socket", str(sock)],
        cwd=PROJECT_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 180
    while not (sock.is_socket() and worker.key_path(sock).exists()):
        if proc.poll() is not None:
            raise AssertionError(f"worker exited {proc.returncode}: {proc.stdout.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("worker did not come up in 180 s")
        time.sleep(0.2)
    return proc


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


@pytest.fixture(scope="module")
def sock_dir() -> Iterator[Path]:
    # Unix socket paths are short (104 bytes); pytest's tmp_path can be longer.
    d = Path(tempfile.mkdtemp(prefix="fpw-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def running_worker(sock_dir: Path) -> Iterator[tuple[Path, subprocess.Popen]]:
    sock = sock_dir / "w.sock"
    proc = _start_worker(sock)
    yield sock, proc
    out = _stop(proc)
    assert proc.returncode == 0, out[-2000:]
    assert not sock.exists() and not worker.key_path(sock).exists()  # cleaned up on SIGTERM


def test_worker_answers_like_the_clientapp_process(tmp_path, running_worker) -> None:
    # Prepare: two copies of a device that trained round 1 in-process.
    sock, proc = running_worker
    raw = tiny_run_config()
    cfg = parse_run_config(raw)
    here = tmp_path / "here"
    client_train(
        make_message(to_arrayrecord(initial_shared(cfg)), "train"),
        make_context(raw, device_node_config(here, 0, 4)),
    )
    there = tmp_path / "there"
    shutil.copytree(here, there)
    shutil.copy2(device_key(here), there.with_name("there.key"))  # the same device, copied
    via_worker = make_context(
        raw, {**device_node_config(there, 0, 4), worker.SOCKET_KEY: str(sock)}
    )
    evaluate_msg = make_message(to_arrayrecord(initial_shared(cfg)), "evaluate")

    # Execute
    local = client_evaluate(evaluate_msg, make_context(raw, device_node_config(here, 0, 4)))
    remote = client_evaluate(evaluate_msg, via_worker)
    trained = client_train(
        make_message(to_arrayrecord(initial_shared(cfg)), "train", server_round=2), via_worker
    )

    # Assert: the same evaluation, and the worker's round 2 committed to its device's store.
    assert dict(remote.content["metrics"]) == pytest.approx(dict(local.content["metrics"]))
    shared = initial_shared(cfg)
    assert set(trained.content["arrays"].keys()) == set(shared)
    for name, tensor in shared.items():
        assert trained.content["arrays"][name].numpy().shape == tuple(tensor.shape)
    assert [e["round"] for e in stored_device_state(there)["ledger"]["events"]] == [1, 2]
    assert [e["round"] for e in stored_device_state(here)["ledger"]["events"]] == [1]
    assert proc.poll() is None


def test_worker_rejects_a_bad_message_keeps_the_store_and_serves_on(
    tmp_path, running_worker, caplog
):
    # Prepare
    sock, proc = running_worker
    raw = tiny_run_config()
    cfg = parse_run_config(raw)
    ctx = make_context(
        raw, {**device_node_config(tmp_path / "dev", 0, 4), worker.SOCKET_KEY: str(sock)}
    )
    client_train(make_message(to_arrayrecord(initial_shared(cfg)), "train"), ctx)
    before = stored_device_state(tmp_path / "dev")
    bad = make_message(to_arrayrecord(initial_shared(cfg)), "train", server_round=2)
    bad.content = RecordDict({"arrays": bad.content["arrays"], "config": ConfigRecord({})})

    # Execute
    with pytest.raises(DeviceError, match="rejected-message"):
        client_train(bad, ctx)
    assert re.search("rejecting the server's fitins message.*server-round", caplog.text)

    # Assert: nothing stored, and the worker answers the next (good) message.
    assert stored_device_state(tmp_path / "dev") == before
    client_train(make_message(to_arrayrecord(initial_shared(cfg)), "train", server_round=2), ctx)
    assert [e["round"] for e in stored_device_state(tmp_path / "dev")["ledger"]["events"]] == [1, 2]
    assert proc.poll() is None


def test_wrong_key_is_refused_and_the_worker_serves_on(tmp_path, running_worker, sock_dir):
    sock, proc = running_worker
    impostor = sock_dir / "impostor.sock"
    os.symlink(sock, impostor)
    create_key_file(worker.key_path(impostor))  # a well-formed 0600 key, not the worker's
    raw = tiny_run_config()
    ctx = make_context(raw, device_node_config(tmp_path / "dev", 0, 4))

    with pytest.raises(worker.WorkerUnavailable, match="no device worker answers"):
        worker.forward(str(impostor), "train", RecordDict(), ctx)

    with pytest.raises(ValueError, match="rejecting the server's evaluateins message"):
        worker.forward(str(sock), "evaluate", RecordDict(), ctx)  # answered: it serves on


def test_unknown_kind_and_an_empty_message_are_errors(tmp_path, running_worker) -> None:
    sock, proc = running_worker
    ctx = make_context(tiny_run_config(), device_node_config(tmp_path / "dev", 0, 4))
    with pytest.raises(ValueError, match="unknown message kind"):
        worker.forward(str(sock), "query", RecordDict(), ctx)
    with pytest.raises(ValueError, match="rejecting the server's evaluateins message"):
        worker.forward(str(sock), "evaluate", RecordDict(), ctx)  # no arrays
    assert proc.poll() is None


def test_without_a_worker_the_clientapp_answers_itself(tmp_path, caplog, sock_dir) -> None:
    raw = tiny_run_config()
    cfg = parse_run_config(raw)
    missing = sock_dir / "nobody.sock"
    ctx = make_context(
        raw, {**device_node_config(tmp_path / "dev", 0, 4), worker.SOCKET_KEY: str(missing)}
    )

    with caplog.at_level(logging.WARNING):
        reply = client_train(make_message(to_arrayrecord(initial_shared(cfg)), "train"), ctx)

    assert set(reply.content["arrays"].keys()) == set(initial_shared(cfg))
    assert any(
        "answering the train message in the ClientApp process" in r.getMessage()
        for r in caplog.records
    )
    assert [e["round"] for e in stored_device_state(tmp_path / "dev")["ledger"]["events"]] == [1]


def test_second_worker_on_a_live_socket_is_refused_and_a_stale_one_replaced(
    running_worker, sock_dir
):
    sock, _ = running_worker
    with pytest.raises(RuntimeError, match="already answers"):
        worker.serve(sock, preload=False)

    stale = sock_dir / "stale.sock"
    import socket as socketlib

    s = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on: what a SIGKILLed worker leaves
    proc = _start_worker(stale)
    try:
        assert proc.poll() is None
    finally:
        _stop(proc)
    assert not stale.exists()


def test_socket_path_too_long_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="socket path too long"):
        worker.serve(tmp_path / ("x" * 120) / "w.sock", preload=False)


def test_the_secagg_setup_check_is_asked_of_the_worker(tmp_path, running_worker) -> None:
    # Prepare: two devices whose worker runs; one's owner requires more noise than the round.
    from client.client_app import _setup_refusal
    from tests.conftest import permissive_policy

    sock, _ = running_worker
    raw = tiny_run_config()
    contexts = {}
    for name, floor in (("accepts", 0.0), ("refuses", 100.0)):
        node = device_node_config(
            tmp_path / name, 0, 4, policy=permissive_policy(min_noise_multiplier=floor)
        )
        contexts[name] = make_context(raw, {**node, worker.SOCKET_KEY: str(sock)})

    # Execute
    answers = {name: _setup_refusal(ctx) for name, ctx in contexts.items()}

    # Assert: the worker's answer, and the refusal kept in the refusing device's ledger.
    assert answers["accepts"] is None
    assert "σ >= 100" in answers["refuses"]
    assert (
        "at SecAgg+ setup"
        in stored_device_state(tmp_path / "refuses")["ledger"]["declined"][0]["reason"]
    )
