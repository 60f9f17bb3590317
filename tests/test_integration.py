"""End to end with real Flower processes on 127.0.0.1 (tiny model).

* ``fedpersona simulate --preset tiny``: ``flwr run`` on the Simulation Engine (Ray).
* A real ``flower-superlink`` with two real ``flower-supernode`` processes, driven by
  ``flwr run`` — the deployment path.

Every process started here is stopped by PID, and the tests check that none is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from peft import PeftModel

from client.store import LocalStore
from common.crypto import Secret
from common.model import load_base_model
from simulations.evaluate import evaluate_run
from simulations.report import build_report
from simulations.simulate import PROJECT_DIR, _free_port, _wait_port, simulate, stop_process_tree
from tests.conftest import device_key, open_test_store

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if text in cmd and proc.pid != os.getpid():
            found.append(cmd[:200])
    return found


def _check_summary(run_dir: Path, n_users: int, n_rounds: int) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("config", "rounds", "clients", "win_rate", "ppl_gain", "timings"):
        assert key in summary
    assert len(summary["rounds"]) == n_rounds
    for row in summary["rounds"]:
        for key in ("train_loss", "global_loss", "personal_loss", "win_rate", "seconds"):
            assert key in row
        assert row["evaluated"] == n_users and row["updates"] == n_users
    assert len(summary["clients"]) == n_users
    for row in summary["clients"]:
        for key in ("user", "n_train", "n_test", "base_loss", "global_loss", "personal_loss"):
            assert key in row
    return summary


def test_simulation_tiny_personal_beats_global(tmp_path) -> None:
    # Execute
    run_dir = simulate(
        "tiny",
        {"personalization.strategy": "fedsa", "audit.canaries": 1},
        tmp_path,
        run_name="sim",
    )

    # Assert: outputs
    summary = _check_summary(run_dir, n_users=4, n_rounds=2)
    rounds, clients = summary["rounds"], summary["clients"]
    # Loss fell: each user's personal model beats the base model, and round 2 beats round 1.
    assert all(c["personal_loss"] < c["base_loss"] for c in clients)
    assert rounds[1]["personal_loss"] < rounds[0]["personal_loss"]
    assert rounds[1]["train_loss"] < rounds[0]["train_loss"]
    # The personal model beats the global (cold-start) one for most users.
    assert summary["win_rate"] >= 0.75
    assert summary["ppl_gain"] > 0
    base = load_base_model("tiny")
    PeftModel.from_pretrained(base, str(run_dir / "global_adapter"))
    # Each simulated device kept its encrypted store (personal tensors, global, ledger).
    for row in clients:
        store = LocalStore.open(
            run_dir / "devices" / row["user"],
            Secret(key_file=run_dir / "devices" / f"{row['user']}.key"),
        )
        with store:
            assert {"personal", "global", "device", "ledger"} <= set(store.blob_sizes())
            assert store.get_json("device")["rounds_trained"] >= 1
    # The federated A/B test arrived as SecAgg+ sums: 4 devices × ab.interactions per round.
    ab = summary["ab_test"]
    assert ab["n_a"] + ab["n_b"] == pytest.approx(2 * 4 * 4, abs=1e-3)
    assert len(ab["satisfaction"]) == 2 and "SecAgg+" in ab["privacy"]
    # Nothing left running: superlink, ServerApp, Ray.
    assert _processes_mentioning(str(run_dir)) == []
    assert _processes_mentioning("fpray-sim-") == []

    # Evaluate the run and build its report (small settings: tiny model, few samples).
    evaluation = evaluate_run(
        run_dir,
        prompts_per_user=2,
        max_new_tokens=4,
        mia_per_user=6,
        references=31,
        new_users=2,
        ks=(0, 2),
        drift_pairs=1,
    )
    targets = {row["metric"]: row for row in evaluation["seed_targets"]}
    assert targets["preference alignment (win_rate)"]["measured"] == summary["win_rate"]
    assert 0 <= targets["mia_auc (global)"]["measured"] <= 1
    assert 0 <= targets["personalization accuracy (attribution_acc@10)"]["measured"] <= 1
    assert targets["data retention (days)"]["meets"] is True
    assert 0 < targets["state per user (bytes, largest store)"]["measured"] < 1_000_000
    assert len(evaluation["canaries"]["global"]) == 1
    assert 0 <= evaluation["canaries"]["global"][0] <= 5.0  # log2(32)
    assert {str(k) for k in evaluation["cold_start"]["win_rate_by_k"]} == {"0", "2"}
    html_path = build_report(run_dir)
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") >= 7  # six plots + A/B
    assert "mia_auc (global)" in (html_path.parent / "report.md").read_text()


class LocalFederation:
    """A real ``flower-superlink`` and ``n`` ``flower-supernode`` processes on 127.0.0.1
    (insecure; TLS and node auth are tested in tests/test_deployment.py), each device with its
    own encrypted store under ``tmp_path/device<i>``; ``flwr run`` drives runs against it.
    Every process is stopped by PID on exit."""

    def __init__(self, tmp_path: Path, n: int) -> None:
        self.tmp, self.n = tmp_path, n
        self.port = _free_port()
        flwr_home = tmp_path / "flwr-home"
        flwr_home.mkdir()
        (flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "local-test"\n\n[superlink.local-test]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self.env = {
            **os.environ,
            "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
        }
        self.procs: list[subprocess.Popen] = []
        self.logs = contextlib.ExitStack()

    def _start(self, cmd: list[str], log: str) -> subprocess.Popen:
        handle = self.logs.enter_context(open(self.tmp / log, "w"))  # noqa: SIM115
        proc = subprocess.Popen(
            cmd, env=self.env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append(proc)
        return proc

    def __enter__(self) -> LocalFederation:
        superlink = self._start(
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
                "--database",
                str(self.tmp / "superlink.db"),
            ],
            "superlink.log",
        )
        self.superlink = superlink
        _wait_port(self.port, superlink)
        for pid in range(self.n):
            data_dir = self.tmp / f"device{pid}"
            self._start(
                [
                    str(BIN / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{self.port}",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(_free_port()),
                    "--node-config",
                    f'partition-id={pid} num-partitions={self.n} data-dir="{data_dir}" '
                    f'key-file="{device_key(data_dir)}"',
                ],
                f"supernode{pid}.log",
            )
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            stop_process_tree(proc)
        self.logs.close()

    def flwr(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this federation."""
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=PROJECT_DIR,
        )

    def run_config(self, name: str, **extra: object) -> Path:
        """A tiny-model run config file writing to ``tmp_path/<name>``."""
        values: dict[str, object] = {
            "model.name": "tiny",
            "num-server-rounds": 2,
            "data.num-users": self.n,
            "data.max-seq-len": 48,
            "data.max-test-samples": 4,
            "train.local-steps": 4,
            "train.batch-size": 2,
            "train.learning-rate": 0.05,
            "dp.clip-norm": 0.005,
            "output.dir": str(self.tmp),
            "output.run-name": name,
            "round-timeout": 300,
            **extra,
        }
        path = self.tmp / f"{name}.toml"
        path.write_text("".join(f"{json.dumps(k)} = {json.dumps(v)}\n" for k, v in values.items()))
        return path


def test_deployment_superlink_and_two_supernodes(tmp_path) -> None:
    # Execute
    with LocalFederation(tmp_path, 2) as fed:
        result = fed.flwr(
            "run",
            str(PROJECT_DIR),
            "local-test",
            "--stream",
            "--run-config",
            str(fed.run_config("deploy")),
        )

    # Assert
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = _check_summary(tmp_path / "deploy", n_users=2, n_rounds=2)
    assert all(c["personal_loss"] < c["base_loss"] for c in summary["clients"])
    for pid in range(2):
        with open_test_store(tmp_path / f"device{pid}") as store:
            assert store.get_json("device")["rounds_trained"] == 2
            assert store.get_blob("personal") is not None
            assert len(store.get_json("ledger")["events"]) == 2
    assert _processes_mentioning(str(tmp_path)) == []


def _server_app_processes(superlink: subprocess.Popen) -> list[psutil.Process]:
    """The ServerApp processes the SuperLink started (its descendants only)."""
    found = []
    for proc in psutil.Process(superlink.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if any("flwr-serverapp" in part for part in proc.cmdline()):
                found.append(proc)
    return found


def test_deployment_server_app_killed_after_round_1_resumes_with_the_same_epsilon(
    tmp_path,
) -> None:
    # Prepare: 3 rounds with central DP (the Message-API path: 2 messages per round).
    import time

    from server import checkpoint
    from server.accountant import FederationAccountant

    n_rounds = 3
    with LocalFederation(tmp_path, 2) as fed:
        config = fed.run_config(
            "resume",
            **{
                "num-server-rounds": n_rounds,
                "secagg.enabled": False,
                "dp.noise-mode": "central",
                "dp.noise-multiplier": 1.0,
                "privacy.epsilon-cap": 100.0,
            },
        )
        submitted = fed.flwr(
            "run", str(PROJECT_DIR), "local-test", "--run-config", str(config), "--format", "json"
        )
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        run_id = json.loads(submitted.stdout)["run-id"]

        # Execute: SIGKILL the ServerApp once round 1 is checkpointed, then run again.
        deadline = time.monotonic() + 420
        saved = None
        while time.monotonic() < deadline:
            with contextlib.suppress(checkpoint.CheckpointError):
                saved = checkpoint.load(tmp_path / "resume")
            if saved is not None and saved.round >= 1:
                break
            time.sleep(0.5)
        killed = _server_app_processes(fed.superlink)
        for proc in killed:
            proc.kill()
        psutil.wait_procs(killed, timeout=30)
        fed.flwr("stop", str(run_id), "local-test")
        restarted = fed.flwr(
            "run", str(PROJECT_DIR), "local-test", "--stream", "--run-config", str(config)
        )

    # Assert
    assert saved is not None and saved.round == 1 and killed
    assert restarted.returncode == 0, restarted.stdout[-3000:] + restarted.stderr[-3000:]
    summary = json.loads((tmp_path / "resume" / "summary.json").read_text())
    assert summary["timings"]["resumed_after_round"] >= 1
    assert [r["round"] for r in summary["rounds"]] == list(range(1, n_rounds + 1))
    released = [r for r in summary["rounds"] if r["released"]]
    assert len(released) == n_rounds
    uninterrupted = FederationAccountant(noise_multiplier=1.0, sample_rate=1.0, delta=1e-5)
    for _ in range(n_rounds):
        uninterrupted.release()
    user = summary["privacy"]["user_level"]
    assert user["rounds_released"] == n_rounds
    assert user["epsilon_rdp"] == pytest.approx(uninterrupted.epsilon("rdp"), rel=1e-9)
    for pid in range(2):  # devices kept their state through the restart
        with open_test_store(tmp_path / f"device{pid}") as store:
            rounds = {e["round"] for e in store.get_json("ledger")["events"]}
            assert rounds == set(range(1, n_rounds + 1))
    assert _processes_mentioning(str(tmp_path)) == []


def test_sigterm_during_a_simulation_leaves_no_process(tmp_path) -> None:
    # Prepare: a simulation in a child process.
    import signal
    import time

    code = (
        "from simulations.simulate import simulate; "
        f"simulate('tiny', {{}}, r'{tmp_path}', run_name='term')"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT_DIR, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "term" / "flwr.log").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(5)  # the superlink is up and `flwr run` has started

    # Execute
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)

    # Assert
    assert _processes_mentioning(str(tmp_path / "term")) == []
    assert _processes_mentioning("fpray-term-") == []
