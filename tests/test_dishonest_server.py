"""The device keeps its promise against a server that lies and ships its own code.

Each test plays the dishonest party — a ClientApp relaying what it likes to the device's
worker over the worker's real socket, or a server running a whole SecAgg+ cohort of fake
devices around one real one (:class:`tests.lying_server.LyingServer`) — and asserts what left
the device: the bytes the server could read once it took every mask off, their noise, their
weight, and what the device's ledger charged. docs/privacy.md ("Threat model") points here.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.app.message_type import MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client.federation import worker
from client.federation.errors import DeviceError
from client.federation.policy import DevicePolicy
from client.store.state import set_paused
from common.config import parse_run_config
from common.dp.accounting import epsilon
from common.dp.privatize import Privatize
from tests.conftest import (
    device_node_config,
    initial_shared,
    open_test_store,
    stored_device_state,
    tiny_run_config,
)
from tests.lying_server import LyingServer
from tests.test_worker import _start_worker, _stop

# What the lying server claims, all of it within the default policy's terms: σ 7.1 over a
# cohort of m_min = 8 under SecAgg+, shares sized for half of it honest (the fakes make up
# the cohort).
CLAIMS = {
    "dp.min-clients": 8,
    "dp.honest-fraction": 0.5,
    "data.num-users": 9,
    "train.local-steps": 1,
}


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="fpd-", dir="/tmp"))  # a Unix socket path is short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def _worker() -> Iterator[tuple[Path, Path]]:
    """One device worker for the module's tests: its store is ``<dir>/device``, a link each
    test points at a device of its own (the worker opens the store it names per message), and
    its key file ``<dir>/device.key`` is every test device's."""
    root = Path(tempfile.mkdtemp(prefix="fpd-", dir="/tmp"))  # a Unix socket path is short
    link, first = root / "device", root / "first"
    device_node_config(first, 0, 4)
    shutil.copy2(first.with_name("first.key"), link.with_name("device.key"))
    link.symlink_to(first)
    proc = _start_worker(root / "w.sock", link)
    yield root / "w.sock", link
    _stop(proc)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def device(tmp_path, _worker) -> Callable[..., Path]:
    """``device(policy)``: a real device (a role's examples in its store, ``policy`` kept
    there; ``None``: the defaults ``device init`` keeps) in ``tmp_path / "device"``, served
    by the module's worker; returns the worker's socket."""
    sock, link = _worker

    def start(policy: DevicePolicy | None = None) -> Path:
        data_dir = tmp_path / "device"
        shutil.copy2(link.with_name("device.key"), data_dir.with_name("device.key"))
        device_node_config(data_dir, 0, 4, policy=policy)
        if policy is None:
            with open_test_store(data_dir) as store:
                DevicePolicy().save(store)
        staged = link.with_name("device.next")
        staged.symlink_to(data_dir)
        staged.replace(link)  # the worker's next message opens this device's store
        return sock

    return start


def _ledger(tmp_path: Path) -> dict[str, Any]:
    return stored_device_state(tmp_path / "device")["ledger"] or {"events": [], "declined": []}


def _shared(raw: dict[str, Any]) -> list[np.ndarray]:
    return [t.numpy() for t in initial_shared(parse_run_config(raw)).values()]


def _privatize(raw: dict[str, Any]) -> Privatize:
    return Privatize.of(parse_run_config(raw), 9)


# ---- the reply is masked only where the worker masks it ---------------------------------


def test_a_plain_train_message_carrying_the_secagg_record_is_judged_unmasked(
    tmp_path, device
) -> None:
    # Prepare: a device on its default (strict) policy; a server that claims a cohort of a
    # million (each device's noise share σC/1000) and relays a legacy fit message with
    # SecAgg+'s config record as a plain `train` message, never running the protocol.
    raw = tiny_run_config(**{**CLAIMS, "dp.min-clients": 1_000_000})
    server = LyingServer(device(), raw)
    content = server.fitins(_shared(raw))
    content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(
        {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: [], Key.SOURCE_LIST: []}
    )

    # Execute
    reply = server.send(content, kind="train")

    # Assert: nothing of the user left: a zero update of weight 0 (the policy judged the
    # reply unmasked and declined), nothing charged, the reason kept.
    arrays = [a.numpy() for a in reply.array_records["fitres.parameters"].values()]
    assert arrays and all(not a.any() for a in arrays)
    assert reply.config_records["fitres.metrics"]["declined"] == 1
    ledger = _ledger(tmp_path)
    assert ledger["events"] == []
    assert "without SecAgg+ masking" in ledger["declined"][-1]["reason"]


def test_a_secagg_stage_in_a_message_that_is_not_training_is_refused(tmp_path, device) -> None:
    # Prepare: Flower's mod hands a SecAgg+ message whose type is not TRAIN straight to the
    # training callback; a server sends one as an evaluation.
    raw = tiny_run_config(**CLAIMS)
    server = LyingServer(device(), raw)
    content = server.fitins(_shared(raw))
    content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(
        {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: [], Key.SOURCE_LIST: []}
    )

    # Execute / Assert: refused with a code; nothing trained or charged.
    with pytest.raises(DeviceError, match="rejected-message"):
        server.send(content, message_type=MessageType.EVALUATE)
    assert _ledger(tmp_path)["events"] == []
    assert stored_device_state(tmp_path / "device")["personal"] is None


def test_a_source_named_twice_does_not_count_toward_the_cohort(tmp_path, device) -> None:
    # Prepare: the device requires a cohort of 8 (m_min); 7 fakes share keys with it, but at
    # the masked-vector stage the server says only 6 of them are left — and names one twice.
    raw = tiny_run_config(**CLAIMS)
    server = LyingServer(device(), raw, fakes=7)
    server.setup(clipping_range=_privatize(raw).clipping_range)
    server.share_keys()
    left = list(server.neighbours)[:6]
    sources = [*left, left[0]]

    # Execute / Assert: the device counts 7 distinct devices, refuses to mask, trains nothing.
    with pytest.raises(DeviceError, match="cohort-too-small"):
        server.collect(_shared(raw), sources=sources)
    ledger = _ledger(tmp_path)
    assert ledger["events"] == []
    assert "only 7 devices" in ledger["declined"][-1]["reason"]


def test_an_update_asked_for_twice_in_one_round_leaves_once(tmp_path, device) -> None:
    # Prepare: a device whose owner allows several rounds (cap 8); the server runs round 1
    # with its fakes, then restarts the protocol and asks for round 1 again.
    raw = tiny_run_config(**CLAIMS)
    server = LyingServer(device(DevicePolicy(epsilon_cap=8.0)), raw)
    share = _privatize(raw).noise_std

    # Execute
    first = server.round(_shared(raw), clipping_range=_privatize(raw).clipping_range)
    again = server.round(_shared(raw), clipping_range=_privatize(raw).clipping_range)

    # Assert: one charge; the second reply is the device's noise share alone (a zero update,
    # weight 1), so what the server holds twice is one update under two independent noises.
    ledger = _ledger(tmp_path)
    assert [(e["round"], e["kind"]) for e in ledger["events"]] == [(1, "user")]
    assert "already sent an update in round 1" in ledger["declined"][-1]["reason"]
    metrics = server.last_reply.config_records["fitres.metrics"]
    assert metrics["declined"] == 1 and metrics["noise_shares"] == 1
    for recovered in (first, again):
        assert recovered.weight == pytest.approx(1.0)
        assert recovered.vector.std() == pytest.approx(share, rel=0.1)


# ---- a device that leaves after set-up still sends its noise share ----------------------


def _pause(store: Any) -> None:
    set_paused(store, True)


def _purge(store: Any) -> None:
    store.purge_expired(now=time.time() + 10 * 365 * 86400)  # every example is past retention


def _period_cap(store: Any) -> None:
    policy = DevicePolicy.load(store) or DevicePolicy()
    policy.with_changes(period_days=30.0, period_epsilon_cap=0.01).save(store)


LATE_REFUSALS = {"paused": _pause, "retention purge": _purge, "period cap": _period_cap}


@pytest.mark.parametrize("refusal", [*LATE_REFUSALS, "skellam offer"])
def test_a_device_that_declines_after_setup_still_sends_its_noise_share(
    tmp_path, device, refusal
) -> None:
    # Prepare: the device joins at setup; before the masked-vector stage its owner pauses it,
    # retention purges its examples or a period cap comes into force — or, in skellam mode,
    # the server publishes another seed than the device derives.
    skellam = refusal == "skellam offer"
    raw = tiny_run_config(
        **CLAIMS,
        **({"dp.noise-mode": "skellam", "dp.noise-multiplier": 6.0} if skellam else {}),
    )
    privatize = _privatize(raw)
    server = LyingServer(device(), raw)
    if skellam:
        server.setup(
            clipping_range=privatize.clipping_range,
            target_range=privatize.quantization_range,
        )
    else:
        server.setup(clipping_range=privatize.clipping_range)
    server.share_keys()
    fit_config: dict[str, Any] = {}
    if skellam:
        from client.federation.runtime import shared_dim
        from common.dp.discrete import offer, round_seed

        params = privatize.discrete_params(shared_dim(parse_run_config(raw)))
        fit_config = offer(params, round_seed(server.run_id, 1) + 1)  # not the device's seed
    else:
        with open_test_store(tmp_path / "device") as store:
            LATE_REFUSALS[refusal](store)

    # Execute
    recovered = server.unmask_device(server.collect(_shared(raw), fit_config=fit_config))

    # Assert: declined, nothing charged — and what it masked is its noise share alone with
    # weight 1, so the sum the server unmasks still carries every masked vector's noise.
    ledger = _ledger(tmp_path)
    assert ledger["events"] == []
    assert "noise share alone was sent" in ledger["declined"][-1]["reason"]
    assert recovered.weight == pytest.approx(1.0)
    if skellam:
        from client.federation.runtime import shared_dim

        params = privatize.discrete_params(shared_dim(parse_run_config(raw)))
        integers = recovered.raw - 2 ** (params.bits - 1)  # centred: the Skellam share alone
        assert integers.std() == pytest.approx(params.scale * privatize.noise_std, rel=0.1)
    else:
        assert recovered.vector.std() == pytest.approx(privatize.noise_std, rel=0.1)


def test_a_paused_device_leaves_at_setup(tmp_path, device) -> None:
    # Prepare: the owner paused the device before the round.
    raw = tiny_run_config(**CLAIMS)
    sock = device()
    with open_test_store(tmp_path / "device") as store:
        set_paused(store, True)
    server = LyingServer(sock, raw)

    # Execute / Assert: it leaves before any key is shared; the pause is the reason kept.
    with pytest.raises(DeviceError, match="declined"):
        server.setup(clipping_range=_privatize(raw).clipping_range)
    assert "paused" in _ledger(tmp_path)["declined"][-1]["reason"]


# ---- noise that holds under lies: the honest share, the cohort ceiling, the floor -------


@pytest.mark.parametrize(
    "claim",
    [
        {"dp.min-clients": 1_000_000},  # each share σC/√500,000: nothing left of the noise
        {"dp.honest-fraction": 1.0},  # every member of the cohort honest
    ],
    ids=["a cohort of a million", "every device honest"],
)
def test_a_round_sized_for_more_honest_devices_than_the_device_accepts_ends_at_setup(
    tmp_path, device, claim
) -> None:
    # Prepare: a device on its default policy (at most half of a cohort honest, shares sized
    # for at most 10,000 honest devices); a server whose cohort is all its own fakes.
    raw = tiny_run_config(**{**CLAIMS, **claim})
    server = LyingServer(device(), raw)

    # Execute / Assert: it leaves before a key is shared; nothing trained, charged or sent.
    with pytest.raises(DeviceError, match="declined"):
        server.setup(clipping_range=_privatize(raw).clipping_range)
    ledger = _ledger(tmp_path)
    assert ledger["events"] == [] and "at SecAgg+ setup" in ledger["declined"][-1]["reason"]
    assert stored_device_state(tmp_path / "device")["personal"] is None


def test_with_a_share_floor_an_update_alone_keeps_the_worst_case_epsilon(tmp_path, device):
    # Prepare: a federation whose shares are at least 4·C (dp.share-floor); a device whose
    # owner caps the worst case — its updates with only its own noise — between what one and
    # two such rounds cost; a server whose every other cohort member is its own.
    raw = tiny_run_config(**{**CLAIMS, "dp.share-floor": 4.0})
    one = epsilon([(4.0, 1.0, 1)], delta=1e-5)
    two = epsilon([(4.0, 1.0, 2)], delta=1e-5)
    server = LyingServer(
        device(DevicePolicy(epsilon_cap=8.0, worst_case_epsilon_cap=(one + two) / 2)), raw
    )
    privatize = _privatize(raw)
    assert privatize.noise_std == pytest.approx(4.0 * 0.05)  # the floor, above σC/√4

    # Execute: round 1, fully unmasked by the server; then round 2.
    alone = server.round(_shared(raw), clipping_range=privatize.clipping_range)
    server_two = LyingServer(server.sock, raw, run_id=server.run_id)
    with pytest.raises(DeviceError, match="declined"):
        server_two.setup(clipping_range=privatize.clipping_range)

    # Assert: what the server read of round 1 carries the floor's noise (its update is
    # within C, so the rest is noise), the ledger's alone ε is that of σ = 4 once; round 2
    # would pass the owner's worst-case cap, so the device left at setup.
    update_norm = 0.05
    noise = float(np.sqrt(max(alone.vector.var() - update_norm**2 / alone.vector.size, 0)))
    assert noise == pytest.approx(4.0 * 0.05, rel=0.1)
    ledger = _ledger(tmp_path)
    (event,) = ledger["events"]
    assert event["alone_noise_multiplier"] == pytest.approx(4.0)
    assert ledger["epsilon"]["alone"] == pytest.approx(one)
    assert "worst-case budget exhausted" in ledger["declined"][-1]["reason"]


# ---- evaluation under the owner's rules -------------------------------------------------


def _evaluate(server: LyingServer, tensors: list[np.ndarray], server_round: int) -> dict:
    """An evaluation message (the SecAgg+ path's legacy records) relayed to the worker."""
    from flwr.common import EvaluateIns, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    ins = EvaluateIns(ndarrays_to_parameters(tensors), {"server-round": server_round})
    content = compat.evaluateins_to_recorddict(ins, True)
    reply = server.send(content, kind="evaluate", message_type=MessageType.EVALUATE)
    return dict(reply.config_records["evaluateres.metrics"])


def _crafted(raw: dict[str, Any], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.05, a.shape).astype(np.float32) for a in _shared(raw)]


def test_evaluation_in_a_loop_is_no_loss_oracle(tmp_path, device) -> None:
    # Prepare: a device on its default policy that never trained; a server that asks it to
    # evaluate crafted adapters again and again (loss differences would answer questions
    # about the user's text).
    raw = tiny_run_config(**CLAIMS)
    server = LyingServer(device(), raw)

    # Execute
    replies = [_evaluate(server, _crafted(raw, seed), server_round=1) for seed in range(4)]

    # Assert: no loss, no count left; the crafted tensors were not taken up as the served
    # global model; nothing was computed into the store.
    for reply in replies:
        assert reply == {"losses_withheld": 1}
    state = stored_device_state(tmp_path / "device")
    with open_test_store(tmp_path / "device") as store:
        assert store.get_blob("global") is None
    assert not [h for h in (state["device"] or {}).get("history", []) if "global_loss" in h]


def test_a_device_that_shares_losses_reports_once_the_release_of_a_round_it_trained_in(
    tmp_path, device
) -> None:
    # Prepare: the owner shares per-device losses; the device trains round 1 with the fakes.
    raw = tiny_run_config(**CLAIMS)
    server = LyingServer(device(DevicePolicy(epsilon_cap=8.0, share_losses=True)), raw)
    server.round(_shared(raw), clipping_range=_privatize(raw).clipping_range)
    release, other = _crafted(raw, 1), _crafted(raw, 2)

    # Execute: the round's release, other tensors for the same round, the release again,
    # and a round it never trained in.
    first = _evaluate(server, release, server_round=1)
    swapped = _evaluate(server, other, server_round=1)
    again = _evaluate(server, release, server_round=1)
    untrained = _evaluate(server, release, server_round=2)

    # Assert: one answer (the owner shares losses), then nothing; the model it serves is the
    # first tensors of the round it trained in.
    assert {"base_loss", "global_loss", "personal_loss"} <= set(first)
    assert "losses_withheld" not in first
    assert swapped == again == untrained == {"losses_withheld": 1}
    with open_test_store(tmp_path / "device") as store:
        from client.store.state import tensors_from_bytes

        served = tensors_from_bytes(store.get_blob("global"), "global")
    assert sorted(float(t.float().abs().sum()) for t in served.values()) == pytest.approx(
        sorted(float(np.abs(a.astype(np.float16).astype(np.float32)).sum()) for a in release),
        rel=1e-3,
    )


# ---- A/B counts: only with the owner's consent, only summed under SecAgg+ ----------------


def _rate(data_dir: Path, ratings: list[tuple[str, float]]) -> None:
    """The user rated answers the assistant gave with ``(variant, rating)``."""
    with open_test_store(data_dir) as store:
        for variant, rating in ratings:
            i = store.add_interaction("q", "a", variant=variant)
            store.add_feedback(i, "rating", value=rating)


@pytest.mark.parametrize("consent", [False, True], ids=["no consent", "consent"])
def test_ab_counts_leave_only_with_consent_and_only_masked(tmp_path, device, consent) -> None:
    # Prepare: the user rated three answers; the server runs the A/B test with its fakes.
    raw = tiny_run_config(**CLAIMS)
    sock = device(DevicePolicy(epsilon_cap=8.0, share_ab_counts=consent))
    _rate(tmp_path / "device", [("global", 2.0), ("personal", 5.0), ("personal", 4.0)])
    server = LyingServer(sock, raw)

    # Execute
    recovered = server.round(_shared(raw), clipping_range=_privatize(raw).clipping_range)

    # Assert: the A/B entries the server reads (scaled into the update's range, 6 numbers
    # after the update) are the counts only with consent, zeros without.
    from common import ab

    cfg = parse_run_config(raw)
    counts = recovered.vector[-ab.FIELDS :] * ab.scale(cfg.ab.interactions, cfg.dp.clip_norm)
    expected = ab.counts([("global", 2.0), ("personal", 5.0), ("personal", 4.0)])
    if consent:
        np.testing.assert_allclose(counts, expected, atol=0.05)
    else:
        np.testing.assert_allclose(counts, 0.0, atol=0.05)


def test_ab_counts_never_leave_in_the_clear(tmp_path, device) -> None:
    # Prepare: an owner who consents to A/B counts and accepts rounds without SecAgg+; a
    # server that runs the Message API (no masking) and asks for the A/B test.
    from common.serialization import to_arrayrecord
    from tests.conftest import make_message, permissive_policy

    raw = tiny_run_config(**{"secagg.enabled": False, "dp.noise-mode": "central"})
    sock = device(permissive_policy(share_ab_counts=True))
    _rate(tmp_path / "device", [("global", 3.0), ("personal", 4.0)])
    server = LyingServer(sock, raw)
    msg = make_message(to_arrayrecord(initial_shared(parse_run_config(raw))), "train")

    # Execute
    reply = server.send(msg.content, kind="train")

    # Assert: it trained, and no A/B number rode in the clear metrics.
    metrics = dict(reply.metric_records["metrics"])
    assert metrics["declined"] == 0
    assert not [k for k in metrics if k.startswith("ab_")]


def test_losses_leave_as_the_cohorts_sum_only(tmp_path) -> None:
    # Prepare: three real devices whose owners share no per-device losses, in a SecAgg+ round
    # that asks for the loss sums; what each would report, computed on its own first.
    from client.federation.device import Device
    from tests.conftest import permissive_policy
    from tests.flower_harness import secagg_device_round

    raw = tiny_run_config(**{"data.num-users": 3, "train.local-steps": 1, "eval.secure-sums": True})
    cfg = parse_run_config(raw)
    policy = permissive_policy(require_secagg=True)
    nodes = {n: device_node_config(tmp_path / f"d{n}", n - 1, 3, policy=policy) for n in (1, 2, 3)}
    own = []
    for n in nodes:
        with open_test_store(tmp_path / f"d{n}") as store:
            own.append(Device(cfg, store=store, num_partitions=3).loss_entry(initial_shared(cfg)))

    # Execute
    grid, strategy = secagg_device_round(raw, nodes, min_updates=3)

    # Assert: the server holds the cohort's number and mean losses, equal to the devices' own
    # within SecAgg+'s quantization; what each device relayed was its masked vector only.
    cohort = strategy.recorder._train[1]["cohort_losses"]
    mean = np.mean(own, axis=0)
    assert cohort["devices"] == 3
    for i, name in enumerate(("base_loss", "global_loss", "personal_loss"), start=1):
        assert cohort[name] == pytest.approx(mean[i], abs=1e-3)
    for _, stage, reply in grid.received:
        if stage == "collect_masked_vectors":
            assert not reply.content.array_records or all(
                not len(r) for r in reply.content.array_records.values()
            )


# ---- the server's code on the device: the executor's sandbox, the passphrase -------------

_PROBE = r"""
import json, os, sys
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "done"
    except Exception as err:
        out[name] = type(err).__name__
attempt("read store", lambda: [open(os.path.join(sys.argv[1], f), "rb").read()
                               for f in os.listdir(sys.argv[1])])
attempt("read key file", lambda: open(sys.argv[2], "rb").read())
attempt("read passphrase file", lambda: open(sys.argv[3], "rb").read())
attempt("read join's environment", lambda: open(f"/proc/{sys.argv[4]}/environ", "rb").read())
attempt("write the venv", lambda: open(os.path.join(sys.prefix, "planted.py"), "w").write("x"))
attempt("read the worker key", lambda: open(sys.argv[5], "rb").read())
print(json.dumps(out))
"""


@pytest.mark.skipif(
    __import__("client.federation.sandbox", fromlist=["problem"]).problem() is not None,
    reason="bubblewrap cannot run here (scripts/browser_setup.sh installs it)",
)
def test_the_clientapp_executor_sandbox_keeps_the_device_out_of_reach(tmp_path, sock_dir) -> None:
    # Prepare: a device's store, key file and passphrase file; a process standing for `join`
    # with the passphrase in its environment; the worker's socket folder with its key.
    import os
    import subprocess
    import sys

    from client.federation.sandbox import sandboxed

    data_dir = tmp_path / "device"
    device_node_config(data_dir, 0, 4)
    key = data_dir.with_name("device.key")
    secret_file = tmp_path / "passphrase"
    secret_file.write_text("correct horse battery staple\n")
    secret_file.chmod(0o600)
    join = subprocess.Popen(
        ["sleep", "60"], env={**os.environ, "FEDPERSONA_PASSPHRASE": "correct horse"}
    )
    home = sock_dir / "clientapp-home"
    home.mkdir()
    (sock_dir / "w.sock.key").write_text("k")
    probe = [sys.executable, "-c", _PROBE, str(data_dir), str(key), str(secret_file)]
    probe += [str(join.pid), str(sock_dir / "w.sock.key")]

    # Execute: the probe as the executor runs, inside the sandbox.
    try:
        command = sandboxed(
            probe, readable=[sock_dir], writable=[home], hidden=[data_dir, key, secret_file],
            home=home,
        )  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    finally:
        join.kill()
        join.wait()

    # Assert: it runs (Python, the venv), reads what a ClientApp needs, and none of the rest.
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["read the worker key"] == "done"
    for what in ("read store", "read key file", "read passphrase file", "write the venv"):
        assert seen[what] != "done", (what, seen)
    assert seen["read join's environment"] in ("FileNotFoundError", "PermissionError"), seen
    assert not Path(sys.prefix, "planted.py").exists()


def test_a_passphrase_file_others_may_read_is_refused(tmp_path, monkeypatch) -> None:
    from common.crypto import PASSPHRASE_FILE_ENV, InsecureKeyFile, resolve_secret

    secret_file = tmp_path / "passphrase"
    secret_file.write_text("correct horse battery staple\n")
    secret_file.chmod(0o644)
    monkeypatch.delenv("FEDPERSONA_PASSPHRASE", raising=False)
    monkeypatch.setenv(PASSPHRASE_FILE_ENV, str(secret_file))
    with pytest.raises(InsecureKeyFile, match="chmod 600"):
        resolve_secret()
    secret_file.chmod(0o600)
    assert resolve_secret().passphrase == "correct horse battery staple"


def test_a_worker_keeps_no_passphrase_in_its_environment(tmp_path, sock_dir) -> None:
    # Prepare: a store under a passphrase, and a worker started with it in its environment.
    import os
    import subprocess
    import sys

    from client.store import LocalStore
    from common.crypto import Secret
    from simulations.simulate import PROJECT_DIR

    phrase = "correct horse battery staple"
    LocalStore.open(tmp_path / "dev", Secret(passphrase=phrase), create=True).close()
    sock = sock_dir / "p.sock"
    cmd = [sys.executable, "-m", "simulations.cli", "device", "worker", "--socket", str(sock)]
    cmd += ["--data-dir", str(tmp_path / "dev"), "--no-preload"]
    proc = subprocess.Popen(
        cmd, cwd=PROJECT_DIR, env={**os.environ, "FEDPERSONA_PASSPHRASE": phrase},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not worker.key_path(sock).exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.2)

        # Execute: what another process of the user reads of it.
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        alive = worker.ping(sock)
    finally:
        _stop(proc)

    # Assert: it runs, unlocked, and its environment holds no passphrase.
    assert alive
    assert phrase.encode() not in environ and b"FEDPERSONA_PASSPHRASE=" not in environ


@pytest.mark.parametrize("order", ["skip key sharing", "replay key sharing", "unmask first"])
def test_secagg_stages_out_of_order_are_refused_before_anything_is_trained(
    tmp_path, device, order
) -> None:
    # Prepare: a server that skips, replays or reorders SecAgg+'s stages (Flower's own stage
    # check refuses these already; the test keeps it so, through the worker).
    raw = tiny_run_config(**CLAIMS)
    server = LyingServer(device(), raw)
    clip = _privatize(raw).clipping_range

    # Execute / Assert: refused with a code; nothing trained, charged or sent.
    with pytest.raises(DeviceError):
        if order == "skip key sharing":
            server.setup(clipping_range=clip)
            server.collect(_shared(raw))
        elif order == "replay key sharing":
            server.setup(clipping_range=clip)
            server.share_keys()
            server.share_keys()
        else:
            server._stage(Stage.UNMASK, {Key.ACTIVE_NODE_ID_LIST: [1], Key.DEAD_NODE_ID_LIST: []})
    assert _ledger(tmp_path)["events"] == []
    assert stored_device_state(tmp_path / "device")["personal"] is None
