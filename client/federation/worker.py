"""The device's long-lived worker: torch and the model load once per device, not per message.

Flower 1.42 runs every message in a fresh ``flwr-clientapp`` process, under ``subprocess``
and ``process`` isolation alike: each one would import torch, transformers and peft and load
the base model again (about 12 s on 2 CPU cores before any work). The worker is the
long-lived half of the ClientApp. It runs beside the SuperNode::

    fedpersona device worker --socket /run/fedpersona/worker.sock --data-dir /var/lib/fedpersona

and the SuperNode names it in its node config (``worker-socket="…"``, nothing else). The
ClientApp (:mod:`client.client_app`, Flower only) then relays every message here: training
and evaluation, which :mod:`client.federation.handlers` answers with the model already in memory
(:func:`client.federation.runtime.get_runtime` caches it per process), and the SecAgg+ protocol
stages.

The worker belongs to **one device** and is the only process that unlocks it: it is started
with the device's store (``--data-dir``, ``--key-file`` or ``$FEDPERSONA_PASSPHRASE``) and
serves that store whatever a ClientApp says. The ClientApp runs from the app bundle the server
sends each run, so it gets the socket and nothing else — no passphrase, no key file, no store
— and store settings in the node config it forwards are ignored. The worker also runs the
device's side of SecAgg+ (:func:`client.federation.secagg_stage.checked_secaggplus`: the privacy
policy's checks, the protocol's keys, the masking), so the update leaves the worker masked.

The channel is a Unix socket, so nothing listens on the network. The worker writes a random
key next to it (``<socket>.key``, mode 0600) and answers only a peer that proves knowledge of
it (``multiprocessing.connection``'s HMAC handshake); messages travel as Flower's own protobuf
record encoding and JSON, never pickle. One message at a time, in arrival order: the device's
store is opened by one request at a time, as in a ClientApp process.

(One file on purpose, over the usual length: the socket server, its handshake and the message relay
are one protocol, whose other end is client/client_app.py.)
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import queue
import signal
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from multiprocessing.connection import (
    AuthenticationError,
    Client,
    Connection,
    Listener,
    answer_challenge,
    deliver_challenge,
)
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, Metadata, RecordDict
from flwr.app.message import make_message
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from client.federation import secagg_stage
from client.federation.errors import DeviceError, WorkerUnavailable, error_code
from common.crypto import StoreKeyError, create_key_file, read_key_file

logger = logging.getLogger(__name__)

SOCKET_KEY = "worker-socket"  # the node-config key naming the worker's socket
KINDS = ("train", "evaluate")
PROTOCOL = 1
MAX_HEADER_BYTES = 1 << 20
MAX_CONTENT_BYTES = 1 << 31
# A connection must prove the key within HANDSHAKE_SECONDS and start its request within
# REQUEST_SECONDS of that, or it is closed; at most MAX_PENDING connections may wait so at
# once (more are closed at once). An idle peer never holds up the requests behind it.
HANDSHAKE_SECONDS = 5.0
REQUEST_SECONDS = 30.0
MAX_PENDING = 8
_UNIX_PATH_MAX = 104  # the shortest sun_path limit among Linux (108) and macOS (104)


PING = "ping"  # a health probe: the worker answers it without touching any device state
SECAGG = "secagg"  # a SecAgg+ stage message: the worker runs the device's side of the protocol
# What a device's worker is told at its start and a ClientApp cannot change: its store. A
# worker for a device takes nothing else from the node config a ClientApp sends either: a
# forwarded ``partition-id`` would make it plant the audit's canaries, a ``num-partitions``
# would size its noise share (``--num-partitions`` is the owner's, given to the worker).
STORE_KEYS = ("data-dir", "key-file", "retention-days", "local-only-baseline")
_SECAGG_RUNS = 8  # SecAgg+ protocol states kept (one per run in progress)


def key_path(socket_path: str | Path) -> Path:
    """Where the worker keeps the key a ClientApp needs to talk to it."""
    return Path(f"{socket_path}.key")


def forward(
    socket_path: str,
    kind: str,
    content: RecordDict,
    context: Context,
    *,
    metadata: Metadata | None = None,
) -> RecordDict:
    """Have the device's worker answer a ``train``/``evaluate``/``secagg`` message (the last
    with the message's ``metadata``); return its reply.

    Raises:
        WorkerUnavailable: Nothing answers at ``socket_path`` (the message then fails with
            the code ``worker-unavailable``: the ClientApp holds no store to answer it with).
        DeviceError: The worker refused or failed on the message: its code (the reason is in
            the worker's log; this process may be the server's code).
        RuntimeError: The worker died while answering.
    """
    if kind not in (*KINDS, PING, SECAGG):
        raise ValueError(f"unknown message kind {kind!r}; expected one of {(*KINDS, SECAGG)}")
    try:
        key = read_key_file(key_path(socket_path))
    except (OSError, StoreKeyError) as err:
        raise WorkerUnavailable(
            f"no usable worker key at {key_path(socket_path)} ({err}); is "
            f"`fedpersona device worker --socket {socket_path}` running?"
        ) from None
    try:
        conn = Client(socket_path, family="AF_UNIX", authkey=key)
    except (OSError, AuthenticationError, EOFError) as err:
        raise WorkerUnavailable(f"no device worker answers at {socket_path} ({err})") from None
    header = {
        "protocol": PROTOCOL,
        "kind": kind,
        "run_id": context.run_id,
        "node_id": context.node_id,
        "node_config": dict(context.node_config),
        "run_config": dict(context.run_config),
        "metadata": _metadata_fields(metadata) if metadata is not None else None,
    }
    with conn:
        try:
            conn.send_bytes(json.dumps(header).encode())
            conn.send_bytes(recorddict_to_proto(content).SerializeToString())
            status = json.loads(conn.recv_bytes(MAX_HEADER_BYTES))
            if status.get("ok"):
                return recorddict_from_proto(
                    ProtoRecordDict.FromString(conn.recv_bytes(MAX_CONTENT_BYTES))
                )
        except (EOFError, OSError) as err:
            raise RuntimeError(
                f"the device worker at {socket_path} dropped the {kind} message ({err!r}); "
                "its store keeps the last committed round"
            ) from None
    raise DeviceError(str(status.get("code", "internal")))


def _metadata_fields(metadata: Metadata) -> dict[str, Any]:
    """A message's metadata as JSON (its constructor's arguments)."""
    names = [p for p in inspect.signature(Metadata.__init__).parameters if p != "self"]
    return {name: getattr(metadata, name) for name in names}


def ping(socket_path: str | Path) -> bool:
    """Whether a worker answers at ``socket_path`` (a container health check)."""
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    try:
        forward(str(socket_path), PING, RecordDict(), context)
    except (WorkerUnavailable, RuntimeError, ValueError):
        return False
    return True


def serve(
    socket_path: str | Path, *, preload: bool = True, device: Mapping[str, Any] | None = None
) -> None:
    """Answer ClientApp messages on ``socket_path`` until SIGTERM/SIGINT.

    Args:
        socket_path: The Unix socket (the SuperNode's ``worker-socket``).
        preload: Import torch, transformers and peft before the first message.
        device: The device's own settings (:data:`STORE_KEYS`, and optionally
            ``num-partitions``) — its store, which this worker alone unlocks. ``None`` serves
            simulated devices only (a message naming a store is refused).

    Raises:
        ValueError: The socket path is too long for a Unix socket.
        RuntimeError: Another worker already answers on it.
    """
    path = Path(socket_path).absolute()
    if len(os.fsencode(path)) >= _UNIX_PATH_MAX:
        raise ValueError(f"socket path too long for a Unix socket ({len(str(path))} bytes): {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    _claim(path)
    key_path(path).unlink(missing_ok=True)  # a dead worker's: this one gets a fresh key
    key = read_key_file(create_key_file(key_path(path)))
    if preload:  # torch, transformers and peft, once; the model loads with the first message
        import client.federation.handlers  # noqa: F401

    def _stop(signum: int, _frame: Any) -> None:
        raise SystemExit(0)

    secagg_states: OrderedDict[tuple[int, int], RecordDict] = OrderedDict()
    previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        old_umask = os.umask(0o177)  # the socket is born 0600: only this user may connect
        try:
            listener = Listener(str(path), family="AF_UNIX", authkey=key)
        finally:
            os.umask(old_umask)
        with listener:
            logger.info("device worker (pid %d) ready on %s", os.getpid(), path)
            ready: queue.Queue[Connection] = queue.Queue()
            gate = _Handshakes(key, ready)
            threading.Thread(
                target=gate.accept_forever, args=(listener,), name="worker-accept", daemon=True
            ).start()
            while True:  # one request at a time, in the order their handshakes completed
                try:
                    conn = ready.get(timeout=1.0)  # wakes to let SIGTERM stop the worker
                except queue.Empty:
                    continue
                with conn:
                    _answer(conn, device, secagg_states)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for p in (path, key_path(path)):
            p.unlink(missing_ok=True)
        logger.info("device worker on %s stopped", path)


class _Handshakes:
    """Accepts connections and runs each one's HMAC handshake on its own thread, under a
    deadline (:data:`HANDSHAKE_SECONDS`: a peer that stays silent is closed; an authenticated
    one must start its request within :data:`REQUEST_SECONDS`) and a bound (:data:`MAX_PENDING`
    connections waiting at once); connections with a request waiting go to ``ready``."""

    def __init__(self, key: bytes, ready: queue.Queue[Connection]) -> None:
        self.key = key
        self.ready = ready
        self.pending = threading.BoundedSemaphore(MAX_PENDING)

    def accept_forever(self, listener: Listener) -> None:
        # ``Listener.accept`` would run the handshake here, blocking on a silent peer: take the
        # raw connection from its socket listener and authenticate it on a thread instead.
        raw = listener._listener  # type: ignore[attr-defined]
        while True:
            try:
                conn = raw.accept()
            except OSError:  # the listener was closed: the worker is stopping
                return
            if not self.pending.acquire(blocking=False):
                logger.warning("refused a connection: %d handshakes already pending", MAX_PENDING)
                conn.close()
                continue
            threading.Thread(target=self._handshake, args=(conn,), daemon=True).start()

    def _handshake(self, conn: Connection) -> None:
        timer = threading.Timer(HANDSHAKE_SECONDS, _shut_down, args=(conn,))
        timer.start()
        try:
            try:
                deliver_challenge(conn, self.key)
                answer_challenge(conn, self.key)
            finally:
                timer.cancel()
            if not conn.poll(REQUEST_SECONDS):  # authenticated, but sends nothing
                raise TimeoutError(f"no request within {REQUEST_SECONDS:.0f} s")
        except AuthenticationError as err:
            logger.warning("refused a connection: %s", err)
            conn.close()
            return
        except (EOFError, OSError, ValueError) as err:  # left, timed out or closed mid-way
            logger.warning("closed a connection before its request: %s", err)
            conn.close()
            return
        finally:
            self.pending.release()
        self.ready.put(conn)


def _shut_down(conn: Connection) -> None:
    """End ``conn``'s socket both ways: a read blocked on it (another thread's) returns EOF."""
    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()


def _answer(
    conn: Connection,
    device: Mapping[str, Any] | None,
    secagg_states: OrderedDict[tuple[int, int], RecordDict],
) -> None:
    """Read one request, run it, send the reply; a bad request gets an error reply."""
    start = time.perf_counter()
    try:
        header = json.loads(conn.recv_bytes(MAX_HEADER_BYTES))
        content = recorddict_from_proto(
            ProtoRecordDict.FromString(conn.recv_bytes(MAX_CONTENT_BYTES))
        )
    except Exception as err:  # a peer with the key that sends garbage: refuse, keep serving
        logger.error("unreadable request: %s: %s", type(err).__name__, err)
        _send(conn, {"ok": False, "code": "rejected-message"})
        return
    # The ClientApp is the server's code: it gets a code; the reason stays in this log.
    try:
        reply = _run(header, content, device, secagg_states)
    except DeviceError as err:  # a refusal by the device's policy (logged where it was made)
        _send(conn, {"ok": False, "code": err.code})
        return
    except (ValueError, KeyError, TypeError) as err:
        logger.error("%s message rejected: %s: %s", header.get("kind"), type(err).__name__, err)
        _send(conn, {"ok": False, "code": error_code(err)})
        return
    except Exception as err:  # noqa: BLE001 - reported to the ClientApp, the worker lives on
        logger.exception("%s message failed", header.get("kind"))
        _send(conn, {"ok": False, "code": error_code(err)})
        return
    if _send(conn, {"ok": True}):
        _send_bytes(conn, recorddict_to_proto(reply).SerializeToString())
    if header.get("kind") != PING:
        logger.info(
            "run %s: %s answered in %.2f s",
            header.get("run_id"),
            header.get("kind"),
            time.perf_counter() - start,
        )


def _node_config(sent: Mapping[str, Any], device: Mapping[str, Any] | None) -> dict[str, Any]:
    """The node config a message runs under: the worker's device and nothing the ClientApp
    sends (:data:`STORE_KEYS`); a worker without a device (a simulation's) takes the sent one.

    Raises:
        ValueError: A worker without a device got a message naming a store.
    """
    if device is None:
        named = [k for k in STORE_KEYS if k in sent]
        if named:
            raise ValueError(
                f"the message's node config names a store ({', '.join(named)}), but this worker "
                "was started without one: a device's store is given to its worker "
                "(`fedpersona device worker --data-dir …`), not named by the ClientApp"
            )
        return dict(sent)
    return dict(device)


def _run(
    header: dict[str, Any],
    content: RecordDict,
    device: Mapping[str, Any] | None,
    secagg_states: OrderedDict[tuple[int, int], RecordDict],
) -> RecordDict:
    from client.federation import handlers

    if header.get("protocol") != PROTOCOL:
        raise ValueError(f"protocol {header.get('protocol')!r}, this worker speaks {PROTOCOL}")
    kind = header.get("kind")
    if kind == PING:
        return RecordDict()
    run_id, node_id = int(header["run_id"]), int(header["node_id"])
    context = Context(
        run_id=run_id,
        node_id=node_id,
        node_config=_node_config(dict(header["node_config"]), device),
        state=RecordDict(),
        run_config=dict(header["run_config"]),
    )
    if kind == SECAGG:
        return _secagg(header, content, context, secagg_states)
    return handlers.answer(kind, content, context)


def _secagg(
    header: dict[str, Any],
    content: RecordDict,
    context: Context,
    states: OrderedDict[tuple[int, int], RecordDict],
) -> RecordDict:
    """One SecAgg+ stage of the device's side of the protocol, its state kept per run here."""
    from client.federation import handlers

    fields = header.get("metadata")
    if not isinstance(fields, dict):
        raise ValueError("a SecAgg+ message needs its metadata")
    msg = make_message(Metadata(**fields), content)
    key = (context.run_id, context.node_id)
    context.state = states.pop(key, None) or RecordDict()
    states[key] = context.state  # the newest last; the oldest runs' states are dropped
    while len(states) > _SECAGG_RUNS:
        states.popitem(last=False)

    def train(m: Message, ctxt: Context) -> Message:
        return Message(content=handlers.answer("train", m.content, ctxt), reply_to=m)

    return secagg_stage.checked_secaggplus(msg, context, train).content


def _send(conn: Connection, status: dict[str, Any]) -> bool:
    return _send_bytes(conn, json.dumps(status).encode())


def _send_bytes(conn: Connection, data: bytes) -> bool:
    try:
        conn.send_bytes(data)
        return True
    except OSError as err:  # the ClientApp went away (its message timed out): nothing to do
        logger.warning("the ClientApp left before the reply: %s", err)
        return False


def _claim(path: Path) -> None:
    """Take ``path`` for a new socket: refuse a live worker, remove a stale socket file."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_socket():
        raise RuntimeError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # stale: its worker died without cleaning up
        return
    finally:
        probe.close()
    raise RuntimeError(f"another device worker already answers on {path}")
