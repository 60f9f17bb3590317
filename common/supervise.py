"""Several processes run as one service: started in order, restarted when they die, stopped
together.

``fedpersona device join`` (the device worker, the SuperNode and its ClientApp executor) and
``fedpersona server start`` (the SuperLink and its ServerApp executor) each run a
:class:`Supervisor`:

* children start in order, each after the one before it is **ready** (its probe answers);
* a child that exits is restarted with exponential back-off (``BACKOFF_S``, doubling up to
  ``MAX_BACKOFF_S``; back to the first step once it has run ``STABLE_S``), each exit and
  restart logged;
* a child whose exit its :attr:`Child.diagnose` explains (an unregistered key, a wrong CA) is
  not restarted: the service stops and says what to fix, in one line;
* :meth:`Supervisor.stop` (SIGTERM/Ctrl-C in the commands) stops the children in reverse order
  — SIGTERM to each one's process group, SIGKILL after ``STOP_TIMEOUT_S`` — and runs each
  one's clean-up (a socket, a key file).

Every child's output goes, line by line and prefixed with its name, to the one log the
supervisor writes (its ``logger``, :func:`service_logger`). The small probes the services
need — a free port, an open port, a live pid — are here too (:func:`free_port`,
:func:`port_open`, :func:`pid_alive`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
STABLE_S = 60.0
STOP_TIMEOUT_S = 10.0
# How many of a child's last output lines :attr:`Child.diagnose` sees.
TAIL_LINES = 200


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts connections on ``host:port`` (a readiness probe; a bind-all
    address is probed on loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def pid_alive(pid: object) -> bool:
    """Whether ``pid`` (read from a state file: anything) names a running process."""
    if type(pid) is not int or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def service_logger(name: str, path: Path) -> logging.Logger:
    """The service's one log: everything into ``path``; restarts and failures also on the
    terminal."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    shown = logging.StreamHandler()
    shown.setLevel(logging.WARNING)
    shown.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(shown)
    return logger


class ServiceFailed(RuntimeError):
    """A child cannot run: it never became ready, or its exit says why (the message)."""


@dataclass
class Child:
    """One process of a service.

    Attributes:
        name: Its name in the log.
        argv: The command.
        env: Its environment (default: the supervisor's).
        ready: Probe that answers ``True`` once the child serves (default: it is running).
        ready_timeout_s: How long a start may take to become ready.
        prepare: Called before every start; returns extra ``Popen`` arguments (e.g. a fresh
            pipe for a secret: ``{"pass_fds": (fd,)}``; ``env``: variables added to the
            child's environment) and may set up files.
        cleanup: Called after every exit and at stop (e.g. remove a socket).
        diagnose: Given the exit code and the child's last output lines, the reason it can
            never run (the service stops with it) or ``None`` (restart it).
    """

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] | None = None
    ready: Callable[[], bool] | None = None
    ready_timeout_s: float = 300.0
    prepare: Callable[[], dict[str, Any]] | None = None
    cleanup: Callable[[], None] | None = None
    diagnose: Callable[[int, list[str]], str | None] | None = None
    # Run state.
    proc: subprocess.Popen | None = field(default=None, repr=False)
    started: float = 0.0
    restarts: int = 0
    backoff: float = 0.0  # the next restart's wait (0: the first step)
    restart_at: float | None = None
    tail: list[str] = field(default_factory=list, repr=False)


class Supervisor:
    """Run ``children`` as one service (see the module docstring).

    Args:
        children: In start order.
        logger: Where every event and every child's output goes.
        on_change: Called with :meth:`state` after every start, exit and stop (the device's
            status file).
        backoff_s: The first restart's wait (doubling up to ``max_backoff_s``).
        stable_s: A child that ran this long restarts after ``backoff_s`` again.
        tick: ``(interval_s, fn)``: ``fn`` is called every ``interval_s`` while the service
            runs (a probe; what it raises is logged, never stops the service).
    """

    def __init__(
        self,
        children: Sequence[Child],
        *,
        logger: logging.Logger,
        on_change: Callable[[dict[str, Any]], None] | None = None,
        backoff_s: float = BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        stable_s: float = STABLE_S,
        tick: tuple[float, Callable[[], None]] | None = None,
    ) -> None:
        self.children = list(children)
        self.tick = tick
        self.backoff_s, self.max_backoff_s, self.stable_s = backoff_s, max_backoff_s, stable_s
        self.log = logger
        self.on_change = on_change
        self.stopping = threading.Event()
        self._fds: list[int] = []

    # ---- the service ----------------------------------------------------------------------

    def run(self, *, poll_s: float = 0.5) -> None:
        """Start every child in order, then keep them running until :meth:`stop`.

        Raises:
            ServiceFailed: A child cannot run (its diagnosis, or it never became ready);
                every child is stopped first.
        """
        try:
            for child in self.children:
                if self.stopping.is_set():
                    return
                self._start_ready(child)
            next_tick = time.monotonic()
            while not self.stopping.wait(poll_s):
                for child in self.children:
                    self._tend(child)
                if self.tick is not None and time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self.tick[0]
                    try:
                        self.tick[1]()
                    except Exception as err:  # noqa: BLE001 - a probe never stops the service
                        self.log.warning("probe failed: %s", err)
        finally:
            self._stop_all()

    def stop(self, *_: object) -> None:
        """Ask :meth:`run` to stop every child and return (a signal handler too)."""
        self.stopping.set()

    def stop_on_signals(self) -> None:
        """SIGTERM and SIGINT (Ctrl-C) stop the service (call from the main thread)."""
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def state(self) -> dict[str, Any]:
        """Each child's pid, whether it runs, since when and how often it was restarted."""
        return {
            c.name: {
                "pid": None if c.proc is None else c.proc.pid,
                "running": c.proc is not None and c.proc.poll() is None,
                "since": c.started or None,
                "restarts": c.restarts,
            }
            for c in self.children
        }

    # ---- one child ------------------------------------------------------------------------

    def _start_ready(self, child: Child) -> None:
        """Start ``child`` and wait until it is ready.

        Raises:
            ServiceFailed: It exited with a diagnosis, or was not ready in time.
        """
        self._start(child)
        deadline = time.monotonic() + child.ready_timeout_s
        while not (child.ready is None or child.ready()):
            if self.stopping.is_set():
                return
            self._tend(child)
            if time.monotonic() > deadline:
                raise ServiceFailed(
                    f"{child.name} did not become ready in {child.ready_timeout_s:.0f} s; "
                    "its output is in the log"
                )
            time.sleep(0.2)
        self.log.info("%s ready (pid %s)", child.name, child.proc.pid if child.proc else "-")

    def _start(self, child: Child) -> None:
        extra = child.prepare() if child.prepare is not None else {}
        fds = list(extra.get("pass_fds", ()))
        env = {**(child.env if child.env is not None else os.environ), **extra.pop("env", {})}
        child.tail = []
        child.proc = subprocess.Popen(
            list(child.argv),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stopped with its children
            **extra,
        )
        for fd in fds:  # the child holds its copy; ours closes
            with contextlib.suppress(OSError):
                os.close(fd)
        child.started = time.time()
        threading.Thread(target=self._relay, args=(child, child.proc.stdout), daemon=True).start()
        self.log.info("started %s (pid %s)", child.name, child.proc.pid)
        self._changed()

    def _relay(self, child: Child, stream: IO[bytes] | None) -> None:
        """Copy the child's output into the log, line by line, keeping its tail."""
        if stream is None:
            return
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            child.tail = [*child.tail[-(TAIL_LINES - 1) :], line]
            self.log.info("%s | %s", child.name, line)
        stream.close()

    def _exited(self, child: Child) -> None:
        """Log the exit, clean up after it, and stop the service if it can never run.

        Raises:
            ServiceFailed: The child's diagnosis says it cannot run.
        """
        assert child.proc is not None
        code = child.proc.returncode
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(timeout=5)
        time.sleep(0.2)  # the relay thread takes the last lines
        self.log.warning("%s exited with code %s", child.name, code)
        if child.cleanup is not None:
            child.cleanup()
        self._changed()
        reason = child.diagnose(code, list(child.tail)) if child.diagnose else None
        if reason:
            raise ServiceFailed(reason)

    def _tend(self, child: Child) -> None:
        """Note ``child``'s exit and schedule its restart after its back-off (reset once it
        had run ``STABLE_S``); start it again once that time has come."""
        if child.restart_at is not None:
            if time.monotonic() >= child.restart_at:
                child.restart_at = None
                self._start(child)
            return
        if child.proc is None or child.proc.poll() is None:
            return
        self._exited(child)
        if not child.backoff or time.time() - child.started >= self.stable_s:
            child.backoff = self.backoff_s
        wait = child.backoff
        child.backoff = min(child.backoff * 2, self.max_backoff_s)
        child.restarts += 1
        child.restart_at = time.monotonic() + wait
        self.log.warning("restarting %s in %.0f s (restart %d)", child.name, wait, child.restarts)

    def _stop_all(self) -> None:
        """Stop every child, newest first: SIGTERM to its group, SIGKILL after a while."""
        self.stopping.set()
        for child in reversed(self.children):
            proc = child.proc
            if proc is None:
                continue
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=STOP_TIMEOUT_S)
                self.log.info("stopped %s", child.name)
            # What is left in its group (a ClientApp it had started) goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            if child.cleanup is not None:
                child.cleanup()
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            with contextlib.suppress(OSError):
                self.on_change(self.state())
