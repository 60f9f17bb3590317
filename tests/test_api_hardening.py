"""The local API's attack surface: Host names, schema routes, body size, the token's life.

A real uvicorn server on 127.0.0.1; raw sockets where a client library would fix the request
up (a foreign Host, a body that is declared but never sent).
"""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import pytest

from client.api.app import MAX_BODY, create_app, loopback_host
from client.store.state import rotate_api_token
from tests.conftest import served_tiny_assistant


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with served_tiny_assistant(tmp_path_factory.mktemp("hard") / "dev") as served:
        yield served


def _raw(url: str, request: bytes, *, timeout: float = 10.0) -> tuple[int, bytes, float]:
    """Send ``request`` as is; return the status, the body and the seconds to the answer."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        start = time.perf_counter()
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        seconds = time.perf_counter() - start
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(head.split(b" ", 2)[1]), body, seconds


def test_a_foreign_host_name_is_refused_before_anything_else(server) -> None:
    client, token, _, url = server
    port = urlsplit(url).port
    for host in ("evil.example.com", f"evil.example.com:{port}", "127.0.0.1.evil.example.com"):
        status, body, _ = _raw(
            url,
            f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        assert status == 421, host
        assert json.loads(body)["error"]["code"] == "misdirected_request"
    # Loopback names, with or without a port, are served.
    for host in ("127.0.0.1", f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        status, _, _ = _raw(
            url, f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        )
        assert status == 200, host
    assert client.get("/health").status_code == 200


def test_loopback_host_reads_names_and_ports() -> None:
    assert loopback_host("127.0.0.1:8765") and loopback_host("LOCALHOST") and loopback_host("[::1]")
    assert not loopback_host("") and not loopback_host("localhost.evil.com:80")
    assert not loopback_host("[::2]:80") and not loopback_host("10.0.0.1")


def test_no_schema_or_docs_routes_and_ready_names_nothing(server, tmp_path) -> None:
    client, _, assistant, _ = server
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert client.get(path).status_code == 404, path
    assert client.get("/ready").json() == {"status": "ready"}
    # The development flag turns them on (what `device serve --dev-docs` does).
    dev = create_app(assistant, token="x" * 32, docs=True)
    assert {"/docs", "/redoc", "/openapi.json"} <= {getattr(r, "path", None) for r in dev.routes}


def test_an_oversized_body_is_refused_from_its_declared_length(server) -> None:
    client, token, assistant, url = server
    before = assistant.store.count_interactions()

    # A token holder declares 30 MB and sends none of it: the answer comes at once.
    status, body, seconds = _raw(
        url,
        (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {30 * 2**20}\r\n\r\n"
        ).encode(),
    )
    assert status == 413 and seconds < 5
    assert json.loads(body)["error"]["code"] == "request_too_large"
    # Chunked (no declared length) is refused too; a body at the limit's edge is read.
    status, _, _ = _raw(
        url,
        (
            "POST /v1/feedback HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode(),
    )
    assert status == 411
    padded = {"interaction_id": 1, "rating": 5, "pad": "x" * (MAX_BODY - 100)}
    response = client.post(
        "/v1/feedback", json=padded, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 400  # read and validated (an unknown field), not 413
    assert assistant.store.count_interactions() == before


def test_a_rotated_token_replaces_the_old_one_at_once(server) -> None:
    client, token, assistant, _ = server
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {token}"}).is_success

    new = rotate_api_token(assistant.store)  # what `fedpersona device token --rotate` does

    try:
        assert new != token
        assert (
            client.get("/v1/models", headers={"Authorization": f"Bearer {token}"}).status_code
            == 401
        )
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {new}"}).is_success
        # The export holds no token, old or new.
        export = client.get("/v1/export", headers={"Authorization": f"Bearer {new}"}).text
        assert new not in export and token not in export and "api_token" not in export
    finally:
        assistant.store.set_meta("api_token", token)  # the module's other tests use it
