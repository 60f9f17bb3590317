"""``fedpersona device …`` end to end on the tiny model, and no plaintext user data at rest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from unittest.mock import ANY

import pytest
import torch
from peft import PeftModel
from typer.testing import CliRunner

from client.client_app import evaluate as client_evaluate
from client.client_app import train as client_train
from client.federation.runtime import get_runtime
from client.store import LocalStore
from common.config import parse_run_config
from common.crypto import Secret
from common.model import load_base_model
from common.serialization import to_arrayrecord
from simulations.cli import app
from tests.conftest import device_node_config, make_context, make_message, tiny_run_config

PASSPHRASE = "a passphrase for tests"
SECRETS = [
    "The lighthouse keeper hums Vivaldi at midnight",
    "my grandmother's marmalade uses bergamot and smoked salt",
    "quixotic zeppelin",
]


@pytest.fixture
def run(monkeypatch):
    monkeypatch.setenv("FEDPERSONA_PASSPHRASE", PASSPHRASE)
    runner = CliRunner()

    def invoke(*args: str, ok: bool = True):
        result = runner.invoke(app, ["device", *args])
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return invoke


def test_device_cli_end_to_end(tmp_path, run) -> None:
    d = str(tmp_path / "dev")

    # init, ask, feedback
    out = run("init", "--data-dir", d, "--model", "tiny").output
    assert "device store created" in out and "local API token" in out
    answer = json.loads(
        run(
            "ask",
            "How do I bake bread?",
            "--data-dir",
            d,
            "--max-new-tokens",
            "8",
            "--seed",
            "1",
            "--json",
        ).output
    )
    assert answer["interaction_id"] == 1 and answer["variant"] == "global"
    out = run("feedback", "1", "--data-dir", d, "--preferred", "Knead it well.").output
    assert "personal model adapted in" in out

    # profile: set, show, refuse a bad value with the key named
    out = run("profile", "--data-dir", d, "--set", "tone=poetic", "--set", "domains=baking").output
    assert "poetic" in out and "baking" in out
    bad = run("profile", "--data-dir", d, "--set", "tone=angry", ok=False)
    assert bad.exit_code == 1 and "profile.tone" in bad.output

    # status, budget, token
    status = json.loads(run("status", "--data-dir", d, "--json").output)
    assert status["interactions"] == 1 and status["feedback"] == 1
    assert status["personal_adapter"]["present"] and status["retention_days"] == 28
    assert status["budget"]["epsilon_cap"] == 1.0
    assert json.loads(run("budget", "--data-dir", d).output)["user_epsilon"] == 0.0
    token = run("token", "--data-dir", d).output.strip()
    assert len(token) >= 40

    # export: readable JSON + a loadable peft adapter
    out_json, adapter = tmp_path / "me.json", tmp_path / "adapter"
    run("export", "--data-dir", d, "--out", str(out_json), "--adapter", str(adapter))
    exported = json.loads(out_json.read_text())
    assert exported["interactions"][0]["prompt"] == "How do I bake bread?"
    assert exported["profile"]["tone"] == "poetic"
    assert [f["text"] for f in exported["feedback"]] == ["Knead it well."]
    PeftModel.from_pretrained(load_base_model("tiny"), str(adapter))

    # wrong passphrase: a clear error, the store untouched
    wrong = CliRunner().invoke(
        app, ["device", "status", "--data-dir", d], env={"FEDPERSONA_PASSPHRASE": "nope nope nope"}
    )
    assert wrong.exit_code == 1 and "wrong passphrase" in wrong.output

    # forget
    assert "erased" in run("forget", "--data-dir", d, "--yes").output
    gone = run("status", "--data-dir", d, ok=False)
    assert gone.exit_code == 1 and "device init" in gone.output


def test_export_never_overwrites_the_users_files(tmp_path, run) -> None:
    # Prepare: a device, and a folder and a file of the user's where exports are aimed.
    d = str(tmp_path / "dev")
    run("init", "--data-dir", d, "--model", "tiny")
    folder, notes = tmp_path / "thesis", tmp_path / "notes.json"
    folder.mkdir()
    (folder / "thesis.txt").write_text("three years of work")
    notes.write_text('{"mine": true}')
    export = ["export", "--data-dir", d]

    # Execute / Assert: refused, with the way out named, and nothing touched.
    for args in (
        ["--out", str(tmp_path / "me.json"), "--adapter", str(folder)],
        ["--out", str(notes)],
        ["--out", str(notes), "--adapter", str(tmp_path / "new-adapter")],
    ):
        refused = run(*export, *args, ok=False)
        assert refused.exit_code == 1 and "--force" in refused.output, refused.output
    assert (folder / "thesis.txt").read_text() == "three years of work"
    assert notes.read_text() == '{"mine": true}'
    assert not (tmp_path / "me.json").exists() and not (tmp_path / "new-adapter").exists()

    # An earlier export and an earlier adapter are replaced; an empty folder is used.
    (tmp_path / "empty").mkdir()
    for _ in range(2):
        run(*export, "--out", str(tmp_path / "me.json"), "--adapter", str(tmp_path / "empty"))
    assert (tmp_path / "empty" / "adapter_config.json").is_file()
    # --force replaces what the user pointed at, knowingly.
    run(*export, "--out", str(notes), "--adapter", str(folder), "--force")
    assert not (folder / "thesis.txt").exists() and "interactions" in notes.read_text()


def test_console_script_is_installed_and_refuses_non_loopback(tmp_path) -> None:
    exe = Path(sys.executable).parent / "fedpersona"
    result = subprocess.run(
        [str(exe), "device", "serve", "--data-dir", str(tmp_path), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "127.0.0.1" in result.stdout


def test_clientapp_and_assistant_share_one_store_with_no_plaintext_at_rest(tmp_path, run) -> None:
    # Prepare: a device initialized by the CLI (key file), then a federated round on its store.
    d = tmp_path / "dev"
    key = tmp_path / "dev.key"
    run("init", "--data-dir", str(d), "--model", "tiny", "--key-file", str(key), "--new-key-file")
    # This round comes without SecAgg+ from a federation of 4, all assumed honest: its owner
    # accepts that.
    policy = ["--min-cohort", "1", "--no-require-secagg", "--min-noise-multiplier", "0"]
    policy += ["--honest-fraction", "1"]
    run("privacy", "set", "--data-dir", str(d), "--key-file", str(key), *policy)
    raw = tiny_run_config()
    cfg = parse_run_config(raw)
    rt = get_runtime(cfg)
    g = {n: rt.init[n] for n in rt.shared_names}
    node = device_node_config(d, 0, 4)
    assert node["key-file"] == str(key)
    ctx = make_context(raw, node)
    client_train(make_message(to_arrayrecord(g), "train"), ctx)
    client_evaluate(make_message(to_arrayrecord(g), "evaluate"), ctx)

    # Execute: the user writes known sentences through every path that stores text.
    kf = ["--data-dir", str(d), "--key-file", str(key)]
    run("ask", SECRETS[0], *kf, "--max-new-tokens", "8", "--seed", "2")
    run("feedback", "1", *kf, "--edit", SECRETS[1])
    run("profile", *kf, "--set", f"domains={SECRETS[2]}")

    # Assert: the assistant sees the federation's state; no file holds the sentences.
    status = json.loads(run("status", *kf, "--json").output)
    assert status["personal_adapter"]["rounds_trained"] == 1
    assert status["budget"]["rounds_charged"] == 1
    with LocalStore.open(d, Secret(key_file=key)) as store:
        assert store.get_interaction(1).response == SECRETS[1]  # it is there, encrypted
        _assert_no_plaintext(d)  # while open (WAL present)
    _assert_no_plaintext(d)  # and after close
    assert sorted(p.name for p in d.iterdir()) == ["store.db", "store.key"]

    # The commands that only read or erase the store answer without torch or a model, in a
    # cold process, with the ledger's ε as the accountant computed it.
    answers = {}
    for cmd in (
        ["status", "--json", *kf],
        ["budget", *kf],
        ["profile", *kf],
        ["token", *kf],
        ["export", "--out", str(tmp_path / "me.json"), *kf],
        ["forget", "--yes", "--data-dir", str(d)],
    ):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "simulations.cli", "device", *cmd],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        imported = {
            line.rsplit("|", 1)[-1].strip()
            for line in proc.stderr.splitlines()
            if line.startswith("import time:")
        }
        assert not imported & {"torch", "transformers", "peft", "opacus", "flwr"}, cmd
        answers[cmd[0]] = proc.stdout
    assert json.loads(answers["status"]) == {**status, "store_bytes": ANY, "last_purge": ANY}
    assert json.loads(answers["budget"]) == status["budget"]
    assert status["budget"]["user_epsilon"] > 0
    assert json.loads((tmp_path / "me.json").read_text())["interactions"][0]["id"] == 1
    assert not d.exists() or not any(d.iterdir())


def _assert_no_plaintext(root) -> None:
    needles = []
    for text in SECRETS:
        for word in text.split():
            if len(word) >= 7:
                needles += [word.encode(), word.encode("utf-16-le")]
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files
    for path in files:
        data = path.read_bytes()
        found = [n for n in needles if n in data]
        assert not found, f"{path.name} holds plaintext {found[:3]}"


def test_privacy_show_and_set_through_the_cli(tmp_path, run) -> None:
    d, key = tmp_path / "dev", tmp_path / "dev.key"
    run("init", "--data-dir", str(d), "--model", "tiny", "--key-file", str(key), "--new-key-file")
    unlock = ["--data-dir", str(d), "--key-file", str(key)]

    from client.federation.policy import DevicePolicy

    def policy_shown() -> dict:
        shown = json.loads(run("privacy", "show", *unlock).output)
        # What the ledger spent, and what its ε assumes, beside the policy.
        assert shown.pop("spent") == {"record_epsilon": 0, "user_epsilon": 0, "alone_epsilon": 0}
        assert "at least 0.5 of every cohort" in shown.pop("assumes")
        return shown

    assert policy_shown() == {
        k.replace("_", "-"): v for k, v in DevicePolicy().to_dict().items() if k != "version"
    }
    changed = json.loads(
        run(
            "privacy", "set", *unlock, "--min-cohort", "20", "--epsilon-cap", "2",
            "--max-cohort", "500", "--worst-case-epsilon-cap", "8",
        ).output
    )  # fmt: skip
    assert changed["min-cohort"] == 20 and changed["epsilon-cap"] == 2.0
    assert changed["max-cohort"] == 500 and changed["worst-case-epsilon-cap"] == 8.0
    assert policy_shown() == changed
    refused = run("privacy", "set", *unlock, "--delta", "2", ok=False)
    assert refused.exit_code == 1 and "delta" in refused.output
    refused = run("privacy", "set", *unlock, "--honest-fraction", "1.5", ok=False)
    assert refused.exit_code == 1 and "honest-fraction" in refused.output
    assert policy_shown() == changed


def test_chat_remembers_the_conversation_and_takes_feedback(tmp_path, run, monkeypatch) -> None:
    from client.assistant.assistant import Assistant

    d = str(tmp_path / "dev")
    run("init", "--data-dir", d, "--model", "tiny")
    seen: list[list[dict[str, str]]] = []
    fit = Assistant.fit_prompt

    def recording(self, *args, **kwargs):
        messages, ids = fit(self, *args, **kwargs)
        seen.append(messages)
        return messages, ids

    monkeypatch.setattr(Assistant, "fit_prompt", recording)
    lines = [
        "My cat is called Biscuit.",
        "/edit Nice name!",
        "What is my cat called?",
        "/rate 5",
        "/new",
        "Hello again",
        "/quit",
    ]
    out = CliRunner().invoke(
        app,
        ["device", "chat", "--data-dir", d, "--max-new-tokens", "4"],
        input="\n".join(lines) + "\n",
        env={"FEDPERSONA_PASSPHRASE": PASSPHRASE},
    )
    assert out.exit_code == 0, out.output
    assert [[m["content"] for m in s[1:]] for s in seen] == [
        ["My cat is called Biscuit."],
        ["My cat is called Biscuit.", "Nice name!", "What is my cat called?"],
        ["Hello again"],
    ]
    assert out.output.count("noted") == 2 and "#3 · global" in out.output


def test_expert_add_installs_an_adapter_the_api_then_lists(tmp_path, run) -> None:
    from fastapi.testclient import TestClient

    from client.api.app import create_app
    from client.assistant.assistant import Assistant
    from common.lora import export_adapter

    d = tmp_path / "dev"
    run("init", "--data-dir", str(d), "--model", "tiny", "--strategy", "fedsa")
    with LocalStore.open(d, Secret(passphrase=PASSPHRASE)) as store:
        assistant = Assistant(store)
        tensors = {n: torch.full_like(t, 0.01) for n, t in assistant.global_tensors().items()}
        export_adapter(tensors, assistant.cfg.model, tmp_path / "cooking", base_model="tiny")

    out = run(
        "expert-add",
        "cooking",
        str(tmp_path / "cooking"),
        "--data-dir",
        str(d),
        "--about",
        "recipes and cooking",
    ).output
    assert "router gates for you: cooking=1.00" in out
    bad = run(
        "expert-add", "x", str(tmp_path / "nope"), "--data-dir", str(d), "--about", "y", ok=False
    )
    assert bad.exit_code == 1 and "adapter_model.safetensors" in bad.output

    with LocalStore.open(d, Secret(passphrase=PASSPHRASE)) as store:
        assistant = Assistant(store)
        assert assistant.variant == "experts"
        token = store.get_meta("api_token")
        client = TestClient(create_app(assistant, token=token), base_url="http://127.0.0.1")
        models = client.get("/v1/models", headers={"Authorization": f"Bearer {token}"})
        assert [m["id"] for m in models.json()["data"]][-1] == "fedpersona-experts"


@pytest.mark.parametrize("how", ["env", "file"])
def test_a_short_passphrase_from_the_environment_is_refused_naming_the_minimum(
    tmp_path, monkeypatch, how: str
) -> None:
    # Prepare: a store made with a good passphrase, then a 5-character one in the environment
    from common.crypto import MIN_PASSPHRASE_CHARS, PASSPHRASE_ENV, PASSPHRASE_FILE_ENV

    d = tmp_path / "dev"
    monkeypatch.setenv(PASSPHRASE_ENV, PASSPHRASE)
    assert CliRunner().invoke(app, ["device", "init", "--data-dir", str(d)]).exit_code == 0
    monkeypatch.delenv(PASSPHRASE_ENV)
    if how == "env":
        monkeypatch.setenv(PASSPHRASE_ENV, "short")
    else:
        (tmp_path / "pass").write_text("short\n")
        (tmp_path / "pass").chmod(0o600)
        monkeypatch.setenv(PASSPHRASE_FILE_ENV, str(tmp_path / "pass"))

    # Execute: with a terminal-less stdin that would answer a prompt
    out = CliRunner().invoke(app, ["device", "status", "--data-dir", str(d)], input=PASSPHRASE)

    # Assert: refused with the minimum named, never a prompt
    assert out.exit_code == 1
    assert f"at least {MIN_PASSPHRASE_CHARS}" in out.output and "5 characters" in out.output
    assert "Passphrase" not in out.output and "Aborted" not in out.output


def test_no_passphrase_and_no_terminal_says_where_to_give_one(tmp_path, monkeypatch) -> None:
    from common.crypto import PASSPHRASE_ENV, PASSPHRASE_FILE_ENV

    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    monkeypatch.delenv(PASSPHRASE_FILE_ENV, raising=False)
    monkeypatch.delenv("FEDPERSONA_KEY_FILE", raising=False)
    out = CliRunner().invoke(app, ["device", "status", "--data-dir", str(tmp_path / "dev")])
    assert out.exit_code == 1
    assert "--key-file" in out.output and PASSPHRASE_ENV in out.output
    assert "Aborted" not in out.output
