"""``fedpersona simulate``'s set-up checks that run before any process starts."""

from __future__ import annotations

import datetime
import os

import pytest

from simulations.simulate import (
    AF_UNIX_MAX,
    RAY_DIR_PREFIX,
    is_fedpersona_line,
    ray_socket_path_bound,
    ray_temp_base,
    simulate,
)


def _worst_ray_socket(ray_tmpdir: str) -> str:
    """The longest socket path Ray 2.x makes: 7-digit PID, microsecond timestamp."""
    date = datetime.datetime(2026, 12, 31, 23, 59, 59, 999999).strftime("%Y-%m-%d_%H-%M-%S_%f")
    return os.path.join(ray_tmpdir, "ray", f"session_{date}_4194304", "sockets", "plasma_store")


def test_the_bound_covers_rays_worst_socket_path_with_a_margin() -> None:
    ray_tmpdir = f"/tmp/{RAY_DIR_PREFIX}abcd1234"
    worst = _worst_ray_socket(ray_tmpdir)
    bound = ray_socket_path_bound(ray_tmpdir)
    assert len(worst.encode()) < bound <= AF_UNIX_MAX
    assert bound - len(worst.encode()) >= 8  # room for ".<n>" suffixes and longer names


@pytest.mark.parametrize(
    ("environ", "base"),
    [
        ({}, "/tmp"),
        ({"TMPDIR": "/var/tmp"}, "/var/tmp"),
        ({"TMPDIR": "/var/tmp", "RAY_TMPDIR": "/scratch"}, "/scratch"),
    ],
)
def test_the_base_follows_rays_own_order(environ: dict[str, str], base: str) -> None:
    assert str(ray_temp_base(environ)) == base


def test_a_long_tmpdir_is_refused_with_the_fix(tmp_path) -> None:
    long_tmp = "/" + "t" * 40
    with pytest.raises(ValueError, match=r"\$TMPDIR=.*too long.*RAY_TMPDIR") as err:
        ray_temp_base({"TMPDIR": long_tmp})
    assert str(AF_UNIX_MAX) in str(err.value)
    # The longest accepted base still keeps every socket path within the limit.
    limit = int(str(err.value).split("at most ")[1].split(" ")[0])
    ray_temp_base({"RAY_TMPDIR": "/" + "t" * (limit - 1)})
    with pytest.raises(ValueError):
        ray_temp_base({"RAY_TMPDIR": "/" + "t" * limit})
    path = "/" + "t" * (limit - 1) + f"/{RAY_DIR_PREFIX}abcd1234"
    assert len(_worst_ray_socket(path).encode()) <= AF_UNIX_MAX


def test_simulate_refuses_a_long_tmpdir_before_starting_anything(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path / ("x" * 60)))
    with pytest.raises(ValueError, match="too long for Ray"):
        simulate("tiny", {}, tmp_path / "runs", run_name="never")
    assert not (tmp_path / "runs").exists()


def test_only_the_serverapps_own_records_are_echoed() -> None:
    assert is_fedpersona_line("\x1b[92mINFO \x1b[0m:      fedpersona: strategy=fedsa model=tiny")
    assert is_fedpersona_line("INFO :      fedpersona round 2: train_loss=4.1")
    assert is_fedpersona_line("WARNING :   fedpersona: resuming run after round 1 of 3")
    for other in (
        "/home/u/fedpersona/.venv/lib/python3.11/site-packages/ray/_private/worker.py:2051: ",
        "FutureWarning: Tip: In future versions of Ray, Ray will no longer override",
        "Successfully installed fedpersona to /home/u/fedpersona/runs/x/.flwr/apps/fedpersona",
        "Using SuperLink: fedpersona-sim (127.0.0.1:55361)",
    ):
        assert not is_fedpersona_line(other)


def test_users_who_never_joined_are_measured_on_the_released_model(tmp_path) -> None:
    # Prepare: a finished two-user run whose released global adapter moved away from init.
    import json

    import numpy as np

    from client.federation.runtime import get_runtime
    from common.config import parse_run_config
    from server import checkpoint
    from simulations.cold_start import add_to_summary
    from tests.conftest import tiny_run_config

    cfg = parse_run_config(
        tiny_run_config(**{"data.num-users": 2, "personalization.strategy": "blend"})
    )
    rt = get_runtime(cfg)
    gen = np.random.default_rng(0)
    shared = [
        rt.init[n].numpy() + 0.01 * gen.standard_normal(rt.shapes[n]) for n in rt.shared_names
    ]
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"config": cfg.to_dict(), "clients": []}))
    checkpoint.save(
        run,
        checkpoint.ServerState(
            round=1,
            shared_names=list(rt.shared_names),
            shared=[a.astype(np.float32) for a in shared],
            config=cfg.to_flat(),
        ),
    )

    # Execute
    result = add_to_summary(run, 3)

    # Assert: three users beyond the federation's two, each with base and released losses.
    from client.federation.simulated import simulated_user

    assert [c["user"] for c in result["clients"]] == [
        simulated_user(cfg, pid, 5).user for pid in (2, 3, 4)
    ]
    assert all(c["global_loss"] != c["base_loss"] for c in result["clients"])
    assert 0.0 <= result["below_base"] <= 1.0
    assert json.loads((run / "summary.json").read_text())["cold_start_users"]["users"] == 3
