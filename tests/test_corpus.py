"""A per-user corpus in simulation: any folder of users' writing or one JSONL with user ids,
every bad input a clear error or a clear skip, and each user's data entering its simulated
device through the import path a real device uses."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from common.corpus import CorpusError, load_corpus, simulation_users
from tests.conftest import tiny_run_config

RULES = {"min_examples": 8, "test_fraction": 0.2, "seed": 7}


def _paragraphs(who: str, n: int) -> str:
    return "\n\n".join(f"{who} writes passage number {i} about the sea." for i in range(n))


def _chat_line(user: str | None, reply: str, **extra: object) -> str:
    record: dict[str, object] = {
        "messages": [
            {"role": "user", "content": "What now?"},
            {"role": "assistant", "content": reply},
        ],
        **extra,
    }
    if user is not None:
        record["user"] = user
    return json.dumps(record) + "\n"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Five users in every format a device imports, one too small, one binary."""
    root = tmp_path / "people"
    root.mkdir()
    (root / "alice.md").write_text(_paragraphs("Alice", 14))
    (root / "bob.jsonl").write_text(
        "".join(_chat_line(None, f"Bob's answer {i}, short and kind.") for i in range(12))
    )
    mails = "".join(
        f"From me@example.org Mon Jan  {i + 1} 10:00:00 2024\nSubject: plan {i}\n\n"
        f"Carol's reply number {i}, written on a train.\n\n"
        for i in range(10)
    )
    (root / "carol.mbox").write_text(mails)
    (root / "dave").mkdir()
    (root / "dave" / "2024-01.txt").write_text(_paragraphs("Dave (January)", 6))
    (root / "dave" / "2024-02.txt").write_text(_paragraphs("Dave (February)", 6))
    (root / "erin.txt").write_text(_paragraphs("Erin", 60))
    (root / "frank.txt").write_text(_paragraphs("Frank", 3))  # too few
    (root / "grace.txt").write_bytes(b"\x00\x01\x02 not text")  # binary
    (root / ".DS_Store").write_bytes(b"\x00hidden")  # ignored
    return root


def test_a_folder_corpus_reads_every_format_in_order_and_says_whom_it_skipped(folder) -> None:
    # Execute
    corpus = load_corpus(folder, **RULES)

    # Assert: five users, each with its newest examples held out
    by_id = {u.role: u for u in corpus.users}
    assert set(by_id) == {"alice", "bob", "carol", "dave", "erin"}
    assert corpus.layout == "folder"
    assert [len(u.train) + len(u.test) for u in corpus.users] == corpus.example_counts()
    assert by_id["erin"].test[-1].reply == "Erin writes passage number 59 about the sea."
    assert by_id["erin"].train[0].reply == "Erin writes passage number 0 about the sea."
    assert by_id["carol"].test[-1].reply == "Carol's reply number 9, written on a train."
    # A sub-folder's files in path order: February's text is the newest.
    assert by_id["dave"].test[-1].reply.startswith("Dave (February) writes passage number 5")
    assert by_id["dave"].files[0].endswith("2024-01.txt")
    skipped = dict(corpus.skipped)
    assert set(skipped) == {"frank", "grace"}
    assert "fewer than data.min-examples = 8" in skipped["frank"]
    assert "binary" in skipped["grace"]
    text = "\n".join(corpus.describe(joined=4))
    assert "5 users, 4 join the federation" in text
    assert "min 10 / q1" in text and "max 60" in text
    assert "frank:" in text and "grace:" in text


def test_the_order_is_seeded_and_the_same_prefix_for_any_count(folder, tmp_path) -> None:
    from common.config import parse_run_config

    cfg = parse_run_config(tiny_run_config(**{"data.corpus": str(folder), "seed": 3}))
    three = [u.user for u in simulation_users(cfg.data, seed=3, count=3)]
    five = [u.user for u in simulation_users(cfg.data, seed=3, count=5)]
    assert five[:3] == three
    other = [u.user for u in simulation_users(cfg.data, seed=4, count=5)]
    assert sorted(other) == sorted(five)
    with pytest.raises(ValueError, match="has 5 eligible"):
        simulation_users(cfg.data, seed=3, count=6)


def test_a_jsonl_corpus_groups_records_by_user_and_orders_them_by_time(tmp_path) -> None:
    # Prepare: u1's records out of time order, u2 without timestamps, four bad lines
    path = tmp_path / "all.jsonl"
    lines = [
        _chat_line("u1", f"u1 reply {i}", timestamp=f"2021-03-{i + 1:02d}T10:00:00Z")
        for i in reversed(range(12))
    ]
    lines += [_chat_line("u2", f"u2 reply {i}") for i in range(11)]
    lines += [
        _chat_line(None, "nobody's"),
        json.dumps({"user": "u3", "messages": "not a list"}) + "\n",
        json.dumps({"user": "u3", "messages": [{"content": "no role"}]}) + "\n",
        "{broken json\n",
        "\n",
    ]
    path.write_text("".join(lines))

    # Execute
    corpus = load_corpus(path, **RULES)

    # Assert
    by_id = {u.role: u for u in corpus.users}
    assert set(by_id) == {"u1", "u2"} and corpus.layout == "jsonl"
    assert [s.reply for s in by_id["u1"].test] == ["u1 reply 10", "u1 reply 11"]
    assert by_id["u2"].test[-1].reply == "u2 reply 10"
    skipped = dict(corpus.skipped)
    assert skipped["line 24"].startswith("no user id")
    assert "`messages` must be a non-empty list" in skipped["line 25"]
    assert "string `role`" in skipped["line 26"]
    assert skipped["line 27"].startswith("not JSON")
    assert len(corpus.skipped) == 4


def _write(path: Path, data: bytes | str) -> Path:
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.parent.mkdir(exist_ok=True)
        path.write_text(data)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "missing", "does not exist"),
        (lambda root: (root / "empty").mkdir() or root / "empty", "holds no user"),
        (lambda root: _write(root / "e.jsonl", ""), "is empty"),
        (lambda root: _write(root / "b.jsonl", b"\x00\x01binary"), "looks binary"),
        (lambda root: _write(root / "few" / "a.txt", _paragraphs("A", 5)).parent, "no user of"),
    ],
    ids=["missing", "empty folder", "empty jsonl", "binary jsonl", "everyone too small"],
)
def test_a_corpus_that_cannot_be_used_is_a_clear_error(tmp_path, make, message) -> None:
    with pytest.raises(CorpusError, match=message):
        load_corpus(make(tmp_path), **RULES)


@pytest.mark.parametrize("layout", ["jsonl", "folder"])
def test_twenty_thousand_users_of_one_line_each_are_skipped_in_seconds(tmp_path, layout) -> None:
    # Prepare
    if layout == "jsonl":
        path = tmp_path / "many.jsonl"
        path.write_text("".join(_chat_line(f"user{i}", "hello") for i in range(20_000)))
    else:
        path = tmp_path / "many"
        path.mkdir()
        for i in range(20_000):
            (path / f"user{i}.txt").write_text("Just one line.\n")

    # Execute: a clear error naming the count and the reason, not a hang
    start = time.monotonic()
    with pytest.raises(CorpusError) as err:
        load_corpus(path, **RULES)

    # Assert
    assert "20000 skipped: 20000 below data.min-examples" in str(err.value)
    assert time.monotonic() - start < 60


def test_the_screen_lists_a_dozen_skips_and_counts_the_rest(tmp_path) -> None:
    path = tmp_path / "mixed.jsonl"
    lines = [_chat_line(f"small{i}", "hi") for i in range(30)]
    lines += [_chat_line("big", f"reply {i}") for i in range(20)]
    path.write_text("".join(lines))
    corpus = load_corpus(path, **RULES)
    text = corpus.describe()
    assert len(corpus.skipped) == 30
    assert sum(line.startswith("  small") for line in text) == 12
    assert text[-1] == "  … and 18 more (18 below data.min-examples)"


def test_a_corpus_user_enters_its_device_through_the_import_path(folder, tmp_path) -> None:
    # Prepare: Alice's text carries an e-mail address
    from client.federation.device import Device
    from common.config import parse_run_config
    from common.crypto import Secret, create_key_file

    alice = folder / "alice.md"
    alice.write_text(alice.read_text() + "\n\nWrite to me at alice.smith@example.org today.")
    cfg = parse_run_config(tiny_run_config(**{"data.corpus": str(folder)}))
    users = simulation_users(cfg.data, seed=cfg.seed, count=5)
    pid = next(i for i, u in enumerate(users) if u.role == "alice")
    from client.store import LocalStore

    key = create_key_file(tmp_path / "dev.key")

    # Execute
    with LocalStore.create(tmp_path / "dev", Secret(key_file=key)) as store:
        device = Device.simulated(cfg, store=store, partition_id=pid, num_partitions=5)
        stored = store.examples()

        # Assert: imported as a text file is, scrubbed, the newest held out
        assert device.user == "alice"
        assert {e.source for e in stored} == {"import:text"}
        assert len(stored) == 15
        assert "alice.smith@example.org" not in stored[-1].reply
        assert stored[-1].reply.startswith("Write to me at")
        assert [e.reply for e in device.held_out] == [e.reply for e in stored[-3:]]
        assert len(device.train_examples) == 12


def test_a_corpus_run_takes_its_users_from_the_corpus_and_keeps_newcomers_apart(folder) -> None:
    from simulations.corpora import corpus_federation

    run_config = tiny_run_config(**{"data.corpus": str(folder)})
    run_config.pop("data.num-users", None)
    corpus, joined, cold = corpus_federation(run_config, cold_start_users=20)
    assert (len(corpus.users), joined, cold) == (5, 4, 1)  # a fifth at most are newcomers
    _, joined, cold = corpus_federation({**run_config, "data.num-users": 3}, 0)
    assert (joined, cold) == (3, 0)
    with pytest.raises(ValueError, match="data.num-users = 6, but corpus .* has 5 eligible"):
        corpus_federation({**run_config, "data.num-users": 6}, 0)


@pytest.mark.integration
def test_a_simulation_runs_on_a_folder_corpus_and_reports_by_amount_of_data(
    folder, tmp_path
) -> None:
    # Prepare: the tiny federation on the five users of the folder (none of Shakespeare)
    from simulations.cli import print_summary
    from simulations.simulate import simulate

    lines: list[str] = []

    # Execute
    run_dir = simulate(
        "tiny", {"data.corpus": str(folder)}, tmp_path / "runs", on_line=lines.append
    )

    # Assert: the corpus's users joined, its statistics and skips were printed and kept
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sorted(c["user"] for c in summary["clients"]) == [
        "alice",
        "bob",
        "carol",
        "dave",
        "erin",
    ]
    assert summary["config"]["data"]["num_users"] == 5
    assert all(c["rounds_trained"] == 2 for c in summary["clients"])
    assert any("5 users, 5 join the federation" in line for line in lines)
    assert any("frank:" in line for line in lines) and any("grace:" in line for line in lines)
    kept = json.loads((run_dir / "corpus.json").read_text())
    assert {s["user"] for s in kept["skipped"]} == {"frank", "grace"}
    # Groups by data: quartiles of the users who trained, each with its range of examples.
    groups = summary["by_data"]
    assert [g["group"] for g in groups] == ["Q1", "Q2", "Q3", "Q4"]
    assert sum(g["users"] for g in groups) == 5
    assert groups[0]["n_train_min"] == min(c["n_train"] for c in summary["clients"])
    assert groups[-1]["n_train_max"] == max(c["n_train"] for c in summary["clients"]) == 48
    assert summary["versus_local"]["users"] == 5
    assert summary["versus_local"]["never_trained"] == 0
    assert summary["headline"].startswith("Better than training alone for ")
    assert "of the 5 users who trained" in summary["headline"]
    for row in summary["clients"]:  # each device's store holds its own user's examples
        assert (run_dir / "devices" / row["user"] / "store.db").exists()
    from simulations.cli import console

    with console.capture() as shown:  # what a person sees: users, groups, the sentence
        print_summary(summary, run_dir)
    text = shown.get()
    assert "alice" in text and "Q4: 1" in text and "never trained" not in text
    assert summary["headline"][:40] in " ".join(text.split())


def test_the_summary_counts_users_who_never_trained_apart_and_groups_the_rest_by_data() -> None:
    # Prepare: 8 users who trained (a quarter better, one worse), 2 who were never sampled
    from server.outputs import by_data, headline, versus_local

    rows = []
    for i in range(8):
        local = 4.0
        served = {0: 3.9, 1: 3.95, 2: 4.1}.get(i, 4.0)  # 2 better, 1 worse by 2.5 %, 5 equal
        rows.append(
            {
                "n_train": 10 * (i + 1),
                "rounds_trained": 2,
                "base_loss": 4.5,
                "global_loss": 4.4,
                "personal_loss": served,
                "local_only_loss": local,
            }
        )
    for n in (7, 300):
        rows.append(
            {
                "n_train": n,
                "rounds_trained": 0,
                "base_loss": 4.5,
                "global_loss": 4.4,
                "personal_loss": 4.4,
                "local_only_loss": 4.5,  # its local-only model is the base model
            }
        )

    # Execute
    local = versus_local(rows)
    groups = by_data(rows)
    sentence = headline({"versus_local": local})

    # Assert: the never-sampled are not counted "better than local-only"
    assert local["users"] == 8 and local["never_trained"] == 2
    assert local["win_vs_local"] == 2 / 8 and local["worse"] == 1
    assert local["mean_gain_nats"] == pytest.approx((0.1 + 0.05 - 0.1) / 8)
    assert [g["group"] for g in groups] == ["Q1", "Q2", "Q3", "Q4", "never trained"]
    assert [(g["n_train_min"], g["n_train_max"]) for g in groups[:4]] == [
        (10, 20),
        (30, 40),
        (50, 60),
        (70, 80),
    ]
    assert groups[0]["better_than_local"] == 1.0 and groups[1]["no_worse_than_local"] == 0.5
    assert groups[-1]["users"] == 2 and groups[-1]["better_than_local"] is None
    assert sentence == (
        "Better than training alone for 2 of the 8 users who trained, by 0.006 nats on "
        "average; worse by more than 0.5% for 1; 2 never trained (never sampled)."
    )


def test_chitchat_conversations_become_each_participant_s_replies() -> None:
    from simulations.corpora import chitchat_records

    dataset = {
        "c1": {
            "start": "2018-04-20T01:57:41",
            "messages": [
                [{"text": "Hello", "sender": "a"}, {"text": "How are you?", "sender": "a"}],
                [{"text": "Fine, you?", "sender": "b"}],
                [{"text": "Tired.", "sender": "a"}],
                [{"text": "", "sender": "b"}],
            ],
        },
        "c0": {"start": "2018-01-01T00:00:00", "messages": [[{"text": "Alone", "sender": "c"}]]},
    }
    records = chitchat_records(dataset)
    assert [r["user"] for r in records] == ["a", "b"]  # c never answered anyone
    a = records[0]
    assert a["timestamp"] == "2018-04-20T01:57:41"
    assert a["messages"] == [
        {"role": "assistant", "content": "Hello\nHow are you?"},
        {"role": "user", "content": "Fine, you?"},
        {"role": "assistant", "content": "Tired."},
    ]
    assert records[1]["messages"][1] == {"role": "assistant", "content": "Fine, you?"}


def test_the_installed_chitchat_corpus_is_read_as_real_users_of_very_different_sizes(
    tmp_path,
) -> None:
    from simulations.corpora import write_chitchat

    out = tmp_path / "chitchat.jsonl"
    assert write_chitchat(out) > 7000
    corpus = load_corpus(out, **RULES)
    counts = corpus.example_counts()
    assert len(corpus.users) > 500 and min(counts) >= 10 and max(counts) > 10_000
    assert all(why for _, why in corpus.skipped)


def test_a_smaller_corpus_federation_keeps_the_preset_s_share_of_m_min() -> None:
    from simulations.corpora import scaled_min_clients
    from simulations.presets import PRESETS

    quick, population = PRESETS["quick"], PRESETS["population"]
    # quick: all 128 users in each round, m_min 120 -> 5 users, m_min 4; 128 or more: as is.
    assert scaled_min_clients(quick.run_config, 128, 5) == 4
    assert scaled_min_clients(quick.run_config, 128, 600) == 120
    # population: ~40 of 200 per round, m_min 26 -> 100 users (~20 per round): 13.
    assert scaled_min_clients(population.run_config, 200, 100) == 13
    assert scaled_min_clients({"dp.min-clients": 0}, 128, 5) == 0
