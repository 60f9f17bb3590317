"""The device API as real clients use it: the official ``openai`` Python client against a real
``device serve`` app (uvicorn on 127.0.0.1, tiny model)."""

from __future__ import annotations

import httpx
import openai
import pytest

from client.api.app import create_app
from tests.conftest import api_server, tiny_assistant

CAT = [
    {"role": "user", "content": "My cat is called Biscuit."},
    {"role": "assistant", "content": "Nice name!"},
    {"role": "user", "content": "What is my cat called?"},
]


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    store, assistant, token = tiny_assistant(tmp_path_factory.mktemp("openai") / "dev")
    with api_server(create_app(assistant, token=token)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=120)
        yield client, assistant, url, token
    store.close()


@pytest.fixture
def prompts(device, monkeypatch):
    """Every prompt the model is given, as ``(messages, decoded prompt, token count)``."""
    _, assistant, _, _ = device
    seen: list[tuple[list[dict[str, str]], str, int]] = []
    fit = assistant.fit_prompt

    def recording(*args, **kwargs):
        messages, ids = fit(*args, **kwargs)
        seen.append((messages, assistant.rt.tokenizer.decode(ids), len(ids)))
        return messages, ids

    monkeypatch.setattr(assistant, "fit_prompt", recording)
    return seen


def test_the_whole_conversation_reaches_the_model(device, prompts) -> None:
    client, assistant, _, _ = device
    reply = client.chat.completions.create(
        model="fedpersona", messages=CAT, max_tokens=4, seed=1, extra_body={"candidates": 1}
    )
    messages, rendered, size = prompts[-1]
    # The personalized system prompt first, then the conversation in order, in the chat template.
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert rendered.startswith("<|im_start|>system\nYou are a helpful personal assistant.")
    turns = [rendered.index(m["content"]) for m in CAT]
    assert turns == sorted(turns)
    assert rendered.endswith("<|im_start|>assistant\n")
    # usage counts the prompt the model saw and what it generated.
    assert reply.usage.prompt_tokens == size > 20
    assert reply.usage.completion_tokens == 4
    assert reply.usage.total_tokens == size + 4
    assert reply.choices[0].finish_reason == "length"
    assert reply.model in ("fedpersona-global", "fedpersona-personal")
    assert reply.model_extra["fedpersona"]["turns_used"] == 2
    assert assistant.store.get_interaction(reply.model_extra["fedpersona"]["interaction_id"])


def test_the_oldest_turns_are_dropped_to_fit_the_context(device, prompts) -> None:
    client, assistant, _, _ = device
    long_turns = [
        {"role": r, "content": f"turn {i}: " + "words " * 60}
        for i, r in enumerate(["user", "assistant"] * 4)
    ]
    saved = assistant.context_tokens
    assistant.context_tokens = 400
    try:
        reply = client.chat.completions.create(
            model="fedpersona",
            messages=[*long_turns, {"role": "user", "content": "And now?"}],
            max_tokens=2,
            extra_body={"candidates": 1},
        )
        messages, rendered, size = prompts[-1]
        assert size + 2 <= 400
        kept = reply.model_extra["fedpersona"]["turns_used"]
        assert 0 < kept < len(long_turns) and kept % 2 == 0
        assert "turn 7:" in rendered and "turn 0:" not in rendered and "And now?" in rendered
        assert messages[1]["role"] == "user"  # an exchange is dropped whole
        # Too long even alone: an OpenAI error, before any token (also when streaming).
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as err:
                client.chat.completions.create(
                    model="fedpersona",
                    messages=[{"role": "user", "content": "words " * 500}],
                    max_tokens=2,
                    stream=stream,
                )
            assert err.value.body["code"] == "context_length_exceeded"
    finally:
        assistant.context_tokens = saved


def test_streaming_assembles_to_the_same_text_as_not_streaming(
    device, prompts, monkeypatch
) -> None:
    client, assistant, _, _ = device
    # Each answer is stored and would be retrieved into the next prompt: keep prompts equal.
    monkeypatch.setattr("client.assistant.assistant.retrieve", lambda *_, **__: [])
    before = assistant.store.count_interactions()
    for candidates in (1, 3):
        common = dict(
            model="fedpersona",
            messages=CAT,
            max_tokens=12,
            seed=7,
            extra_body={"candidates": candidates},
        )
        whole = client.chat.completions.create(**common)
        chunks = list(
            client.chat.completions.create(
                **common, stream=True, stream_options={"include_usage": True}
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert prompts[-1][1] == prompts[-2][1]
        assert text == whole.choices[0].message.content
        assert chunks[0].choices[0].delta.role == "assistant"
        finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(finals) == 1
        assert finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
        assert finals[0].model_extra["fedpersona"]["interaction_id"] > 0
        usage = chunks[-1].usage  # include_usage: one last chunk with no choices
        assert chunks[-1].choices == [] and usage.model_dump() == whole.usage.model_dump()
        assert len({c.id for c in chunks}) == 1
    assert assistant.store.count_interactions() == before + 4


def test_a_stop_string_ends_the_answer(device) -> None:
    client, _, _, _ = device
    common = dict(model="fedpersona", messages=CAT, max_tokens=16, seed=3)
    full = client.chat.completions.create(**common, extra_body={"candidates": 1})
    text = full.choices[0].message.content
    words = text.split()
    assert len(words) >= 3, text  # the tiny model's random tokens: pick a later word to stop at
    stop = words[2]
    cut = text[: text.index(stop)].rstrip()
    for stream in (False, True):
        reply = client.chat.completions.create(
            **common, stop=[stop], stream=stream, extra_body={"candidates": 1}
        )
        if stream:
            chunks = list(reply)
            got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            got, reason = reply.choices[0].message.content, reply.choices[0].finish_reason
        assert (got, reason) == (cut, "stop")


def test_models_list_the_variants_and_select_one(device) -> None:
    client, assistant, _, _ = device
    ids = [m.id for m in client.models.list()]
    assert ids == ["fedpersona", "fedpersona-personal", "fedpersona-global"]
    reply = client.chat.completions.create(
        model="fedpersona-personal", messages=CAT, max_tokens=2, extra_body={"candidates": 1}
    )
    assert reply.model == "fedpersona-personal"
    assert reply.model_extra["fedpersona"]["why"] == "you asked for the personal model"
    # The request did not change which model answers by default.
    assert assistant.variant == "global"
    # A name the client hard-coded is answered by the device's own choice.
    other = client.chat.completions.create(model="gpt-4o-mini", messages=CAT, max_tokens=2)
    assert other.model == "fedpersona-global"


def test_errors_come_in_openais_shape(device) -> None:
    client, _, url, _ = device
    anonymous = openai.OpenAI(base_url=f"{url}/v1", api_key="x" * 43, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        anonymous.chat.completions.create(model="fedpersona", messages=CAT)
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="fedpersona", messages=CAT, temperature=0.0)
    assert err.value.body["type"] == "invalid_request_error"
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="fedpersona-experts", messages=CAT)
    assert err.value.body["code"] == "model_not_found"


def test_the_users_words_reach_their_model_and_the_store_keeps_them_scrubbed(
    device, prompts, monkeypatch
) -> None:
    client, assistant, _, _ = device
    request = "My name is Jane Doe and my email is jane@example.com. What should I cook tonight?"
    answer_text = "Hi Jane Doe! Try a mushroom risotto tonight."
    generate = assistant.generate

    def greeting(*args, **kwargs):  # the model's answer, fixed (the tiny model is random)
        out = generate(*args, **kwargs)
        for g in out:
            g.text = answer_text
        return out

    monkeypatch.setattr(assistant, "generate", greeting)
    reply = client.chat.completions.create(
        model="fedpersona", messages=[{"role": "user", "content": request}], max_tokens=2
    )
    # The model saw the request as written; the answer reaches the user with no placeholder.
    assert request in prompts[-1][1]
    assert reply.choices[0].message.content == answer_text
    # The store holds neither the name nor the address.
    stored = assistant.store.get_interaction(reply.model_extra["fedpersona"]["interaction_id"])
    for text in (stored.prompt, stored.response):
        assert "Jane" not in text and "jane@" not in text
    assert "[NAME]" in stored.prompt and "[EMAIL]" in stored.prompt
    # Asked again, the scrubbed history comes back into the prompt as plain words.
    client.chat.completions.create(
        model="fedpersona", messages=[{"role": "user", "content": request}], max_tokens=2
    )
    system = prompts[-1][0][0]["content"]
    assert "Earlier, related requests" in system
    assert "my name is someone and my email is an email address" in system.lower()
    assert "[NAME]" not in system and "[EMAIL]" not in system


def test_forget_erases_the_store_and_the_api_says_so(tmp_path) -> None:
    store, assistant, token = tiny_assistant(tmp_path / "dev")
    auth = {"Authorization": f"Bearer {token}"}
    with (
        api_server(create_app(assistant, token=token)) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        assert http.post("/v1/forget", headers=auth, json={}).status_code == 400
        assert (tmp_path / "dev" / "store.db").exists()
        assistant.ask("What is the sea like?", n=2, max_new_tokens=2, seed=0)
        assert assistant.embedder.cached() > 0  # the request and its candidates
        erased = http.post("/v1/forget", headers=auth, json={"confirm": "forget"})
        assert erased.status_code == 200, erased.text
        assert "store.key" in erased.json()["erased"]
        assert not (tmp_path / "dev" / "store.key").exists()
        assert assistant.embedder.cached() == 0  # no recent text left in memory either
        gone = http.get("/v1/models", headers=auth)
        assert gone.status_code == 410 and gone.json()["error"]["code"] == "store_forgotten"
        assert http.get("/health").status_code == 200
    store.close()


def test_a_failure_is_a_500_in_the_same_shape(device, monkeypatch) -> None:
    client, assistant, _, _ = device

    def broken(*_, **__):
        raise RuntimeError("the model fell over")

    monkeypatch.setattr(assistant, "generate", broken)
    before = assistant.store.count_interactions()
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(
                model="fedpersona", messages=CAT, max_tokens=2, stream=stream
            )
        assert err.value.body["type"] == "server_error"
        assert "the model fell over" in err.value.body["message"]
    assert assistant.store.count_interactions() == before
