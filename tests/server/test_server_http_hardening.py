"""nvlm-serve at the HTTP edge: disconnects, hostile bodies and headers, body limits, timeouts, auth, shutdown.

Each test drives the real app (in-process over ASGI, or a real uvicorn on a loopback port) around
the session's tiny engine; nothing in the request path is faked.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn
from click.testing import CliRunner
from fastapi import FastAPI

from nvlm_server import ServerSettings, create_app
from nvlm_server.cli import main

CHAT = "/v1/chat/completions"
HI = {"messages": [{"role": "user", "content": "Hi"}]}


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """`app` on a loopback port (conftest's `running_server` builds its own app; these tests need theirs)."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        app.state.scheduler.close()  # cancels what is still decoding, so the server stops even if a test failed
        thread.join(10)


def _record_handles(app: FastAPI) -> list:
    """Spy on the app's scheduler: every submitted request's handle, to read its result afterwards."""
    scheduler, handles = app.state.scheduler, []
    submit = scheduler.submit

    def recording_submit(*args, **kwargs):
        handle = submit(*args, **kwargs)
        handles.append(handle)
        return handle

    scheduler.submit = recording_submit
    return handles


def _wait_until(condition, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _assert_json_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert error["message"] and "Traceback" not in response.text
    return error


# --- M1: a non-streaming client that leaves cancels its request -----------------------------


def test_non_streaming_client_that_leaves_is_cancelled(tiny_engine) -> None:
    app = create_app(tiny_engine, ServerSettings())
    handles = _record_handles(app)
    scheduler = app.state.scheduler
    with serving(app) as url:
        body = {**HI, "max_tokens": 20_000}  # minutes of decoding on the tiny engine: it cannot end by itself
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + CHAT, json=body, timeout=httpx.Timeout(30, read=1.5))  # leaves after 1.5 s
        assert handles, "the request never reached the scheduler"
        assert _wait_until(lambda: scheduler.running == 0, 10), "the request kept decoding for a client that left"
        assert _wait_until(lambda: handles[0].result is not None, 5)
        assert handles[0].result.finish_reason == "cancelled"
        assert handles[0].result.usage.completion_tokens < 20_000


# --- M4: hostile bodies and headers get 4xx JSON, never a 500 -------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b'{"messages": [{"role": "user", "content": "caf\xff"}]}', id="invalid-utf8"),
        pytest.param('{"messages": [{"role": "user", "content": "café"}]}'.encode("latin-1"), id="latin-1"),
        pytest.param(b"[" * 100_000, id="100k-nested-lists"),
        pytest.param(b'{"messages": [{"role": "user", "content": "x"}], "tools": ' + b"[" * 5_000 + b"]" * 5_000
                     + b"}", id="5k-nested-in-a-field"),
        pytest.param(b'{"messages": [{"role": "user", "content": "\\ud800"}]}', id="lone-surrogate-escape"),
        pytest.param(b'{"messages": [{"role": "user", "content": "a\\udfff\\ud800b"}]}', id="swapped-pair-escape"),
        pytest.param(b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', id="raw-surrogate-bytes"),
        pytest.param(b'{"messages": [{"role": "user", "content": "x", "\\ud800": 1}]}', id="surrogate-in-a-key"),
        pytest.param(b'{"messages": [{"role": "user", "content": "x"}], "stop": ["\\udc00"]}', id="surrogate-in-stop"),
        pytest.param(b'{"messages": [{"role": "user", "content": "x"}], "repetition_penalty": NaN}', id="NaN-token"),
        pytest.param(b'{"messages": [{"role": "user", "content": "x"}], "repetition_penalty": Infinity}',
                     id="Infinity-token"),
        pytest.param(b'{"messages": [{"role": "user", "content": "x"}], "repetition_penalty": 1e999}', id="float-overflow"),
        pytest.param(b'{"messages": [{"role": "user", "content": "x"}], "top_k": ' + b"9" * 5_000 + b"}",
                     id="5000-digit-int"),
    ],
)
def test_undecodable_bodies_are_400_json(server_url, payload: bytes) -> None:
    response = httpx.post(server_url + CHAT, content=payload, headers={"content-type": "application/json"}, timeout=30)
    assert _assert_json_error(response, 400)["code"] in ("invalid_json", "invalid_request")


@pytest.mark.parametrize(("payload", "param"), [
    (b'{"messages": [{"role": "user", "content": "ok \\ud83d\\ude00 \\ud800"}]}', "messages.0.content"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}', "messages.0.content.0.text"),
    ((b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"function": {"name": "f", "parameters": '
      b'{"type": "object", "properties": {"\\ud800": {}}}}}]}'), "tools.0.function.parameters.properties"),
])
def test_lone_surrogates_are_refused_naming_the_field(server_url, payload: bytes, param: str) -> None:
    response = httpx.post(server_url + CHAT, content=payload, headers={"content-type": "application/json"}, timeout=30)
    error = _assert_json_error(response, 400)
    assert error["code"] == "invalid_request" and error["param"] == param and "surrogate" in error["message"]


@pytest.mark.parametrize("token", ["héllo".encode(), "héllo".encode("latin-1"), "鍵".encode(), b"\xff\xfe"])
def test_non_ascii_bearer_tokens_are_401_json(tiny_engine, token: bytes) -> None:
    with serving(create_app(tiny_engine, ServerSettings(api_key="s3cret"))) as url:
        response = httpx.post(url + CHAT, json={**HI, "max_tokens": 1}, headers=[(b"authorization", b"Bearer " + token)])
        assert _assert_json_error(response, 401)["code"] == "invalid_api_key"
        ok = httpx.post(url + CHAT, json={**HI, "max_tokens": 1}, headers={"authorization": "Bearer s3cret"})
        assert ok.status_code == 200, ok.text


def test_an_unhandled_error_is_a_500_json_without_details(tiny_engine) -> None:
    app = create_app(tiny_engine, ServerSettings())

    @app.get("/v1/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    with serving(app) as url:
        response = httpx.get(url + "/v1/boom")
        assert _assert_json_error(response, 500)["message"] == "internal server error"
        assert "secret" not in response.text


# --- M6: bodies are counted as they arrive ----------------------------------------------------


def _asgi_post(app: FastAPI, receive, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict]:
    """One POST /v1/chat/completions through the app's ASGI callable; (status, JSON body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": CHAT, "raw_path": CHAT.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 8000)}
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


def test_chunked_body_is_cut_at_the_limit_not_buffered(tiny_engine) -> None:
    limit, chunk, total = 2**20, 64 * 2**10, 16 * 2**20
    app = create_app(tiny_engine, ServerSettings(max_body_bytes=limit))
    read = 0

    async def receive() -> dict:  # a chunked upload: no Content-Length, 16 MiB in 64 KiB messages
        nonlocal read
        read += chunk
        return {"type": "http.request", "body": b"x" * chunk, "more_body": read < total}

    try:
        status, body = _asgi_post(app, receive, [(b"content-type", b"application/json"),
                                                 (b"transfer-encoding", b"chunked")])
    finally:
        app.state.scheduler.close()
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert read <= limit + chunk, f"read {read} bytes of a body limited to {limit}"


def test_chunked_upload_over_the_limit_gets_413_on_the_wire(tiny_engine) -> None:
    with serving(create_app(tiny_engine, ServerSettings(max_body_bytes=2**20))) as url:
        address = urlsplit(url)
        with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
            sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         "Transfer-Encoding: chunked\r\n\r\n".encode())
            piece = b"%x\r\n%s\r\n" % (2**16, b" " * 2**16)
            sent = 0
            while sent < 64 * 2**20 and not select.select([sock], [], [], 0)[0]:  # until the server answers
                try:
                    sock.sendall(piece)
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += 2**16
            response = http.client.HTTPResponse(sock)
            response.begin()
            assert response.status == 413
            assert json.loads(response.read())["error"]["code"] == "request_too_large"
        assert sent < 16 * 2**20, "the server kept reading long after the limit"


# --- streams end properly at the request timeout ---------------------------------------------


def test_stream_past_the_timeout_ends_with_finish_reason_and_done(tiny_engine) -> None:
    app = create_app(tiny_engine, ServerSettings(request_timeout_s=1.0))
    body = {**HI, "max_tokens": 20_000, "stream": True, "stream_options": {"include_usage": True}}
    with serving(app) as url:
        started = time.monotonic()
        with httpx.stream("POST", url + CHAT, json=body, timeout=60) as response:
            assert response.status_code == 200
            data = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
        elapsed = time.monotonic() - started
        assert _wait_until(lambda: app.state.scheduler.running == 0, 5)
    assert elapsed < 1.0 + 8, f"a 1 s timeout let the stream run {elapsed:.1f} s"
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert not any("error" in c for c in chunks)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == ["length"]  # cut short by a limit, as OpenAI reports a max_tokens cut
    assert 0 < chunks[-1]["usage"]["completion_tokens"] < 20_000


# --- the API key: never empty, and it also guards the schema ---------------------------------


@pytest.mark.parametrize("key", ["", " s3cret", "two words", "clé"])
def test_settings_refuse_an_api_key_that_cannot_be_sent(key: str) -> None:
    with pytest.raises(ValueError, match="api_key"):
        ServerSettings(api_key=key)


def test_cli_refuses_an_empty_api_key(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("NVLM_API_KEY", raising=False)
    missing = str(tmp_path / "missing")  # never reached: the option is checked before loading
    result = CliRunner().invoke(main, ["-m", missing, "--api-key", ""])
    assert result.exit_code == 2 and "--api-key" in result.output and "Traceback" not in result.output
    monkeypatch.setenv("NVLM_API_KEY", "")  # an unset secret in a deployment must not turn auth off
    result = CliRunner().invoke(main, ["-m", missing])
    assert result.exit_code == 2 and "NVLM_API_KEY" in result.output


def test_openapi_schema_needs_the_key_when_one_is_set(tiny_engine) -> None:
    with serving(create_app(tiny_engine, ServerSettings(api_key="s3cret"))) as url:
        assert _assert_json_error(httpx.get(url + "/openapi.json"), 401)["code"] == "invalid_api_key"
        assert httpx.get(url + "/openapi.json", headers={"authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(url + "/nowhere").status_code == 401  # unknown paths do not tell what exists
        assert httpx.get(url + "/health").status_code == 200


# --- SIGTERM: in-flight requests get --shutdown-timeout seconds, then are cancelled -----------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_sigterm_drain_is_bounded_by_shutdown_timeout(tiny_checkpoint: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "nvlm_server.cli", "-m", str(tiny_checkpoint), "--device-map", "cpu",
               "--dtype", "float32", "--port", str(port), "--shutdown-timeout", "1", "--log-level", "warning"]
    env = {k: v for k, v in os.environ.items() if k != "NVLM_API_KEY"}
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def up() -> bool:
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert _wait_until(up, 120), "nvlm-serve did not come up"
        streaming = threading.Event()

        def long_stream() -> None:
            body = {**HI, "max_tokens": 20_000, "stream": True}
            try:
                with httpx.stream("POST", url + CHAT, json=body, timeout=120) as response:
                    for _ in response.iter_lines():
                        streaming.set()
            except httpx.HTTPError:
                pass

        threading.Thread(target=long_stream, daemon=True).start()
        assert streaming.wait(60)
        stopping = time.monotonic()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        # 1 s of grace, then the stream is cancelled and the scheduler stops (it has up to 5 s)
        assert time.monotonic() - stopping < 1 + 5 + 4
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
