"""common/supervise.py on real processes: start order, restart with back-off, a diagnosis
that stops the service, and a stop that leaves nothing running."""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from common.supervise import Child, ServiceFailed, Supervisor

PY = sys.executable


def _script(tmp_path: Path, name: str, body: str) -> list[str]:
    path = tmp_path / f"{name}.py"
    path.write_text(body)
    return [PY, str(path)]


def _logger(tmp_path: Path) -> tuple[logging.Logger, Path]:
    log_file = tmp_path / "service.log"
    logger = logging.getLogger(f"test-supervise-{tmp_path.name}")
    logger.setLevel(logging.INFO)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    return logger, log_file


def _run_in_thread(sup: Supervisor) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            sup.run(poll_s=0.05)
        except BaseException as err:  # noqa: BLE001 (handed to the test)
            errors.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, errors


def _wait(cond, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_children_start_in_order_restart_after_a_crash_and_stop_together(tmp_path) -> None:
    # Prepare: "first" becomes ready once its file exists; "second" starts only then and
    # starts a grandchild of its own (as an executor starts ClientApps); "second" crashes once.
    ready = tmp_path / "first.ready"
    crash = tmp_path / "crash-once"
    crash.write_text("")
    first = _script(
        tmp_path,
        "first",
        f"import pathlib, time\npathlib.Path({str(ready)!r}).write_text('')\nprint('first up', "
        "flush=True)\ntime.sleep(600)\n",
    )
    second = _script(
        tmp_path,
        "second",
        "import os, pathlib, subprocess, sys, time\n"
        f"assert pathlib.Path({str(ready)!r}).exists(), 'started before first was ready'\n"
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"crash = pathlib.Path({str(crash)!r})\n"
        "if crash.exists():\n    crash.unlink()\n    print('crashing', flush=True)\n"
        "    sys.exit(3)\n"
        "print('second up', flush=True)\ntime.sleep(600)\n",
    )
    cleaned: list[str] = []
    logger, log_file = _logger(tmp_path)
    states: list[dict] = []
    sup = Supervisor(
        [
            Child("first", first, ready=ready.exists),
            Child("second", second, cleanup=lambda: cleaned.append("second")),
        ],
        logger=logger,
        on_change=states.append,
        backoff_s=0.2,
    )

    # Execute: run until "second" has been restarted and runs again, then stop.
    thread, errors = _run_in_thread(sup)
    _wait(lambda: "second | second up" in log_file.read_text())
    pids = [c.proc.pid for c in sup.children if c.proc is not None]
    family = [p for pid in pids for p in [psutil.Process(pid), *psutil.Process(pid).children()]]
    sup.stop()
    thread.join(timeout=60)

    # Assert: the crash was logged and followed by a restart after the back-off; the stop
    # ended every child and grandchild and ran the clean-up; the state says so.
    assert not errors and not thread.is_alive()
    log = log_file.read_text()
    assert "second | crashing" in log and "second exited with code 3" in log
    assert "restarting second in 0 s (restart 1)" in log
    assert log.index("first ready") < log.index("started second")
    assert sup.children[1].restarts == 1
    assert len(family) >= 3
    _, alive = psutil.wait_procs(family, timeout=10)
    assert alive == []
    assert cleaned.count("second") >= 2  # after the crash and at the stop
    assert not any(s["running"] for s in states[-1].values())


def test_a_child_whose_exit_says_it_cannot_run_stops_the_service_with_the_reason(
    tmp_path,
) -> None:
    # Prepare: a long-running first child, and a second that exits as an unregistered node.
    first = _script(tmp_path, "first", "import time\ntime.sleep(600)\n")
    second = _script(
        tmp_path,
        "second",
        "print('Failed to activate SuperNode', flush=True)\nraise SystemExit(1)\n",
    )

    def diagnose(code: int, tail: list[str]) -> str | None:
        if any("Failed to activate SuperNode" in line for line in tail):
            return "this device's key is not registered with the federation"
        return None

    logger, _ = _logger(tmp_path)
    sup = Supervisor(
        [Child("first", first), Child("second", second, diagnose=diagnose)],
        logger=logger,
        backoff_s=0.1,
    )

    # Execute / Assert: one clear reason, and nothing left running.
    with pytest.raises(ServiceFailed, match="not registered"):
        sup.run(poll_s=0.05)
    assert all(c.proc is not None and c.proc.poll() is not None for c in sup.children)
    assert sup.children[1].restarts == 0


def test_a_child_that_never_becomes_ready_fails_the_start(tmp_path) -> None:
    sleeper = _script(tmp_path, "sleeper", "import time\ntime.sleep(600)\n")
    logger, _ = _logger(tmp_path)
    sup = Supervisor(
        [Child("slow", sleeper, ready=lambda: False, ready_timeout_s=0.5)], logger=logger
    )
    with pytest.raises(ServiceFailed, match="slow did not become ready"):
        sup.run(poll_s=0.05)
    assert sup.children[0].proc is not None and sup.children[0].proc.poll() is not None


def test_a_probe_runs_every_interval_and_its_failure_never_stops_the_service(tmp_path) -> None:
    # Prepare: a service whose probe fails every other call.
    sleeper = _script(tmp_path, "sleeper", "import time\ntime.sleep(600)\n")
    logger, log = _logger(tmp_path)
    calls: list[float] = []

    def probe() -> None:
        calls.append(time.monotonic())
        if len(calls) % 2 == 0:
            raise OSError("server gone")

    sup = Supervisor([Child("s", sleeper)], logger=logger, tick=(0.2, probe))

    # Execute
    thread, errors = _run_in_thread(sup)
    _wait(lambda: len(calls) >= 4)
    sup.stop()
    thread.join(timeout=30)

    # Assert: called about every 0.2 s from the start; its failure was logged, not fatal.
    assert errors == [] and not thread.is_alive()
    assert all(b - a >= 0.15 for a, b in zip(calls, calls[1:], strict=False))
    assert "probe failed: server gone" in log.read_text()
