"""The encrypted device store: round trip, wrong keys, tampering, crashes, retention, forget."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from client.store import (
    DAY,
    DB_FILE,
    KEY_FILE,
    MIGRATIONS,
    SCHEMA_VERSION,
    LocalStore,
    StoreCorrupted,
    StoreError,
    StoreNotFound,
)
from common.crypto import InsecureKeyFile, Secret, WrongKey, create_key_file
from tests.conftest import ROOT, open_test_store

PASS = Secret(passphrase="correct horse battery staple")


def _new(tmp_path, secret=PASS, **kw) -> LocalStore:
    return LocalStore.create(tmp_path / "dev", secret, **kw)


def test_round_trip_through_a_reopen(tmp_path) -> None:
    # Prepare
    emb = np.linspace(-1, 1, 384, dtype=np.float32)
    with _new(tmp_path) as store:
        store.put_profile({"tone": "formal"})
        first = store.add_interaction("How do I bake bread?", "Knead, rise, bake.", embedding=emb)
        store.add_feedback(first, "rating", value=5.0)
        store.put_blob("personal", b"\x00\x01tensor-bytes")
        store.put_json("ledger", {"events": [1, 2]})

    # Execute
    with LocalStore.open(tmp_path / "dev", PASS) as store:
        inter = store.get_interaction(first)

        # Assert
        assert store.schema_version == SCHEMA_VERSION
        assert store.get_profile() == {"tone": "formal"}
        assert (inter.prompt, inter.response) == ("How do I bake bread?", "Knead, rise, bake.")
        np.testing.assert_array_equal(inter.embedding, emb)
        assert [(f.kind, f.value) for f in store.feedback()] == [("rating", 5.0)]
        assert store.get_blob("personal") == b"\x00\x01tensor-bytes"
        assert store.get_json("ledger") == {"events": [1, 2]}


def test_text_is_scrubbed_before_it_is_stored(tmp_path) -> None:
    with _new(tmp_path) as store:
        iid = store.add_interaction("Mail me at jane.doe@example.com", "Sure, Mr. Smith.")
        store.add_feedback(iid, "edit", text="Call 415-555-0132 instead")
        inter = store.get_interaction(iid)
        assert "jane.doe@example.com" not in inter.prompt and "[EMAIL]" in inter.prompt
        assert "Smith" not in inter.response
        assert "415-555-0132" not in store.feedback()[0].text


def test_wrong_passphrase_and_wrong_key_file_are_refused(tmp_path) -> None:
    _new(tmp_path).close()
    with pytest.raises(WrongKey, match="wrong passphrase"):
        LocalStore.open(tmp_path / "dev", Secret(passphrase="not the passphrase"))
    key = create_key_file(tmp_path / "other.key")
    with pytest.raises(WrongKey, match="unlocked with a passphrase"):
        LocalStore.open(tmp_path / "dev", Secret(key_file=key))
    # The store is intact afterwards.
    with LocalStore.open(tmp_path / "dev", PASS) as store:
        assert store.schema_version == SCHEMA_VERSION


def test_key_file_must_be_private(tmp_path) -> None:
    key = create_key_file(tmp_path / "k.key")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    _new(tmp_path, Secret(key_file=key)).close()
    key.chmod(0o644)
    with pytest.raises(InsecureKeyFile, match="chmod 600"):
        LocalStore.open(tmp_path / "dev", Secret(key_file=key))


@pytest.mark.parametrize("where", ["header", "middle", "last page"])
def test_one_flipped_byte_in_the_database_is_detected(tmp_path, where) -> None:
    # Prepare: enough rows for several pages, then flip one byte.
    with _new(tmp_path) as store:
        for i in range(200):
            store.add_interaction(f"question {i} " * 5, f"answer {i} " * 20)
    path = tmp_path / "dev" / DB_FILE
    data = bytearray(path.read_bytes())
    offset = {"header": 100, "middle": len(data) // 2 + 7, "last page": len(data) - 40}[where]
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))

    # Execute / Assert
    with pytest.raises(StoreCorrupted, match="altered or damaged"):
        LocalStore.open(tmp_path / "dev", PASS)


def test_a_flipped_byte_in_the_wrapped_key_is_detected(tmp_path) -> None:
    _new(tmp_path).close()
    path = tmp_path / "dev" / KEY_FILE
    record = json.loads(path.read_text())
    wrapped = bytearray(bytes.fromhex(record["wrapped"]))
    wrapped[20] ^= 0x80
    path.write_text(json.dumps({**record, "wrapped": wrapped.hex()}))
    with pytest.raises(WrongKey, match="tampered"):
        LocalStore.open(tmp_path / "dev", PASS)


_WRITER = """
import sys
from client.store import LocalStore
from common.crypto import Secret
store = LocalStore.open(sys.argv[1], Secret(passphrase=sys.argv[2]), create=True)
i = 0
while True:
    iid = store.add_interaction(f"prompt {i}", "reply " * 200)
    store.put_blob("counter", str(i).encode())
    print(iid, flush=True)
    i += 1
"""


def test_a_process_killed_mid_write_loses_nothing_committed(tmp_path) -> None:
    # Prepare: a child writes in a loop and reports each committed id.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path / "dev"), PASS.passphrase],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    committed = []
    try:
        while len(committed) < 60:
            line = child.stdout.readline()
            assert line, "writer died early"
            committed.append(int(line))
    finally:
        # Execute: SIGKILL in the middle of its next writes.
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()

    # Assert: every reported id is there; the store opens cleanly.
    with LocalStore.open(tmp_path / "dev", PASS) as store:
        ids = {i.id for i in store.interactions()}
        assert set(committed) <= ids
        assert int(store.get_blob("counter")) >= len(committed) - 1


def test_retention_purges_old_interactions_and_their_feedback(tmp_path) -> None:
    now = time.time()
    with _new(tmp_path, retention_days=28) as store:
        old = store.add_interaction("old", "old", ts=now - 29 * DAY)
        store.add_feedback(old, "rating", value=4.0, ts=now - 29 * DAY)
        keep = store.add_interaction("recent", "recent", ts=now - 27 * DAY)
        store.add_feedback(keep, "rating", value=2.0)
        store.set_meta("last_purge", str(now))
        assert store.maybe_purge(now=now + 3600) == 0  # not a day since the last purge
        assert store.purge_expired(now=now) == 1
        assert [i.id for i in store.interactions()] == [keep]
        assert [f.interaction_id for f in store.feedback()] == [keep]
        # Purged daily by a long-running process.
        store.add_interaction("aging", "aging", ts=now - 27.5 * DAY)
        assert store.maybe_purge(now=now + 0.6 * DAY) == 0
        assert store.maybe_purge(now=now + 1.1 * DAY) == 2  # "recent" is now 28.1 days old
    # And on open.
    with LocalStore.open(tmp_path / "dev", PASS, retention_days=28) as store:
        store.add_interaction("ancient", "x", ts=now - 60 * DAY)
    with LocalStore.open(tmp_path / "dev", PASS, retention_days=28) as store:
        assert store.count_interactions() == 0


def test_forget_crypto_erases_and_deletes(tmp_path) -> None:
    with _new(tmp_path) as store:
        store.add_interaction("secret plans", "noted")
    removed = LocalStore.forget(tmp_path / "dev")
    assert KEY_FILE in removed and DB_FILE in removed
    assert not LocalStore.exists(tmp_path / "dev")
    with pytest.raises(StoreNotFound, match="device init"):
        LocalStore.open(tmp_path / "dev", PASS)


def test_forgotten_key_with_a_leftover_database_is_reported(tmp_path) -> None:
    _new(tmp_path).close()
    (tmp_path / "dev" / KEY_FILE).unlink()
    with pytest.raises(StoreCorrupted, match="wrapped key"):
        LocalStore.open(tmp_path / "dev", PASS)


def test_export_is_readable_json(tmp_path) -> None:
    with _new(tmp_path) as store:
        store.put_profile({"tone": "playful"})
        iid = store.add_interaction("hi", "hello", embedding=np.ones(384, np.float32))
        store.add_feedback(iid, "rating", value=5)
        store.put_blob("personal", b"\xff\xfe")
        store.put_json("ledger", {"events": []})
        data = json.loads(json.dumps(store.export()))
    assert data["profile"] == {"tone": "playful"}
    assert data["interactions"][0]["prompt"] == "hi"
    assert data["interactions"][0]["embedding_dim"] == 384
    assert data["blobs"]["personal"] == {"binary_bytes": 2}
    assert data["blobs"]["ledger"] == {"events": []}


def test_examples_keep_their_order_are_scrubbed_purged_and_exported(tmp_path) -> None:
    # Prepare
    t0 = 1_000_000.0
    with _new(tmp_path) as store:
        # Execute
        n = store.add_examples(
            [("Dear Sir,", "Write to jane@example.com"), ("q2", "second"), ("q3", "third")],
            source="import:text",
            ts=t0,
        )
        store.add_examples([("later", "newest")], source="replay", ts=t0 + 10 * DAY)
        with pytest.raises(ValueError, match="empty reply"):
            store.add_examples([("q", "ok"), ("q", "  ")], source="import:text")
        first = [e.reply for e in store.examples()]
        counts = store.example_counts()
        exported = json.loads(json.dumps(store.export()))["examples"]
        purged = store.purge_expired(now=t0 + store.retention_days * DAY + 1)
        left = [e.reply for e in store.examples()]

    # Assert: in the order given, newest last; PII scrubbed; nothing of a refused batch stored.
    assert n == 3
    assert first == ["Write to [EMAIL]", "second", "third", "newest"]
    assert counts == {"import:text": 3, "replay": 1}
    assert [e["source"] for e in exported] == ["import:text"] * 3 + ["replay"]
    assert purged == 3 and left == ["newest"]


def test_migration_from_an_older_schema(tmp_path) -> None:
    # Prepare: a store at schema v1.
    root = tmp_path / "dev"
    with LocalStore.open(root, PASS, create=True, migrations=MIGRATIONS[:1]) as store:
        assert store.schema_version == 1
        with store.transaction() as cur:
            cur.execute(
                "INSERT INTO interactions(ts, prompt, response) VALUES (?, 'a', 'b')",
                (time.time(),),
            )

    # Execute
    with LocalStore.open(tmp_path / "dev", PASS) as store:
        indexes = {r[0] for r in store._query("SELECT name FROM sqlite_master WHERE type='index'")}

        # Assert
        assert store.schema_version == SCHEMA_VERSION == 3
        assert {"interactions_ts", "feedback_interaction", "examples_ts"} <= indexes
        assert store.count_interactions() == 1
        assert store.examples() == []


def test_a_newer_schema_is_refused(tmp_path) -> None:
    with _new(tmp_path) as store, store.transaction() as cur:
        cur.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(Exception, match="newer than this fedpersona"):
        LocalStore.open(tmp_path / "dev", PASS)


def test_passphrase_change_rewraps_the_key(tmp_path) -> None:
    new = Secret(passphrase="a much better passphrase")
    with _new(tmp_path) as store:
        store.add_interaction("q", "a")
        store.change_secret(PASS, new)
    with pytest.raises(WrongKey):
        LocalStore.open(tmp_path / "dev", PASS)
    with LocalStore.open(tmp_path / "dev", new) as store:
        assert store.count_interactions() == 1


def test_passphrase_change_shreds_the_file_that_held_the_old_wrapping(tmp_path) -> None:
    # Prepare: a second name for the wrapped key's inode (what an old copy on disk would be).
    new = Secret(passphrase="a much better passphrase")
    store = _new(tmp_path)
    peek = tmp_path / "peek"
    os.link(tmp_path / "dev" / KEY_FILE, peek)
    old_bytes = peek.read_bytes()

    # Execute
    store.change_secret(PASS, new)
    store.close()

    # Assert: the old inode now holds random bytes of the same length (the old passphrase
    # unwraps nothing left behind); no helper file stays; the new secret opens the store.
    assert len(peek.read_bytes()) == len(old_bytes) and peek.read_bytes() != old_bytes
    with pytest.raises(ValueError):
        json.loads(peek.read_bytes())
    assert sorted(p.name for p in (tmp_path / "dev").iterdir() if "key" in p.name) == [KEY_FILE]
    LocalStore.open(tmp_path / "dev", new).close()


def test_forget_never_follows_a_planted_symlink(tmp_path) -> None:
    # Prepare: a link named like SQLite's journal, pointing at a file outside the store.
    with _new(tmp_path) as store:
        store.add_interaction("q", "a")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "dev" / f"{DB_FILE}-journal").symlink_to(victim)

    # Execute
    removed = LocalStore.forget(tmp_path / "dev")

    # Assert: the link is gone, its target untouched; the store itself was erased.
    assert f"{DB_FILE}-journal" in removed and KEY_FILE in removed
    assert victim.read_text() == "precious"
    assert not os.path.lexists(tmp_path / "dev" / f"{DB_FILE}-journal")
    assert not LocalStore.exists(tmp_path / "dev")


def test_shred_overwrites_regular_files_only(tmp_path) -> None:
    from common.crypto import shred

    target = tmp_path / "t"
    target.write_bytes(b"x" * 10)
    link = tmp_path / "link"
    link.symlink_to(target)
    assert shred(link) is False and target.read_bytes() == b"x" * 10 and not link.exists()
    assert shred(tmp_path / "missing") is False
    with pytest.raises(OSError, match="not a regular file|Is a directory"):
        shred(tmp_path)
    assert shred(target) is True and not target.exists()


def test_batch_lands_all_writes_or_none(tmp_path) -> None:
    with open_test_store(tmp_path / "dev") as store:
        store.put_blob("a", b"old-a")
        with pytest.raises(RuntimeError), store.batch():
            store.put_blob("a", b"new-a")
            store.put_json("b", {"x": 1})
            assert store.get_blob("a") == b"old-a"  # not visible before the commit
            raise RuntimeError("crash inside the batch")
        assert store.get_blob("a") == b"old-a" and store.get_blob("b") is None
        with store.batch():
            store.put_blob("a", b"new-a")
            store.put_json("b", {"x": 1})
        assert store.get_blob("a") == b"new-a" and store.get_json("b") == {"x": 1}
        with pytest.raises(StoreError, match="nest"), store.batch(), store.batch():
            pass


def test_fresh_store_files_are_private_from_their_first_moment(tmp_path) -> None:
    # Prepare: a permissive umask, as a desktop session may have.
    old = os.umask(0o022)
    try:
        # Execute
        store = LocalStore.create(tmp_path / "dev", Secret(passphrase="correct horse battery"))
        try:
            store.set_meta("probe", "1")  # the first write: WAL and shared-memory files exist
            files = sorted(p.name for p in (tmp_path / "dev").iterdir())
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "dev").iterdir()}
            folder = stat.S_IMODE((tmp_path / "dev").stat().st_mode)
        finally:
            store.close()
        # A file the process makes after the store opened follows its own umask again.
        (tmp_path / "other").write_text("x")
    finally:
        os.umask(old)

    # Assert
    assert {"store.db", "store.db-wal", "store.db-shm", "store.key"} <= set(files)
    assert folder == 0o700
    assert all(mode & 0o077 == 0 for mode in modes.values()), modes
    assert stat.S_IMODE((tmp_path / "other").stat().st_mode) == 0o644


def test_a_loosened_store_folder_is_closed_again_on_open(tmp_path) -> None:
    key = create_key_file(tmp_path / "dev.key")
    LocalStore.create(tmp_path / "dev", Secret(key_file=key)).close()
    (tmp_path / "dev").chmod(0o755)  # a store made before 0700 folders
    LocalStore.open(tmp_path / "dev", Secret(key_file=key)).close()
    assert stat.S_IMODE((tmp_path / "dev").stat().st_mode) == 0o700


def test_passphrases_are_stretched_at_scrypt_n_2_17_and_old_stores_still_open(
    tmp_path, monkeypatch
) -> None:
    import common.crypto as crypto

    # Prepare: a store whose key was wrapped at the old cost.
    monkeypatch.setattr(crypto, "SCRYPT_N", 2**15)
    old = Secret(passphrase="an old passphrase")
    with LocalStore.create(tmp_path / "dev", old) as store:
        store.set_meta("kept", "yes")
    monkeypatch.undo()
    header = json.loads((tmp_path / "dev" / "store.key").read_text())
    assert header["n"] == 2**15

    # Execute: it opens; a passphrase change re-wraps at today's cost.
    new = Secret(passphrase="a new, longer passphrase")
    with LocalStore.open(tmp_path / "dev", old) as store:
        assert store.get_meta("kept") == "yes"
        store.change_secret(old, new)

    # Assert
    assert json.loads((tmp_path / "dev" / "store.key").read_text())["n"] == 2**17
    with LocalStore.open(tmp_path / "dev", new) as store:
        assert store.get_meta("kept") == "yes"
    with pytest.raises(WrongKey):
        LocalStore.open(tmp_path / "dev", old)


def test_a_feedback_and_a_federated_round_racing_on_one_store_both_land(tmp_path) -> None:
    # Prepare: two connections to one store — the worker's round and `device serve`'s
    # feedback, each holding the device's state — both starting from the same personal P0.
    import torch

    from client.store.state import DeviceState

    def state(store):  # type: ignore[no-untyped-def]
        return DeviceState(store, user="u1", strategy="blend", model="tiny", lora="r4")

    p0 = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.5]])}
    with _new(tmp_path) as round_store, LocalStore.open(tmp_path / "dev", PASS) as serve_store:
        state(round_store).save_personal(p0)
        round_start = state(round_store).load_personal()
        feedback_start = state(serve_store).load_personal()
        round_after = {n: t + 0.25 for n, t in round_start.items()}  # the round's training
        feedback_after = {n: t - 1.0 for n, t in feedback_start.items()}  # a feedback's steps

        # Execute: the feedback lands first, then the round (inside its batch, as Device.train
        # writes it with the ledger).
        state(serve_store).update_personal(feedback_start, feedback_after)
        with round_store.batch():
            state(round_store).update_personal(round_start, round_after)

        # Assert: both updates are in the stored tensors (P0 + 0.25 − 1.0), seen by both.
        for store in (round_store, serve_store):
            got = state(store).load_personal()
            for n, t in p0.items():
                assert torch.allclose(got[n], t + 0.25 - 1.0), (n, got[n])
        # A writer alone writes exactly its result (no merge arithmetic).
        exact = {n: t * 3 for n, t in p0.items()}
        state(serve_store).update_personal(state(serve_store).load_personal(), exact)
        assert all(torch.equal(state(round_store).load_personal()[n], exact[n]) for n in p0)


def test_passphrase_from_a_secret_file(tmp_path, monkeypatch) -> None:
    from common.crypto import PASSPHRASE_ENV, PASSPHRASE_FILE_ENV, resolve_secret

    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    secret = tmp_path / "passphrase-0"
    secret.write_text("a long enough passphrase\n")
    secret.chmod(0o600)  # like a key file, private to its owner
    monkeypatch.setenv(PASSPHRASE_FILE_ENV, str(secret))
    assert resolve_secret() == Secret(passphrase="a long enough passphrase")
    monkeypatch.setenv(PASSPHRASE_FILE_ENV, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=PASSPHRASE_FILE_ENV):
        resolve_secret()
    monkeypatch.setenv(PASSPHRASE_ENV, "the environment wins")  # an explicit variable first
    assert resolve_secret().passphrase == "the environment wins"
