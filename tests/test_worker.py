"""The device worker: one device's long-lived process, the only one that unlocks its store.

The ClientApp (the server's code) gets the worker's socket and nothing else; training,
evaluation and the device's side of SecAgg+ run in the worker.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.connection import Client
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, RecordDict

from client.client_app import DeviceError
from client.client_app import evaluate as client_evaluate
from client.client_app import train as client_train
from client.federation import worker
from common.config import parse_run_config
from common.crypto import create_key_file, read_key_file
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


def _start_worker(sock: Path, data_dir: Path | None = None) -> subprocess.Popen:
    """``fedpersona device worker`` for the device in ``data_dir`` (default: a fresh one
    beside the socket), once its socket answers."""
    if data_dir is None:
        data_dir = sock.with_suffix(".dev")
        device_node_config(data_dir, 0, 4)
    cmd = [sys.executable, "-m", "simulations.cli", "device", "worker", "--socket", str(sock)]
    cmd += ["--data-dir", str(data_dir), "--key-file", str(device_key(data_dir))]
    proc = subprocess.Popen(
        cmd, cwd=PROJECT_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
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
    """A worker for a device of its own (``<sock_dir>/w.dev``)."""
    sock = sock_dir / "w.sock"
    proc = _start_worker(sock)
    yield sock, proc
    out = _stop(proc)
    assert proc.returncode == 0, out[-2000:]
    assert not sock.exists() and not worker.key_path(sock).exists()  # cleaned up on SIGTERM


def _relay(sock: Path, partition: int = 0, partitions: int = 4) -> dict:
    """What a device's SuperNode gives its ClientApps: the worker's socket (and labels)."""
    return {worker.SOCKET_KEY: str(sock), "partition-id": partition, "num-partitions": partitions}


def test_worker_answers_like_the_clientapp_process(tmp_path, sock_dir) -> None:
    # Prepare: two copies of a device that trained round 1 in-process; a worker for one.
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
    sock = sock_dir / "copy.sock"
    proc = _start_worker(sock, there)
    evaluate_msg = make_message(to_arrayrecord(initial_shared(cfg)), "evaluate")

    # Execute: the ClientApp names no store, only the worker; a second store it names is
    # ignored (the worker serves its own device).
    try:
        local = client_evaluate(evaluate_msg, make_context(raw, device_node_config(here, 0, 4)))
        remote = client_evaluate(evaluate_msg, make_context(raw, _relay(sock)))
        named = {**_relay(sock), "data-dir": str(tmp_path / "elsewhere"), "key-file": "/nope"}
        trained = client_train(
            make_message(to_arrayrecord(initial_shared(cfg)), "train", server_round=2),
            make_context(raw, named),
        )
    finally:
        _stop(proc)

    # Assert: the same evaluation, and the worker's round 2 committed to its device's store;
    # the partition id the ClientApp forwarded is nobody's label on a real device.
    labels = {"partition_id", "rounds_trained"}
    here_metrics = {k: v for k, v in local.content["metrics"].items() if k not in labels}
    assert dict(remote.content["metrics"]) == pytest.approx(here_metrics)
    shared = initial_shared(cfg)
    assert set(trained.content["arrays"].keys()) == set(shared)
    for name, tensor in shared.items():
        assert trained.content["arrays"][name].numpy().shape == tuple(tensor.shape)
    assert [e["round"] for e in stored_device_state(there)["ledger"]["events"]] == [1, 2]
    assert [e["round"] for e in stored_device_state(here)["ledger"]["events"]] == [1]
    assert not (tmp_path / "elsewhere").exists()


def test_worker_rejects_a_bad_message_keeps_the_store_and_serves_on(tmp_path, sock_dir):
    # Prepare
    raw = tiny_run_config()
    cfg = parse_run_config(raw)
    sock, data_dir = sock_dir / "bad.sock", tmp_path / "dev"
    device_node_config(data_dir, 0, 4)
    proc = _start_worker(sock, data_dir)
    ctx = make_context(raw, _relay(sock))
    bad = make_message(to_arrayrecord(initial_shared(cfg)), "train", server_round=2)
    bad.content = RecordDict({"arrays": bad.content["arrays"], "config": ConfigRecord({})})

    # Execute
    try:
        client_train(make_message(to_arrayrecord(initial_shared(cfg)), "train"), ctx)
        before = stored_device_state(data_dir)
        with pytest.raises(DeviceError, match="rejected-message") as refused:
            client_train(bad, ctx)
        after_bad = stored_device_state(data_dir)
        good = make_message(to_arrayrecord(initial_shared(cfg)), "train", server_round=2)
        client_train(good, ctx)
        assert proc.poll() is None
    finally:
        log = _stop(proc)

    # Assert: the ClientApp got a code, the reason is in the worker's log only; nothing was
    # stored for the bad message; the worker answered the next (good) one.
    assert "server-round" not in str(refused.value)
    assert re.search("rejecting the server's fitins message.*server-round", log)
    assert after_bad == before
    assert [e["round"] for e in stored_device_state(data_dir)["ledger"]["events"]] == [1, 2]


def test_wrong_key_is_refused_and_the_worker_serves_on(tmp_path, running_worker, sock_dir):
    sock, proc = running_worker
    impostor = sock_dir / "impostor.sock"
    os.symlink(sock, impostor)
    create_key_file(worker.key_path(impostor))  # a well-formed 0600 key, not the worker's
    ctx = make_context(tiny_run_config(), _relay(sock))

    with pytest.raises(worker.WorkerUnavailable, match="no device worker answers"):
        worker.forward(str(impostor), "train", RecordDict(), ctx)

    with pytest.raises(DeviceError, match="rejected-message"):
        worker.forward(str(sock), "evaluate", RecordDict(), ctx)  # answered: it serves on


def _connect(sock: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(sock))
    return s


def _closed_by_peer(s: socket.socket) -> bool:
    """Whether the worker ended ``s`` (after its challenge, if it sent one) within 10 s."""
    s.settimeout(10)
    try:
        while s.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    finally:
        s.close()


def test_idle_connections_do_not_stall_the_worker(running_worker) -> None:
    # Prepare: a silent peer (no handshake) and an authenticated one that sends no request.
    sock, proc = running_worker
    idle = _connect(sock)
    silent = Client(str(sock), family="AF_UNIX", authkey=read_key_file(worker.key_path(sock)))

    # Execute: a health probe from a third client while both hang.
    start = time.monotonic()
    alive = worker.ping(sock)
    waited = time.monotonic() - start

    # Assert: answered at once, not behind them; both are closed by their deadlines.
    assert alive and waited < worker.HANDSHAKE_SECONDS, waited
    assert _closed_by_peer(idle)
    assert silent.poll(worker.REQUEST_SECONDS + 10)  # EOF: the worker closed it
    with pytest.raises(EOFError):
        silent.recv_bytes()
    silent.close()

    # A flood of silent connections beyond the bound: the extra ones are refused at once,
    # the rest dropped at the handshake deadline, and then the worker answers again.
    flood = [_connect(sock) for _ in range(worker.MAX_PENDING + 4)]
    assert all(_closed_by_peer(s) for s in flood)
    assert proc.poll() is None and worker.ping(sock)


def test_unknown_kind_and_an_empty_message_are_errors(running_worker) -> None:
    sock, proc = running_worker
    ctx = make_context(tiny_run_config(), _relay(sock))
    with pytest.raises(ValueError, match="unknown message kind"):
        worker.forward(str(sock), "query", RecordDict(), ctx)
    with pytest.raises(DeviceError, match="rejected-message"):
        worker.forward(str(sock), "evaluate", RecordDict(), ctx)  # no arrays
    assert proc.poll() is None


def test_a_device_whose_worker_is_down_answers_with_a_code_only(tmp_path, sock_dir) -> None:
    # The ClientApp holds no store to fall back on: the message fails, nothing else happens.
    raw = tiny_run_config()
    cfg = parse_run_config(raw)
    ctx = make_context(raw, _relay(sock_dir / "nobody.sock"))

    with pytest.raises(DeviceError, match="worker-unavailable") as failed:
        client_train(make_message(to_arrayrecord(initial_shared(cfg)), "train"), ctx)
    assert "nobody.sock" not in str(failed.value)


def test_a_worker_without_a_device_refuses_a_store_named_by_the_clientapp() -> None:
    with pytest.raises(ValueError, match="started without one"):
        worker._node_config({"data-dir": "/somewhere", "key-file": "/k"}, None)
    # A worker for a device takes nothing the ClientApp sends: no store, no partition label
    # (it would plant the audit's canaries), no federation size (it sizes the noise share).
    sent = {"partition-id": 3, "num-partitions": 10**6, "data-dir": "/x"}
    assert worker._node_config(sent, {"data-dir": "/mine"}) == {"data-dir": "/mine"}


def test_a_worker_that_cannot_unlock_its_store_does_not_start(tmp_path, sock_dir) -> None:
    data_dir = tmp_path / "dev"
    device_node_config(data_dir, 0, 4)
    wrong = tmp_path / "wrong.key"
    create_key_file(wrong)
    sock = sock_dir / "locked.sock"
    done = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "device", "worker", "--socket", str(sock),
         "--data-dir", str(data_dir), "--key-file", str(wrong), "--no-preload"],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1 and "error" in done.stdout.lower()
    assert not sock.exists()


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


def test_a_secagg_round_runs_in_the_workers_and_the_clientapps_relay_masked_vectors(
    tmp_path, sock_dir
) -> None:
    # Prepare: two real devices, each with its worker; their ClientApps know only the
    # sockets. Distributed noise sized for m_min = 2, which their owners accept.
    from tests.conftest import permissive_policy
    from tests.flower_harness import secagg_device_round

    raw = tiny_run_config(**{"data.num-users": 2, "train.local-steps": 1, "dp.clip-norm": 0.01})
    procs, nodes = [], {}
    for nid in (1, 2):
        data_dir = tmp_path / f"d{nid}"
        device_node_config(
            data_dir, nid - 1, 2, policy=permissive_policy(require_secagg=True, min_cohort=2)
        )
        sock = sock_dir / f"sa{nid}.sock"
        procs.append(_start_worker(sock, data_dir))
        nodes[nid] = _relay(sock, nid - 1, 2)

    # Execute
    try:
        grid, strategy = secagg_device_round(raw, nodes, min_updates=2)
    finally:
        logs = [_stop(p) for p in procs]

    # Assert: released; each worker trained and charged its own device; what left each
    # ClientApp at the masked-vector stage is the masked vector and nothing in the clear.
    assert strategy.recorder._train[1]["released"] is True, logs
    for nid in (1, 2):
        assert len(stored_device_state(tmp_path / f"d{nid}")["ledger"]["events"]) == 1
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    for nid, stage, reply in grid.received:
        assert not reply.has_error(), (nid, stage, reply.error)
        if stage == "collect_masked_vectors":
            assert all(len(r) == 0 for r in reply.content.array_records.values())
            assert Key.MASKED_PARAMETERS in reply.content.config_records[RECORD_KEY_CONFIGS]
    assert all(ctx.state.config_records == {} for ctx in grid.contexts.values())
