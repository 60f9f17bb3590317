"""End to end with real Flower processes on 127.0.0.1 (tiny model).

* ``fedpersona simulate --preset tiny``: ``flwr run`` on the Simulation Engine (Ray).
* A real ``flower-superlink`` with two real ``flower-supernode`` processes, driven by
  ``flwr run`` — the deployment path.

Every process started here is stopped by PID, and the tests check that none is left.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import psutil
import pytest
from peft import PeftModel

from client.store import LocalStore
from common.crypto import Secret
from common.model import load_base_model
from simulations.deployment import (
    TEST_POLICY,
    LocalDeployment,
    processes_mentioning,
    tiny_run_config,
)
from simulations.evaluate import evaluate_run
from simulations.report import build_report
from simulations.simulate import PROJECT_DIR
from tests.conftest import open_test_store

pytestmark = pytest.mark.integration


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


def _ray_tmpdir(run_dir: Path) -> str:
    return (run_dir / ".flwr" / "ray-tmpdir").read_text()


def test_simulation_tiny_personal_beats_global(tmp_path) -> None:
    # Prepare: the console script as a user types it, default run name, a long --out path.
    # "fedpersona" in the path: lines that merely mention the path must not reach the user.
    out = tmp_path / ("a-long-fedpersona-folder-name-for-the-runs-of-a-federation-" * 3) / "runs"
    cmd = [
        str(Path(sys.executable).parent / "fedpersona"),
        "simulate",
        "--preset",
        "tiny",
        "--set",
        "personalization.strategy=fedsa",
        "--set",
        "audit.canaries=1",
        "--out",
        str(out),
    ]

    # Execute
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)

    # Assert: it ran, under the default name, and said nothing the user did not cause.
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run_dir,) = out.iterdir()
    assert run_dir.name.startswith("tiny-fedsa-")
    assert len(str(run_dir)) > 200
    assert "warning" not in (done.stdout + done.stderr).lower(), done.stdout + done.stderr

    # Assert: outputs, then the evaluation and report built on them.
    summary = _check_tiny_outputs(run_dir)
    _check_evaluation_and_report(run_dir, summary)


def _check_tiny_outputs(run_dir: Path) -> dict:
    """The tiny fedsa run's summary, global adapter, device stores, A/B sums and engine
    timings hold what they should, and nothing is left running; returns the summary."""
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
    # The engine's own timings (simulated nodes only): every train message answered in
    # round 2 is there, Device.train inside the node's time, and the overhead computable.
    from benchmarks.scaling import engine_overhead

    engine = engine_overhead(run_dir, actors=2)
    assert engine["client_rounds"] == rounds[1]["updates"] + rounds[1]["declined"]
    assert engine["device_s_per_client"] > 0
    assert 0 < engine["node_overhead"] < 1 and engine["engine_overhead"] < 1
    assert all(r["train_seconds"] <= r["seconds"] for r in rounds)
    # Nothing left running: superlink, ServerApp, Ray.
    assert processes_mentioning(str(run_dir)) == []
    assert processes_mentioning(_ray_tmpdir(run_dir)) == []
    assert not Path(_ray_tmpdir(run_dir)).exists()

    return summary


def _check_evaluation_and_report(run_dir: Path, summary: dict) -> None:
    """The run's evaluation (small settings: tiny model, few samples), its one-run audit's
    machinery and its report."""
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
    # fedsa releases the base model (B = 0): its global audit cannot fail, and says so.
    assert evaluation["membership_inference"]["global_is_base"] is True
    assert targets["mia_auc (global)"]["meets"] == "cannot fail (released model = base)"
    assert evaluation["membership_inference"]["global"]["mia_auc"] == pytest.approx(0.5)
    assert 0 <= targets["personalization accuracy (attribution_acc@10)"]["measured"] <= 1
    assert targets["data retention (days)"]["meets"] is True
    assert 0 < targets["state per user (bytes, largest store)"]["measured"] < 1_000_000
    assert len(evaluation["canaries"]["global"]) == 1
    assert 0 <= evaluation["canaries"]["global"][0] <= 5.0  # log2(32)
    assert {str(k) for k in evaluation["cold_start"]["win_rate_by_k"]} == {"0", "2"}
    # The one-run audit's machinery on this run (as if its 8 canaries had been coin-planted).
    from dataclasses import replace

    from simulations.evaluate import Evaluator

    ev = Evaluator(run_dir)
    ev.cfg = replace(ev.cfg, audit=replace(ev.cfg.audit, one_run=True, canaries=8))
    one_run = ev.one_run()
    assert one_run["canaries"] == 8 and one_run["guesses"] == 4
    assert 0 <= one_run["correct"] <= 4 and one_run["global_is_base"] is True
    assert one_run["epsilon_lower_bound"] >= 0
    html_path = build_report(run_dir)
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") >= 7  # six plots + A/B
    report_md = (html_path.parent / "report.md").read_text()
    assert "mia_auc (global)" in report_md
    # Who gains, by amount of data: the tiny federation trains no local-only baseline here
    # unless the preset asks; the groups are there either way.
    assert "## Who gains from joining, by how much data they have" in report_md
    assert "Who gains from joining" in page


class LocalFederation(LocalDeployment):
    """A real ``flower-superlink`` and ``n`` ``flower-supernode`` processes on 127.0.0.1
    (insecure; TLS, node auth and device workers are tested in tests/test_deployment.py), each
    device with its own encrypted store under ``tmp_path/device<i>``; ``flwr run`` drives runs
    against it (federation ``local-test``). Every process is stopped by PID on exit."""

    def __init__(self, tmp_path: Path, n: int, policy: Sequence[str] = TEST_POLICY) -> None:
        super().__init__(tmp_path, federation="local-test")
        self.n = n
        self.policy = policy

    def __enter__(self) -> LocalFederation:
        self.superlink = self.start_superlink()
        for i in range(self.n):
            self.start_device(i, self.n, policy=self.policy)
        return self

    def run_config(self, name: str, **extra: object) -> Path:
        """A tiny-model run config file writing to ``tmp_path/<name>``."""
        config = tiny_run_config(self.root, name, **{"data.num-users": self.n, **extra})
        return self.write_run_config(config, name)


@pytest.mark.slow
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
    assert processes_mentioning(str(tmp_path)) == []


def _server_app_processes(superlink: subprocess.Popen) -> list[psutil.Process]:
    """The ServerApp processes the SuperLink started (its descendants only)."""
    found = []
    for proc in psutil.Process(superlink.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if any("flwr-serverapp" in part for part in proc.cmdline()):
                found.append(proc)
    return found


@pytest.mark.slow
def test_deployment_server_app_killed_after_round_1_resumes_with_the_same_epsilon(
    tmp_path,
) -> None:
    # Prepare: 3 rounds with central DP (the Message-API path: 2 messages per round).
    import time

    from server import checkpoint
    from server.accountant import FederationAccountant

    n_rounds = 3
    # The devices' owners accept central noise (added by the server) and a larger cap.
    policy = (*TEST_POLICY, "--trust-server-noise", "--epsilon-cap", "100")
    with LocalFederation(tmp_path, 2, policy) as fed:
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
    assert processes_mentioning(str(tmp_path)) == []


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
    assert processes_mentioning(str(tmp_path / "term")) == []
    assert processes_mentioning(_ray_tmpdir(tmp_path / "term")) == []
