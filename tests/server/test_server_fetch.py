"""nvlm-serve fetching image URLs from a hostile host: every redirect checked, nothing leaked, own pool.

The image host is a real http.server on loopback (`tests/hostile_http.py`); the server under
test runs in this process, so `nvlm_engine.fetch._open_connection` can be watched to prove a
refused destination was never connected to.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from hostile_http import SECRET, SECRET_TYPE, body, hang, hostile_server, png_bytes, redirect

from nvlm_server import ServerImagePolicy, ServerSettings

from .conftest import running_server

LOOPBACK_ONLY = ServerImagePolicy(allow_url_fetch=True, allowed_hosts=("127.0.0.1",))


def chat_body(image_url: str | None, max_tokens: int = 3) -> dict:
    content: list[dict] = [{"type": "text", "text": "Color?"}]
    if image_url:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}


@pytest.fixture
def images():
    with hostile_server("127.0.0.1") as state:
        yield state



def test_allowed_image_url_is_fetched_in_the_fetch_pool(tiny_engine, images) -> None:
    images.routes["/red.png"] = body(png_bytes((64, 64)))
    with running_server(tiny_engine, ServerSettings(images=LOOPBACK_ONLY)) as url:
        ok = httpx.post(url + "/v1/chat/completions", json=chat_body(f"{images.base}/red.png"), timeout=60)
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["prompt_tokens"] > 256  # the fetched image is in the prompt


def check_redirects_are_refused(tiny_engine, images, policy: ServerImagePolicy) -> None:
    images.routes["/metadata"] = redirect("http://169.254.169.254/latest/meta-data/")
    images.routes["/loop"] = redirect("/loop")
    with hostile_server("127.0.0.2") as other:
        other.routes["/a.png"] = body(png_bytes())
        images.routes["/neighbour"] = redirect(f"{other.base}/a.png")
        with running_server(tiny_engine, ServerSettings(images=policy)) as url:
            for path in ("/neighbour", "/metadata"):
                refused = httpx.post(url + "/v1/chat/completions", json=chat_body(images.base + path), timeout=60)
                assert refused.status_code == 400, refused.text
                error = refused.json()["error"]
                assert error["code"] == "image_url_not_allowed" and "redirect 1" in error["message"]
            looping = httpx.post(url + "/v1/chat/completions", json=chat_body(images.base + "/loop"), timeout=60)
            assert looping.status_code == 400 and "more than 3 redirects" in looping.json()["error"]["message"]
        assert other.hits == []


def test_redirects_off_the_allowlist_are_refused_before_connecting(tiny_engine, images, connections) -> None:
    check_redirects_are_refused(tiny_engine, images, LOOPBACK_ONLY)
    assert set(connections) == {"127.0.0.1"}  # never 127.0.0.2, never 169.254.169.254


def test_the_allowlist_holds_on_redirects_even_with_private_addresses_allowed(tiny_engine, images, connections) -> None:
    policy = ServerImagePolicy(allow_url_fetch=True, allowed_hosts=("127.0.0.1",), allow_private_addresses=True)
    check_redirects_are_refused(tiny_engine, images, policy)
    assert set(connections) == {"127.0.0.1"}


def test_private_addresses_need_the_operator_switch(tiny_engine, images, connections) -> None:
    images.routes["/red.png"] = body(png_bytes((64, 64)))
    any_host = ServerImagePolicy(allow_url_fetch=True)
    with running_server(tiny_engine, ServerSettings(images=any_host)) as url:
        refused = httpx.post(url + "/v1/chat/completions", json=chat_body(f"{images.base}/red.png"), timeout=60)
    assert refused.status_code == 400 and "--allow-private-image-hosts" in refused.json()["error"]["message"]
    assert connections == [] and images.hits == []
    switched_on = ServerImagePolicy(allow_url_fetch=True, allow_private_addresses=True)
    with running_server(tiny_engine, ServerSettings(images=switched_on)) as url:
        ok = httpx.post(url + "/v1/chat/completions", json=chat_body(f"{images.base}/red.png"), timeout=60)
    assert ok.status_code == 200, ok.text


def test_fetched_bytes_and_headers_never_reach_the_client(tiny_engine, images) -> None:
    images.routes["/page"] = body(f"{SECRET} <html>admin console</html>".encode(), SECRET_TYPE)
    images.routes["/denied"] = body(SECRET.encode(), SECRET_TYPE, status=403, reason=SECRET)
    with running_server(tiny_engine, ServerSettings(images=LOOPBACK_ONLY)) as url:
        for path, status in (("/page", 400), ("/denied", 400)):
            answer = httpx.post(url + "/v1/chat/completions", json=chat_body(images.base + path), timeout=60)
            assert answer.status_code == status, answer.text
            assert SECRET not in answer.text and SECRET[:8] not in answer.text and SECRET_TYPE not in answer.text
            assert "TOPSECRE" not in answer.text and images.base + path in answer.json()["error"]["message"]


def test_a_hanging_image_host_ends_at_the_request_deadline(tiny_engine, images) -> None:
    images.routes["/slow.png"] = hang(30)
    policy = ServerImagePolicy(allow_url_fetch=True, allowed_hosts=("127.0.0.1",), fetch_timeout_s=1.0)
    with running_server(tiny_engine, ServerSettings(images=policy)) as url:
        start = time.monotonic()
        answer = httpx.post(url + "/v1/chat/completions", json=chat_body(f"{images.base}/slow.png"), timeout=60)
        elapsed = time.monotonic() - start
    assert answer.status_code == 400 and "longer than 1.0 s" in answer.json()["error"]["message"]
    assert elapsed < 3.0


def test_hanging_fetches_do_not_delay_text_requests(tiny_engine, images) -> None:
    """45 requests hang on their image URL; a text-only request still answers at once (finding M5)."""
    images.routes["/slow.png"] = hang(30)
    deadline_s = 4.0
    policy = ServerImagePolicy(allow_url_fetch=True, allowed_hosts=("127.0.0.1",), fetch_timeout_s=deadline_s)

    async def scenario(url: str) -> tuple[float, list[httpx.Response], float]:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            started = time.monotonic()
            hanging = [asyncio.ensure_future(client.post("/v1/chat/completions", json=chat_body(f"{images.base}/slow.png")))
                       for _ in range(45)]
            while len(images.hits) < policy.fetch_workers and time.monotonic() - started < 3:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)  # the other 37 are in, waiting for a fetch worker
            text_start = time.monotonic()
            text = await client.post("/v1/chat/completions", json=chat_body(None))
            text_s = time.monotonic() - text_start
            assert text.status_code == 200, text.text
            answers = await asyncio.gather(*hanging)
            return text_s, answers, time.monotonic() - started

    with running_server(tiny_engine, ServerSettings(images=policy)) as url:
        text_s, answers, total_s = asyncio.run(scenario(url))
    assert text_s < 1.5, f"a text-only request waited {text_s:.1f} s behind hanging image fetches"
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [400] * policy.fetch_workers + [503] * (45 - policy.fetch_workers)
    busy = next(a for a in answers if a.status_code == 503).json()["error"]
    assert busy["code"] == "image_fetch_busy" and "retry later" in busy["message"]
    assert len(images.hits) == policy.fetch_workers  # the pool, not the request count, bounds the fetches
    assert total_s < deadline_s + 3.0  # every request answered around its deadline, none later


def test_cli_wires_the_image_fetch_options(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    import uvicorn
    from click.testing import CliRunner

    import nvlm_engine
    from nvlm_server import app, cli

    class Loaded:
        name = "tiny"

        def close(self) -> None:
            pass

    captured: list[ServerSettings] = []
    monkeypatch.setattr(nvlm_engine.NVLMEngine, "from_pretrained", classmethod(lambda cls, *a, **k: Loaded()))
    monkeypatch.setattr(app, "create_app", lambda engine, settings: captured.append(settings))
    monkeypatch.setattr(cli, "bind", lambda host, port: socket.socket())  # no real port for a wiring test
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, **k: None)
    args = ["-m", "/models/x", "--allow-image-urls", "--allowed-image-host", "Images.Example.com"]
    result = CliRunner().invoke(cli.main, args + ["--allow-private-image-hosts", "--image-fetch-timeout", "3",
                                                  "--image-fetch-workers", "2"])
    assert result.exit_code == 0, result.output
    images = captured[-1].images
    assert (images.allow_private_addresses, images.fetch_timeout_s, images.fetch_workers) == (True, 3.0, 2)
    assert images.fetch_policy.host_allowed("images.example.com")
    assert CliRunner().invoke(cli.main, args).exit_code == 0
    assert captured[-1].images.allow_private_addresses is False  # off unless asked for
