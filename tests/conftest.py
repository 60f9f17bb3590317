"""Shared fixtures: tiny-model run configs and a helper to build Flower messages."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import common  # noqa: F401  (first: blocks bitsandbytes before flwr/peft are imported)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run (a failure reproduces); set
# HYPOTHESIS_PROFILE=explore to search with fresh randomness.
settings.register_profile("fedpersona", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fedpersona"))

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from client.api.app import serve_in_background as api_server  # noqa: E402, F401
from client.store import LocalStore  # noqa: E402
from common.config import RunConfig, parse_run_config  # noqa: E402
from common.crypto import Secret  # noqa: E402
from simulations.deployment import device_key  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested TOML tables into Flower's dotted run-config keys."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def default_run_config() -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of pyproject.toml, flattened as Flower does."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return flatten(data["tool"]["flwr"]["app"]["config"])


def tiny_run_config(**overrides: Any) -> dict[str, Any]:
    """Default run config on the tiny model, 4 users, with ``overrides`` (dotted keys)."""
    cfg = default_run_config()
    cfg.update(
        {
            "model.name": "tiny",
            "data.num-users": 4,
            "data.max-seq-len": 48,
            "data.max-test-samples": 4,
            "train.local-steps": 2,
            "train.batch-size": 2,
            "train.learning-rate": 0.05,
        }
    )
    cfg.update(overrides)
    return cfg


@pytest.fixture
def tiny_cfg() -> RunConfig:
    """Parsed tiny run config (strategy ``fedsa``)."""
    return parse_run_config(tiny_run_config())


def make_context(
    run_config: dict[str, Any], node_config: dict[str, Any], run_id: int = 7
) -> Context:
    """A hand-built ClientApp context."""
    return Context(
        run_id=run_id, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config
    )


def make_message(arrays: ArrayRecord, message_type: str, server_round: int = 1) -> Message:
    """A server-to-client message carrying ``arrays`` and the round number."""
    # Flower stamps new messages with the identity of the running task; tests are that task.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
    return Message(content=content, dst_node_id=1, message_type=message_type)


def device_node_config(
    data_dir: Path,
    partition_id: int,
    num_partitions: int,
    *,
    fill: bool = True,
    policy: Any = "test",
) -> dict[str, Any]:
    """Node config of a device whose encrypted store lives in ``data_dir``; with ``fill``, the
    store (created if needed) holds the Shakespeare role ``partition_id`` picks under the tiny
    run config, stored through the import path, unless it already holds examples."""
    if fill:
        fill_store_with_role(data_dir, partition_id, num_partitions, policy=policy)
    return {
        "partition-id": partition_id,
        "num-partitions": num_partitions,
        "data-dir": str(data_dir),
        "key-file": str(device_key(data_dir)),
    }


def fill_store_with_role(
    data_dir: Path, partition_id: int, num_partitions: int, *, policy: Any = "test"
) -> int:
    """Put a role's turns into the store in ``data_dir`` as a user's examples; return how
    many were added (0 if it already held examples). A store without a privacy policy gets
    ``policy`` (default :func:`permissive_policy`; ``None``: none, the device's defaults apply)."""
    from client.federation.policy import DevicePolicy
    from client.federation.simulated import simulated_user
    from client.store.ingest import replay_role

    user = simulated_user(parse_run_config(tiny_run_config()), partition_id, num_partitions)
    with open_test_store(data_dir) as store:
        if policy is not None and DevicePolicy.load(store) is None:
            (permissive_policy() if policy == "test" else policy).save(store)
        return replay_role(store, user)


def permissive_policy(**changes: Any) -> Any:
    """The privacy policy of the in-process tests' devices: their owners accept the tiny
    federation of 4 the tests run, Flower's Message API without SecAgg+, server-added noise and
    rounds with no noise, every device of a cohort honest, and they share their held-out losses
    (tests/test_policy.py and tests/test_dishonest_server.py check the defaults)."""
    from client.federation.policy import DevicePolicy

    accepts = {
        "min_cohort": 1,
        "honest_fraction": 1.0,
        "share_losses": True,
        "require_secagg": False,
        "min_noise_multiplier": 0.0,
        "trust_server_noise": True,
    }
    return DevicePolicy(**{**accepts, **changes})


def open_test_store(data_dir: Path) -> LocalStore:
    """Open (creating) the encrypted store in ``data_dir`` with its key file."""
    return LocalStore.open(data_dir, Secret(key_file=device_key(data_dir)), create=True)


def stored_device_state(data_dir: Path) -> dict[str, Any]:
    """What a device's store holds of its rounds: personal tensors, ledger, device record."""
    with open_test_store(data_dir) as store:
        return {
            "personal": store.get_blob("personal"),
            "ledger": store.get_json("ledger"),
            "device": store.get_json("device"),
        }


def initial_shared(cfg: RunConfig) -> dict[str, Any]:
    """A copy of the initial shared tensors of ``cfg``'s model (what a server sends first)."""
    from client.federation.runtime import get_runtime

    rt = get_runtime(cfg)
    return {n: rt.init[n].clone() for n in rt.shared_names}


def tiny_assistant(data_dir: Path) -> tuple[LocalStore, Any, str]:
    """A fresh tiny-model device in ``data_dir``: its open store, an assistant over it and the
    API token (the caller closes the store)."""
    from client.assistant.assistant import Assistant
    from client.store.state import init_device

    store = open_test_store(data_dir)
    init_device(store, model="tiny")
    return store, Assistant(store), store.get_meta("api_token")


@contextmanager
def served_tiny_assistant(data_dir: Path) -> Iterator[tuple[Any, str, Any, str]]:
    """A fresh tiny-model device (:func:`tiny_assistant`) served by a real uvicorn on
    127.0.0.1: ``(an httpx client on it, the API token, the assistant, the URL)``; the server
    is stopped and the store closed on exit."""
    import httpx

    from client.api.app import create_app

    store, assistant, token = tiny_assistant(data_dir)
    try:
        with (
            api_server(create_app(assistant, token=token)) as url,
            httpx.Client(base_url=url, timeout=120) as client,
        ):
            yield client, token, assistant, url
    finally:
        store.close()


def random_lora_tiny():  # type: ignore[no-untyped-def]
    """A fresh tiny peft model (LoRA on layers 0-1, fedsa) with seeded random LoRA tensors, so
    that every adapter path changes the loss."""
    import torch

    from common.config import ModelConfig
    from common.lora import build_peft_model, get_lora_tensors, load_lora_tensors
    from common.model import load_base_for
    from common.personalization import get_strategy

    cfg = ModelConfig(name="tiny", lora_layers="0-1")
    peft = build_peft_model(load_base_for(cfg), cfg, get_strategy("fedsa"))
    gen = torch.Generator().manual_seed(3)
    load_lora_tensors(
        peft,
        {n: 0.05 * torch.randn(t.shape, generator=gen) for n, t in get_lora_tensors(peft).items()},
    )
    return peft


@contextmanager
def cpu_bf16(kind: str) -> Iterator[None]:
    """This process's CPU answered as ``"native"`` or ``"emulated"`` bf16
    (``$FEDPERSONA_CPU_BF16``), whatever the machine has; restored afterwards."""
    from common.cpu import CPU_BF16_ENV, cpu_has_native_bf16

    before = os.environ.get(CPU_BF16_ENV)
    os.environ[CPU_BF16_ENV] = kind
    cpu_has_native_bf16.cache_clear()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(CPU_BF16_ENV, None)
        else:
            os.environ[CPU_BF16_ENV] = before
        cpu_has_native_bf16.cache_clear()


# A test that takes longer than this on 2 cores must carry the `slow` marker (README,
# "Two commands"); the run's end lists any that does not. A listing, not a failure: tests check
# correctness, and a loaded machine must not turn a correct test red.
SLOW_TEST_S = 120.0
_unmarked_seconds: dict[str, float] = {}


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> None:  # noqa: D103
    # Set-up, call and teardown together.
    if item.get_closest_marker("slow") is None:
        _unmarked_seconds[item.nodeid] = _unmarked_seconds.get(item.nodeid, 0.0) + call.duration


def pytest_terminal_summary(terminalreporter: Any) -> None:  # noqa: D103
    over = {k: v for k, v in _unmarked_seconds.items() if v > SLOW_TEST_S}
    if over:
        terminalreporter.section("tests over 120 s without the slow marker")
        for nodeid, seconds in sorted(over.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"{seconds:7.1f} s  {nodeid}")
