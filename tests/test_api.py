"""The local HTTP API through a real uvicorn server on 127.0.0.1 and an HTTP client."""

from __future__ import annotations

import pytest

from client.api.app import check_loopback
from tests.conftest import served_tiny_assistant


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with served_tiny_assistant(tmp_path_factory.mktemp("api") / "dev") as (client, token, a, _):
        yield client, token, a


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_probes_are_open_everything_else_needs_the_token(server) -> None:
    client, token, _ = server
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["status"] == "ready"
    for method, path in [
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/feedback"),
        ("GET", "/v1/profile"),
        ("PUT", "/v1/profile"),
        ("GET", "/v1/budget"),
        ("GET", "/v1/privacy"),
        ("GET", "/v1/status"),
        ("GET", "/v1/export"),
        ("POST", "/v1/forget"),
        ("GET", "/metrics"),
    ]:
        assert client.request(method, path).status_code == 401
        wrong = client.request(method, path, headers=_auth("x" * 43), json={})
        assert wrong.status_code == 401, path
        assert wrong.json()["error"]["code"] == "invalid_api_key"
        assert wrong.headers["www-authenticate"] == "Bearer"
    # Every answer carries the web app's security headers.
    csp = client.get("/health").headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp


def test_chat_feedback_profile_budget_metrics(server) -> None:
    client, token, assistant = server
    before = assistant.store.count_interactions()

    # Execute: an OpenAI-shaped chat request.
    reply = client.post(
        "/v1/chat/completions",
        headers=_auth(token),
        json={
            "model": "anything",
            "messages": [
                {"role": "system", "content": "Keep it short."},
                {"role": "user", "content": "How do I tie a bowline?"},
            ],
            "max_tokens": 8,
            "seed": 3,
        },
    )

    # Assert
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["total_tokens"] > 0
    iid = body["fedpersona"]["interaction_id"]
    assert assistant.store.count_interactions() == before + 1

    fb = client.post(
        "/v1/feedback", headers=_auth(token), json={"interaction_id": iid, "preferred": "Loop."}
    )
    assert fb.status_code == 200 and fb.json()["adapted"] is True

    put = client.put("/v1/profile", headers=_auth(token), json={"tone": "poetic"})
    assert put.status_code == 200 and put.json()["tone"] == "poetic"
    got = client.get("/v1/profile", headers=_auth(token)).json()
    assert got["tone"] == "poetic" and got["implicit"]["liked"] is True

    budget = client.get("/v1/budget", headers=_auth(token)).json()
    assert budget["epsilon_cap"] == 1.0 and budget["user_epsilon"] == 0.0
    privacy = client.get("/v1/privacy", headers=_auth(token)).json()
    assert privacy["budget"] == budget and privacy["rounds"] == []
    assert privacy["stored"]["interactions"] == before + 1 and privacy["never_leaves"]
    state = client.get("/v1/status", headers=_auth(token)).json()
    assert state["active_model"] == assistant.variant and "cold start" in state["why"]
    export = client.get("/v1/export", headers=_auth(token))
    assert export.headers["cache-control"] == "no-store"
    assert iid in [i["id"] for i in export.json()["interactions"]]

    metrics = client.get("/metrics", headers=_auth(token))
    assert metrics.status_code == 200
    assert 'fedpersona_requests_total{route="/v1/chat/completions",status="200"}' in metrics.text
    assert "fedpersona_feedback_adaptation_seconds_count 1.0" in metrics.text


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("POST", "/v1/chat/completions", {"messages": []}, 400, "at least 1"),
        (
            "POST",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": " "}]},
            400,
            "non-empty user message",
        ),
        (
            "POST",
            "/v1/chat/completions",
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "x"},
                ]
            },
            400,
            "end with a non-empty user message",
        ),
        (
            "POST",
            "/v1/chat/completions",
            {"messages": [{"role": "wizard", "content": "x"}]},
            400,
            "role",
        ),
        (
            "POST",
            "/v1/chat/completions",
            {"model": "fedpersona-experts", "messages": [{"role": "user", "content": "hi"}]},
            404,
            "no expert adapters",
        ),
        ("POST", "/v1/feedback", {"interaction_id": 9999, "rating": 5}, 404, "no interaction"),
        ("POST", "/v1/feedback", {"interaction_id": 1, "rating": 11}, 400, "less than or equal"),
        ("POST", "/v1/feedback", {"interaction_id": 1}, 400, "give a rating"),
        ("PUT", "/v1/profile", {"tone": "angry"}, 400, "profile.tone"),
        ("PUT", "/v1/profile", {"implicit": {}}, 400, "learned on the device"),
        ("PUT", "/v1/profile", {"shoe_size": 9}, 400, "unknown profile key"),
        ("POST", "/v1/forget", {}, 400, "confirm"),
        ("POST", "/v1/forget", {"confirm": "yes"}, 400, "confirm"),
        ("PUT", "/v1/chats", {"chats": []}, 400, '"active"'),
        ("PUT", "/v1/chats", {"active": None, "chats": [{"id": 1}]}, 400, "string `id`"),
        ("PUT", "/v1/chats", {"active": None, "chats": [{"id": "a"}]}, 400, "`messages`"),
    ],
)
def test_bad_requests_get_4xx_and_change_nothing(server, method, path, body, status, message):
    client, token, assistant = server
    before = (
        assistant.store.count_interactions(),
        len(assistant.store.feedback()),
        assistant.store.get_profile(),
    )
    reply = client.request(method, path, headers=_auth(token), json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]  # OpenAI's error object
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and message in error["message"]
    after = (
        assistant.store.count_interactions(),
        len(assistant.store.feedback()),
        assistant.store.get_profile(),
    )
    assert after == before


def test_only_loopback_binds() -> None:
    check_loopback("127.0.0.1")
    with pytest.raises(ValueError, match="127.0.0.1"):
        check_loopback("0.0.0.0")


def test_the_web_apps_chats_live_in_the_encrypted_store_and_the_purge_reaches_them(
    server,
) -> None:
    # Prepare: two chats, one of them a year old.
    import time

    from client.store.chats import CHATS_BLOB

    client, token, assistant = server
    now_ms = time.time() * 1000
    year_ago = now_ms - 365 * 86400 * 1000
    chats = {
        "active": "old",
        "chats": [
            {"id": "new", "title": "t", "created": now_ms, "messages": [
                {"role": "user", "content": "hello", "ts": now_ms}]},
            {"id": "old", "title": "t", "created": year_ago, "messages": [
                {"role": "user", "content": "long ago", "ts": year_ago}]},
        ],
    }  # fmt: skip

    # Execute
    put = client.put("/v1/chats", headers=_auth(token), json=chats)
    got = client.get("/v1/chats", headers=_auth(token)).json()
    assistant.store.purge_expired()

    # Assert: kept as sent (encrypted with the rest of the store); the purge dropped the
    # turns past retention, and the chat they left empty.
    assert put.status_code == 200 and got == chats
    kept = assistant.store.get_json(CHATS_BLOB)
    assert [c["id"] for c in kept["chats"]] == ["new"] and kept["active"] is None
    assert client.get("/v1/chats", headers=_auth(token)).json() == kept
