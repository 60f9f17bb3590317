"""Fuzzing the device's attack surface: its local HTTP API and everything it loads from disk.

Two fuzzers, one promise: no input a caller sends and no damage to the files on disk crashes
the device or loses what it stored.

* **API** — schemathesis generates requests for every operation of the app's own OpenAPI spec
  (valid and invalid bodies and parameters), sent in-process to the ASGI app with the device's
  bearer token, without it and with a wrong one. Checks: no 5xx, every response conforms to
  the spec, and afterwards the store still opens, passes its integrity check and keeps the
  ledger, settings, token, interactions and feedback it had.
* **Store loader** — hypothesis feeds bit flips, truncations and arbitrary bytes of
  ``store.db`` and ``store.key`` to :meth:`LocalStore.open`, and arbitrary bytes / JSON to
  the state and ledger decoders: only the documented exceptions, with a message that names
  the problem, the files on disk unchanged, and the good state still loading afterwards.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
import schemathesis
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from safetensors.torch import save
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from client.api.app import create_app
from client.assistant.assistant import Assistant
from client.federation.device import SETTINGS_BLOB
from client.federation.ledger import LEDGER_BLOB, PrivacyLedger
from client.store import DB_FILE, KEY_FILE, LocalStore, StoreCorrupted, key_beside
from client.store.state import (
    META_BLOB,
    PERSONAL_BLOB,
    DeviceState,
    init_device,
    tensors_from_bytes,
)
from common.config import PrivacyCaps
from common.crypto import Secret, WrongKey
from tests.conftest import device_key, open_test_store

CHECKS = [not_a_server_error, response_schema_conformance]
# A valid request to /v1/forget erases the store (tests/test_openai_client.py checks it).
UNFUZZED = ("/v1/forget",)
OPERATIONS = 15  # every operation of the spec but UNFUZZED
PROTECTED = ("/v1/", "/metrics")
# Generation cost: the tiny model samples every token on the CPU, so the assistant behind the
# API samples at most this many candidates and tokens, whatever a valid request asked for
# (up to 8 x 1024). The API's own validation still sees the request as sent.
MAX_CANDIDATES, MAX_NEW_TOKENS = 2, 4
# Examples per operation and generation mode; generation and feedback adaptation dominate.
EXAMPLES = {"/v1/chat/completions": 8, "/v1/feedback": 10}
DEFAULT_EXAMPLES = 15
API_SETTINGS = settings(
    deadline=None,
    database=None,
    # A failing request is reported as generated: shrinking re-runs the model for minutes.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
LOADER_SETTINGS = settings(
    deadline=None,
    max_examples=40,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
PAGE = 4096  # SQLCipher 4's page size
# Messages the clean loader errors carry: each names what is wrong and what to do.
STORE_MESSAGES = ("altered or damaged", "wrapped key", "cannot unlock", "restore", "unlocked with")


# ---- shared device ------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """What a device must never lose, whatever requests it serves."""

    ledger: bytes
    settings: bytes
    token: str
    personal: bytes
    personal_shapes: dict[str, tuple[int, ...]]
    interactions: dict[int, str]
    feedback: list[int]


@dataclass
class Device:
    """One initialized device (tiny model) with a little history, served by the local API."""

    root: Path
    store: LocalStore
    assistant: Assistant
    token: str
    before: Snapshot


def _snapshot(store: LocalStore) -> Snapshot:
    personal = store.get_blob(PERSONAL_BLOB) or b""
    return Snapshot(
        ledger=store.get_blob(LEDGER_BLOB) or b"",
        settings=store.get_blob(SETTINGS_BLOB) or b"",
        token=store.get_meta("api_token") or "",
        personal=personal,
        personal_shapes={
            n: tuple(t.shape) for n, t in tensors_from_bytes(personal, "personal").items()
        },
        interactions={i.id: i.prompt for i in store.interactions()},
        feedback=[f.id for f in store.feedback()],
    )


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Device]:
    """A device with an interaction, feedback, a charged ledger and a personal adapter."""
    root = tmp_path / "dev"
    store = open_test_store(root)
    init_device(store, model="tiny")
    assistant = Assistant(store)
    first = store.add_interaction("How do I bake bread?", "Knead, rise, bake.")
    store.add_feedback(first, "rating", value=3.0)
    p = assistant.cfg.privacy
    ledger = PrivacyLedger(PrivacyCaps(delta=p.delta, accountant=p.accountant))
    ledger.charge(server_round=1, record=(1.1, 0.05, 10), user=(0.8, 1.0, 1), now=1.0)
    ledger.save(store)
    gen = torch.Generator().manual_seed(0)
    assistant.state.save_personal(
        {
            n: 0.01 * torch.randn(assistant.rt.shapes[n], generator=gen)
            for n in assistant.rt.personal_names
        }
    )
    token = store.get_meta("api_token")
    assert token is not None
    ask = assistant.ask

    def capped_ask(request: str, *, n: int, max_new_tokens: int, **kwargs: Any) -> Any:
        n, max_new_tokens = min(n, MAX_CANDIDATES), min(max_new_tokens, MAX_NEW_TOKENS)
        return ask(request, n=n, max_new_tokens=max_new_tokens, **kwargs)

    assistant.ask = capped_ask  # type: ignore[method-assign]
    yield Device(root, store, assistant, token, _snapshot(store))
    store.close()


def _assert_nothing_lost(dev: Device, *, adapted: bool) -> None:
    """Reopen the store (integrity check included) and compare it with ``dev.before``.

    Args:
        dev: The fuzzed device (its store is closed here).
        adapted: Whether a valid feedback request may have trained the personal adapter.
    """
    dev.store.close()
    with LocalStore.open(dev.root, Secret(key_file=device_key(dev.root))) as store:
        assert store._query("PRAGMA integrity_check") == [("ok",)]  # SQLite's own, too
        after = _snapshot(store)
        assert json.loads(after.ledger)["events"] == json.loads(dev.before.ledger)["events"]
        assert after.ledger == dev.before.ledger
        assert after.settings == dev.before.settings
        assert after.token == dev.before.token
        assert after.personal_shapes == dev.before.personal_shapes
        if not adapted:
            assert after.personal == dev.before.personal
        for iid, prompt in dev.before.interactions.items():
            assert after.interactions.get(iid) == prompt, f"interaction {iid} lost or changed"
        assert set(dev.before.feedback) <= set(after.feedback)
        # Everything still decodes, and a fresh assistant starts on it.
        personal = tensors_from_bytes(after.personal, "personal")
        assert all(bool(torch.isfinite(t).all()) for t in personal.values())
        fresh = Assistant(store)
        assert fresh.variant in ("global", "personal")
        assert fresh.budget()["rounds_charged"] == 1


# ---- the local HTTP API -------------------------------------------------------------------


def _existing_interaction(drawn: tuple[Any, bool, int]) -> Any:
    """The case, its ``interaction_id`` (when it has a valid one) set to ``iid`` if ``hit``."""
    case, hit, iid = drawn
    body = case.body
    if hit and isinstance(body, dict) and type(body.get("interaction_id")) is int:
        body["interaction_id"] = iid
    return case


def _fuzz_every_operation(
    dev: Device, modes: list[GenerationMode], headers: dict[str, str], assert_response: Any
) -> Counter[tuple[str, str, int]]:
    """Send generated requests to every operation; return how often each status came back.

    Args:
        dev: The device whose API is fuzzed.
        modes: Valid (``POSITIVE``) and/or invalid (``NEGATIVE``) requests.
        headers: Sent with every request (the bearer token, a wrong one, or none).
        assert_response: Called with each ``(case, response)`` for test-specific asserts.

    Raises:
        FailureGroup: A 5xx or a response that does not conform to the spec.
    """
    app = create_app(dev.assistant, token=dev.token)
    spec = app.openapi()
    schema = schemathesis.openapi.from_dict(spec)
    schema.app = app
    seen: Counter[tuple[str, str, int]] = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path in UNFUZZED:
            continue
        definition = spec["paths"][operation.path][operation.method.lower()]
        # An operation without a body or parameters has no invalid form to generate.
        has_input = "requestBody" in definition or "parameters" in definition
        cases = st.sampled_from(modes if has_input else [GenerationMode.POSITIVE]).flatmap(
            lambda m, op=operation: op.as_strategy(generation_mode=m)
        )
        if operation.path == "/v1/feedback":
            # Half the feedback goes to interactions that exist, so adaptation runs too.
            cases = st.tuples(cases, st.booleans(), st.integers(1, 4)).map(_existing_interaction)

        @settings(API_SETTINGS, max_examples=EXAMPLES.get(operation.path, DEFAULT_EXAMPLES))
        @given(case=cases)
        def fuzz(case: Any) -> None:
            # Addressed to the loopback, as every real client of the device is (the API
            # refuses other Host names: tests/test_api_hardening.py).
            response = case.call_and_validate(
                headers={"Host": "127.0.0.1", **headers}, checks=CHECKS, timeout=60
            )
            seen[(case.method, case.path, response.status_code)] += 1
            assert_response(case, response)

        fuzz()
    return seen


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_with_the_token_never_fails_and_loses_nothing(device: Device, mode) -> None:
    # Prepare
    headers = {"Authorization": f"Bearer {device.token}"}

    def refused_only_without_it(case: Any, response: Any) -> None:
        # Invalid requests include ones that leave the bearer header out on purpose.
        if response.request.headers.get("Authorization") == headers["Authorization"]:
            assert response.status_code != 401, response.text
        else:
            assert response.status_code == 401, response.text

    # Execute: generated requests to every operation, checked for 5xx and spec conformance.
    seen = _fuzz_every_operation(device, [mode], headers, refused_only_without_it)

    # Assert: every operation was exercised, and the store kept what it had.
    assert len({(m, p) for m, p, _ in seen}) == OPERATIONS, seen
    adapted = any(p == "/v1/feedback" and s == 200 for _, p, s in seen)
    _assert_nothing_lost(device, adapted=adapted)


@pytest.mark.parametrize("auth", [None, "Bearer " + "x" * 43, "Basic dXNlcjpwYXNz"])
def test_api_without_the_token_answers_401_and_changes_nothing(device: Device, auth) -> None:
    # Prepare
    headers = {} if auth is None else {"Authorization": auth}
    profile = device.store.get_profile()

    def refused(case: Any, response: Any) -> None:
        # Invalid requests may carry a generated Authorization header of their own: also refused.
        if case.path.startswith(PROTECTED):
            assert response.status_code == 401, response.text
            assert response.headers.get("www-authenticate") == ["Bearer"]
            assert "fedpersona device token" in response.text
        else:
            assert response.status_code == 200, response.text

    # Execute
    seen = _fuzz_every_operation(device, list(GenerationMode), headers, refused)

    # Assert: requests reached every operation, and nothing at all changed.
    assert len({(m, p) for m, p, _ in seen}) == OPERATIONS, seen
    assert device.store.get_profile() == profile
    assert device.store.count_interactions() == len(device.before.interactions)
    assert [f.id for f in device.store.feedback()] == device.before.feedback
    _assert_nothing_lost(device, adapted=False)


# What the fuzzer found (minimal forms): each was a 500, or a 422 outside the spec.
FINDINGS: list[tuple[str, str, dict[str, Any], str]] = [
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "temperature": 1e-100},
        "greater than or equal to 0.01",
    ),
    ("POST", "/v1/feedback", {"interaction_id": 2**70, "reject": True}, "less than or equal"),
    ("PUT", "/v1/profile", {"p": 1}, "unknown profile key(s) ['p']"),
    ("PUT", "/v1/profile", {"tone": "angry"}, "profile.tone must be one of"),
]


def test_fuzz_findings_get_a_400_in_the_documented_shape(device: Device) -> None:
    # Prepare
    client = TestClient(
        create_app(device.assistant, token=device.token), base_url="http://127.0.0.1"
    )
    headers = {"Authorization": f"Bearer {device.token}"}
    profile = device.store.get_profile()

    for method, path, body, message in FINDINGS:
        # Execute
        reply = client.request(method, path, json=body, headers=headers)

        # Assert: OpenAI's error object, with the problem named.
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert message in error["message"], error

    # Assert: nothing was stored.
    assert device.store.get_profile() == profile
    assert device.store.count_interactions() == len(device.before.interactions)
    _assert_nothing_lost(device, adapted=False)


# ---- the store loader ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A closed store with a profile, interactions, a ledger and a personal blob."""
    root = tmp_path_factory.mktemp("golden") / "dev"
    with open_test_store(root) as store:
        store.put_profile({"tone": "formal"})
        for i in range(40):
            store.add_interaction(f"question {i} " * 5, f"answer {i} " * 20)
        PrivacyLedger(PrivacyCaps()).save(store)
        store.put_blob(PERSONAL_BLOB, save({"w": torch.ones(4, 4)}))
    assert (root / DB_FILE).stat().st_size >= 4 * PAGE
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def _clone(golden: Path, into: Path) -> Path:
    """A fresh copy of the golden store in ``into``, with the same key file beside it."""
    if into.exists():
        shutil.rmtree(into)
    shutil.copytree(golden, into)
    key = key_beside(into)  # where device_key() looks
    if not key.exists():
        shutil.copy2(device_key(golden), key)
    return into


def _open_must_refuse_or_succeed(root: Path) -> None:
    """Open the (damaged) store: a documented error with a helpful message, or a sound store.

    Either way the files on disk are byte-for-byte unchanged by a refused open.
    """
    before = _files(root)
    try:
        store = LocalStore.open(root, Secret(key_file=device_key(root)))
    except (StoreCorrupted, WrongKey) as err:
        assert any(m in str(err) for m in STORE_MESSAGES), str(err)
        assert _files(root) == before, "a refused open changed the files"
    else:
        # Damage that leaves every authenticated page intact (e.g. trailing bytes) is fine,
        # as long as the data is all there.
        with store:
            assert store.get_profile() == {"tone": "formal"}
            assert store.count_interactions() == 40


@pytest.mark.timeout(120)
@LOADER_SETTINGS
@given(data=st.data())
def test_damaged_database_is_refused_cleanly(golden: Path, tmp_path: Path, data) -> None:
    # Prepare: one kind of damage to store.db.
    root = _clone(golden, tmp_path / "dev")
    db = root / DB_FILE
    raw = bytearray(db.read_bytes())
    kinds = ["flip", "truncate", "whole pages", "append", "garbage", "splice"]
    kind = data.draw(st.sampled_from(kinds), label="kind")
    if kind == "flip":
        for pos in data.draw(st.lists(st.integers(0, len(raw) * 8 - 1), min_size=1, max_size=4)):
            raw[pos // 8] ^= 1 << (pos % 8)
    elif kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    elif kind == "whole pages":  # every remaining page still passes its HMAC
        raw = raw[: PAGE * data.draw(st.integers(1, len(raw) // PAGE - 1), label="pages")]
    elif kind == "append":
        raw += data.draw(st.binary(min_size=1, max_size=2 * PAGE), label="bytes")
    elif kind == "garbage":
        raw = bytearray(data.draw(st.binary(max_size=9000), label="bytes"))
    else:
        at = data.draw(st.integers(0, len(raw)), label="at")
        raw[at : at + 16] = data.draw(st.binary(min_size=1, max_size=64), label="bytes")
    db.write_bytes(bytes(raw))

    # Execute / Assert
    _open_must_refuse_or_succeed(root)


@pytest.mark.timeout(120)
@LOADER_SETTINGS
@given(data=st.data())
def test_damaged_wrapped_key_is_refused_cleanly(golden: Path, tmp_path: Path, data) -> None:
    # Prepare: damage store.key, as bytes or as a JSON record with one field replaced.
    root = _clone(golden, tmp_path / "dev")
    key = root / KEY_FILE
    raw = bytearray(key.read_bytes())
    kind = data.draw(st.sampled_from(["flip", "truncate", "garbage", "field"]), label="kind")
    if kind == "flip":
        for pos in data.draw(st.lists(st.integers(0, len(raw) * 8 - 1), min_size=1, max_size=3)):
            raw[pos // 8] ^= 1 << (pos % 8)
    elif kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    elif kind == "garbage":
        raw = bytearray(data.draw(st.binary(max_size=400), label="bytes"))
    else:
        record = json.loads(raw)
        name = data.draw(st.sampled_from(sorted(record)), label="field")
        record[name] = data.draw(_json_values(), label="value")
        raw = bytearray(json.dumps(record).encode())
    key.write_bytes(bytes(raw))

    # Execute / Assert: refused cleanly, or (a no-op change such as hex case) the same data.
    _open_must_refuse_or_succeed(root)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("p", 10**6, "scrypt"),
        ("n", 2**40, "scrypt"),
        ("r", 2**20, "scrypt"),
        ("n", None, "scrypt"),
        ("n", 1000, "scrypt"),
        ("p", 0, "scrypt"),
        ("salt", "zz", "corrupted"),
        ("wrapped", 5, "corrupted"),
        ("kdf", "key-file", "unlocked with"),
    ],
)
def test_passphrase_key_with_tampered_kdf_parameters_fails_fast(
    tmp_path: Path, field: str, value: Any, message: str
) -> None:
    # Prepare: scrypt parameters are authenticated only after the KDF ran, so absurd ones
    # must be refused before any work is done.
    secret = Secret(passphrase="correct horse battery staple")
    root = tmp_path / "dev"
    LocalStore.create(root, secret).close()
    record = json.loads((root / KEY_FILE).read_text())
    record[field] = value
    (root / KEY_FILE).write_text(json.dumps(record))
    before = _files(root)

    # Execute
    with pytest.raises(WrongKey) as err:  # refused before scrypt runs (see the timeout)
        LocalStore.open(root, secret)

    # Assert
    assert message in str(err.value)
    assert _files(root) == before


def test_missing_or_empty_database_beside_a_key_is_not_a_new_store(golden, tmp_path) -> None:
    # Prepare
    root = _clone(golden, tmp_path / "dev")
    (root / DB_FILE).write_bytes(b"")

    # Execute / Assert: an emptied database is damage, not an invitation to start over.
    with pytest.raises(StoreCorrupted, match="empty"):
        LocalStore.open(root, Secret(key_file=device_key(root)))
    assert (root / DB_FILE).read_bytes() == b""
    (root / DB_FILE).unlink()
    with pytest.raises(StoreCorrupted, match="missing"):
        LocalStore.open(root, Secret(key_file=device_key(root)))
    assert not (root / DB_FILE).exists()


# ---- the state and ledger decoders --------------------------------------------------------


def _json_values() -> st.SearchStrategy[Any]:
    """Any JSON value, NaN and infinities and huge numbers included."""
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.text(max_size=20)
    )
    return st.recursive(
        scalars,
        lambda kids: (
            st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
        ),
        max_leaves=12,
    )


@dataclass
class StateStore:
    """An open store holding a good device record, personal tensors and ledger."""

    store: LocalStore
    good: dict[str, bytes]

    def state(self) -> DeviceState:
        """The device state as the device opens it."""
        return DeviceState(self.store, user="u1", strategy="fedsa", model="tiny", lora="r8")

    def assert_good_state_loads(self) -> None:
        """Put the good blobs back and check that everything loads exactly as it was."""
        for name, data in self.good.items():
            self.store.put_blob(name, data)
        state = self.state()
        assert (state.meta.rounds_trained, state.meta.history) == (2, [{"round": 1, "loss": 1.5}])
        personal = state.load_personal()
        assert personal is not None and set(personal) == {"a", "b"}
        assert torch.equal(personal["a"], torch.ones(2, 3))
        assert len(PrivacyLedger.load(self.store, PrivacyCaps()).events) == 2


@pytest.fixture
def state_store(tmp_path: Path) -> Iterator[StateStore]:
    """A :class:`StateStore` in ``tmp_path``."""
    with open_test_store(tmp_path / "dev") as store:
        state = DeviceState(store, user="u1", strategy="fedsa", model="tiny", lora="r8")
        state.meta.rounds_trained = 2
        state.meta.history.append({"round": 1, "loss": 1.5})
        state.save_meta()
        state.save_personal({"a": torch.ones(2, 3), "b": torch.zeros(4)})
        ledger = PrivacyLedger(PrivacyCaps())
        ledger.charge(server_round=1, record=(1.1, 0.05, 10), user=(0.8, 1.0, 1), now=1.0)
        ledger.save(store)
        good = {n: store.get_blob(n) or b"" for n in (META_BLOB, PERSONAL_BLOB, LEDGER_BLOB)}
        yield StateStore(store, good)


def _safetensors_like() -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, and well-framed safetensors with a fuzzed header or payload."""

    @st.composite
    def framed(draw: st.DrawFn) -> bytes:
        header = draw(
            st.dictionaries(
                st.sampled_from(["w", "__metadata__", "x.lora_A.default.weight"]),
                st.fixed_dictionaries(
                    {
                        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "F8", "X"]),
                        "shape": st.lists(st.integers(0, 2**40), max_size=3),
                        "data_offsets": st.lists(st.integers(-1, 2**40), min_size=2, max_size=2),
                    }
                )
                | _json_values(),
                max_size=3,
            )
        )
        text = json.dumps(header).encode()
        size = draw(st.sampled_from([len(text), len(text) + 1, 2**63, 0]))
        payload = draw(st.binary(max_size=64))
        return size.to_bytes(8, "little") + text + payload

    @st.composite
    def valid_but_odd(draw: st.DrawFn) -> bytes:
        value = draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e30, 0.0]))
        dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]))
        return save({"w": torch.full((2, 2), value).to(dtype)})

    return st.binary(max_size=200) | framed() | valid_but_odd()


@pytest.mark.timeout(120)
@LOADER_SETTINGS
@given(blob=_safetensors_like())
def test_personal_tensor_decoder_rejects_bad_bytes_cleanly(state_store: StateStore, blob: bytes):
    # Prepare
    state_store.store.put_blob(PERSONAL_BLOB, blob)
    state = state_store.state()

    # Execute
    try:
        tensors = state.load_personal()
    except ValueError as err:
        # Assert: the error says which blob is bad.
        assert "corrupted personal tensors" in str(err)
    else:
        # Assert: whatever decodes is usable — float32 and finite.
        assert tensors is not None
        assert all(t.dtype == torch.float32 for t in tensors.values())
        assert all(bool(torch.isfinite(t).all()) for t in tensors.values())
    state_store.assert_good_state_loads()


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_personal_tensors_are_named(state_store: StateStore, value: float) -> None:
    # Prepare
    bad = save({"a": torch.ones(2), "b": torch.tensor([1.0, value])})
    state_store.store.put_blob(PERSONAL_BLOB, bad)
    state = state_store.state()

    # Execute / Assert
    with pytest.raises(ValueError, match="corrupted personal tensors.*'b'.*non-finite"):
        state.load_personal()
    state_store.assert_good_state_loads()


def _device_records() -> st.SearchStrategy[Any]:
    """The good device record with fields replaced, dropped or added, or any JSON at all."""
    good = {
        "user": "u1",
        "strategy": "fedsa",
        "model": "tiny",
        "lora": "r8",
        "base_loss": None,
        "rounds_trained": 2,
        "last_round": 1,
        "global_loss": None,
        "personal_loss": None,
        "history": [],
    }

    @st.composite
    def mutated(draw: st.DrawFn) -> dict[str, Any]:
        record = dict(good)
        for name in draw(st.lists(st.sampled_from([*good, "extra"]), min_size=1, max_size=3)):
            if draw(st.booleans()) and name in record:
                del record[name]
            else:
                record[name] = draw(_json_values())
        return record

    return mutated() | _json_values()


def _raw_blobs(values: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """JSON documents (NaN allowed, as Python writes it), invalid UTF-8 and deep nesting."""
    return (
        values.map(lambda v: json.dumps(v).encode())
        | st.binary(max_size=64)
        | st.integers(1, 100_000).map(lambda n: b"[" * n + b"]" * n)
    )


def _is_clean_device_meta(meta: Any) -> bool:
    def number(v: Any) -> bool:
        return v is None or type(v) in (int, float)

    return (
        all(type(getattr(meta, k)) is str for k in ("user", "strategy", "model", "lora"))
        and all(number(getattr(meta, k)) for k in ("base_loss", "global_loss", "personal_loss"))
        and all(type(getattr(meta, k)) is int for k in ("rounds_trained", "last_round"))
        and isinstance(meta.history, list)
        and all(isinstance(h, dict) for h in meta.history)
    )


@pytest.mark.timeout(120)
@LOADER_SETTINGS
@given(blob=_raw_blobs(_device_records()))
def test_device_record_decoder_rejects_bad_json_cleanly(state_store: StateStore, blob: bytes):
    # Prepare
    state_store.store.put_blob(META_BLOB, blob)

    # Execute
    try:
        state = state_store.state()
    except ValueError as err:
        # Assert: the message names the device state and, for a bad field, the field.
        assert "device state" in str(err), str(err)
    else:
        # Assert: a record that loads is well-typed — no string where a count belongs.
        assert _is_clean_device_meta(state.meta), state.meta
    state_store.assert_good_state_loads()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rounds_trained", "3"),
        ("last_round", -1),
        ("history", {"round": 1}),
        ("global_loss", [0.5]),
        ("base_loss", "low"),
        ("user", 7),
    ],
)
def test_device_record_names_the_bad_field(state_store: StateStore, field: str, value: Any) -> None:
    # Prepare
    record = json.loads(state_store.good[META_BLOB])
    record[field] = value
    state_store.store.put_blob(META_BLOB, json.dumps(record).encode())

    # Execute / Assert
    with pytest.raises(ValueError, match=f"device state.*{field}"):
        state_store.state()
    state_store.assert_good_state_loads()


def _ledger_states() -> st.SearchStrategy[Any]:
    """The good ledger state with top-level or event fields replaced, or any JSON at all."""
    event = {
        "kind": "record",
        "time": 1.0,
        "round": 1,
        "noise_multiplier": 1.1,
        "sample_rate": 0.05,
        "steps": 10,
    }

    @st.composite
    def mutated(draw: st.DrawFn) -> dict[str, Any]:
        state: dict[str, Any] = {
            "version": 1,
            "accountant": "rdp",
            "delta": 1e-5,
            "events": [dict(event)],
            "declined": [{"round": 2, "time": 2.0, "reason": "budget"}],
        }
        where = draw(st.sampled_from(["top", "event", "declined"]))
        if where == "top":
            state[draw(st.sampled_from(sorted(state)))] = draw(_json_values())
        elif where == "event":
            state["events"][0][draw(st.sampled_from(sorted(event)))] = draw(_json_values())
        else:
            state["declined"][0] = draw(_json_values())
        return state

    return mutated() | _json_values()


@pytest.mark.timeout(120)
@LOADER_SETTINGS
@given(blob=_raw_blobs(_ledger_states()))
def test_ledger_decoder_rejects_bad_json_cleanly(state_store: StateStore, blob: bytes) -> None:
    # Prepare
    state_store.store.put_blob(LEDGER_BLOB, blob)

    # Execute
    try:
        ledger = PrivacyLedger.load(state_store.store, PrivacyCaps())
    except ValueError as err:
        # Assert: the message says it is the ledger that is bad.
        assert "ledger" in str(err), str(err)
    else:
        # Assert: a ledger that loads gives a real ε for both kinds (∞ only for σ = 0).
        summary = ledger.summary()
        assert not math.isnan(summary["record_epsilon"] + summary["user_epsilon"]), summary
        assert ledger.rounds_charged() == len(
            {(e["run"], e["round"]) for e in ledger.events if e["kind"] == "user"}
        )
    state_store.assert_good_state_loads()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("events",), 5, "events"),
        (("events", 0, "noise_multiplier"), math.nan, "noise_multiplier"),
        (("events", 0, "steps"), "10", "steps"),
        (("events", 0, "sample_rate"), None, "sample_rate"),
        (("declined",), [1], "declined"),
        (("delta",), None, "δ"),
    ],
)
def test_ledger_names_the_bad_value_and_stays_unchanged(path: tuple, value: Any, message: str):
    # Prepare
    ledger = PrivacyLedger(PrivacyCaps())
    ledger.charge(server_round=1, record=(1.1, 0.05, 10), user=None, now=1.0)
    good = ledger.state_dict()
    bad = json.loads(json.dumps(good))
    target = bad
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value

    # Execute / Assert: refused with the value named, and the ledger is untouched.
    with pytest.raises(ValueError, match=message):
        ledger.load_state_dict(bad)
    assert ledger.state_dict() == good
