"""nvlm-serve for real on a loopback port: the openai client, LangChain's ChatOpenAI, concurrency, limits."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import httpx
import pytest
from PIL import Image
from shared_paths import TOKEN_SCALE

from nvlm_server import ServerImagePolicy, ServerSettings

from .conftest import running_server


def _png(width: int, height: int, color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_openai_client_text_equals_engine(server_url, tiny_engine) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server_url + "/v1", api_key="unused")
    reply = client.chat.completions.create(model="nvlm-tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    expected = tiny_engine.generate([{"role": "user", "content": "Hi"}], max_new_tokens=8)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens
    assert reply.usage.completion_tokens == expected.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == ["nvlm-tiny"]


def test_openai_client_image_and_streaming_usage(server_url, tiny_engine) -> None:
    from openai import OpenAI

    png = _png(640, 480, (10, 200, 30))
    client = OpenAI(base_url=server_url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(png)}},
                                             {"type": "text", "text": "What color?"}]}]
    stream = client.chat.completions.create(model="nvlm-tiny", messages=messages, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = [c.usage for c in chunks if c.usage is not None]
    expected = tiny_engine.generate([{"role": "user", "content": [{"type": "image", "image": png},
                                                                  {"type": "text", "text": "What color?"}]}], max_new_tokens=10)
    assert text == expected.text
    assert len(usage) == 1 and usage[0].prompt_tokens == expected.usage.prompt_tokens
    assert expected.usage.image_tokens == 7 * 256  # 640x480 -> 3x2 + thumbnail
    assert chunks[0].choices[0].delta.role == "assistant"


def test_langchain_chat_openai_against_the_server(server_url, tiny_engine) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server_url + "/v1", api_key="unused", model="nvlm-tiny", max_tokens=8, temperature=0)
    expected = tiny_engine.generate([{"role": "user", "content": "Hello there"}], max_new_tokens=8)
    message = llm.invoke("Hello there")
    assert message.content == expected.text
    assert message.usage_metadata["output_tokens"] == expected.usage.completion_tokens
    streamed = "".join(chunk.content for chunk in llm.stream("Hello there"))
    assert streamed == expected.text


def test_64_concurrent_streams_without_cross_talk(server_url, tiny_engine) -> None:
    from openai import AsyncOpenAI

    prompts = [f"Question number {i}: what is {i} plus {i}?" for i in range(8)]
    solo = {p: tiny_engine.generate([{"role": "user", "content": p}], max_new_tokens=6).text for p in prompts}

    async def one(client, prompt: str) -> tuple[str, str]:
        stream = await client.chat.completions.create(model="nvlm-tiny", messages=[{"role": "user", "content": prompt}],
                                                      max_tokens=6, stream=True)
        return prompt, "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main() -> list[tuple[str, str]]:
        client = AsyncOpenAI(base_url=server_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        return await asyncio.gather(*(one(client, prompts[i % 8]) for i in range(64)))

    results = asyncio.run(main())
    assert len(results) == 64
    for prompt, text in results:
        assert text == solo[prompt]


def test_disconnect_frees_the_slot(server_url) -> None:
    body = {"model": "nvlm-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2000, "stream": True}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", server_url + "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            next(lines)
            next(lines)
        deadline = time.time() + 20
        while time.time() < deadline:
            health = client.get(server_url + "/health").json()
            if health["running"] == 0:
                break
            time.sleep(0.1)
        assert health["running"] == 0


def test_full_queue_answers_429(tiny_engine) -> None:
    settings = ServerSettings(max_batch_size=1, max_queue=1)
    with running_server(tiny_engine, settings) as url:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 300}

        async def main() -> list[int]:
            async with httpx.AsyncClient(timeout=60) as client:
                responses = await asyncio.gather(*(client.post(url + "/v1/chat/completions", json=body) for _ in range(6)))
                return [r.status_code for r in responses]

        codes = asyncio.run(main())
        assert 429 in codes and 200 in codes
        assert set(codes) <= {200, 429}


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (json.dumps({"messages": "hi"}).encode(), 400, "invalid_request"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}).encode(), 400, "invalid_request"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}).encode(), 400, "invalid_request"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 3}).encode(), 400, "invalid_request"),
        (json.dumps({"messages": [{"role": "user", "content": "x" * (3 * 2**20)}]}).encode(), 413, "request_too_large"),
        (json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(_png(8, 8, (0, 0, 0)))}}] * 3}]}).encode(),
         400, "too_many_images"),
        (json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]}).encode(), 400, "image_url_not_allowed"),
        (json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "/etc/hostname"}}]}]}).encode(), 400, "invalid_image_url"),
        (json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}]}]}).encode(), 400, "invalid_image_url"),
        (json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}).encode(), 400, "ImageDecodeError"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}).encode(), 400,
         "context_length_exceeded"),
    ],
)
def test_bad_requests_get_openai_errors(server_url, payload: bytes, status: int, code: str) -> None:
    response = httpx.post(server_url + "/v1/chat/completions", content=payload,
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert "Traceback" not in response.text and error["message"]


def test_api_key_is_required_when_set(tiny_engine) -> None:
    with running_server(tiny_engine, ServerSettings(api_key="s3cret")) as url:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 401
        assert httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert httpx.get(url + "/health").status_code == 200
        metrics = httpx.get(url + "/metrics", headers={"Authorization": "Bearer s3cret"})
        assert 'nvlm_requests_total{status="200"}' in metrics.text


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}, "metric": {"type": "boolean"}},
            "required": ["city", "metric"],
            "additionalProperties": False,
        },
    },
}
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
    "required": ["answer", "sure"],
    "additionalProperties": False,
}


def test_openai_client_forced_tool_call_and_json_schema(server_url) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server_url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        reply = client.chat.completions.create(model="nvlm-tiny", messages=messages, tools=[WEATHER_TOOL],
                                               tool_choice=choice, max_tokens=60 * TOKEN_SCALE)
        calls = reply.choices[0].message.tool_calls
        assert reply.choices[0].finish_reason == "tool_calls"
        assert calls and all(c.function.name == "get_weather" for c in calls)
        args = json.loads(calls[0].function.arguments)
        assert args["city"] in ("Paris", "Rome") and isinstance(args["metric"], bool)
    # the call's result fed back as a tool message is accepted
    follow = client.chat.completions.create(
        model="nvlm-tiny", max_tokens=4,
        messages=[*messages, reply.choices[0].message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": calls[0].id, "content": "18 C, sunny"}])
    assert follow.choices[0].message.role == "assistant"
    structured = client.chat.completions.create(
        model="nvlm-tiny", messages=[{"role": "user", "content": "Is it raining?"}], max_tokens=40 * TOKEN_SCALE,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}})
    body = json.loads(structured.choices[0].message.content)
    assert body["answer"] in ("yes", "no") and isinstance(body["sure"], bool)


def test_streamed_tool_call_deltas(server_url) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server_url + "/v1", api_key="unused")
    stream = client.chat.completions.create(model="nvlm-tiny", messages=[{"role": "user", "content": "Weather?"}],
                                            tools=[WEATHER_TOOL], tool_choice="required", max_tokens=60 * TOKEN_SCALE, stream=True)
    chunks = [c for c in stream if c.choices]
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    arguments = "".join(d.function.arguments or "" for d in deltas if d.index == 0)
    assert json.loads(arguments)["city"] in ("Paris", "Rome")


def test_chat_openai_tools_and_structured_output(server_url) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server_url + "/v1", api_key="unused", model="nvlm-tiny", max_tokens=60 * TOKEN_SCALE, temperature=0)
    message = llm.bind_tools([WEATHER_TOOL], tool_choice="any").invoke("Weather in Rome?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
    assert message.tool_calls[0]["args"]["city"] in ("Paris", "Rome")
    result = llm.with_structured_output(ANSWER_SCHEMA | {"title": "answer"}, method="json_schema").invoke("Raining?")
    assert result["answer"] in ("yes", "no") and isinstance(result["sure"], bool)


@pytest.mark.parametrize(
    "extra",
    [
        {"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tool_choice": "required"},
        {"tools": [WEATHER_TOOL], "tool_choice": "sometimes"},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
    ],
)
def test_bad_tool_requests_are_400(server_url, extra: dict) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    response = httpx.post(server_url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"]


def test_request_timeout_cancels_and_answers_504(tiny_engine) -> None:
    with running_server(tiny_engine, ServerSettings(request_timeout_s=0.5)) as url:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5000}
        started = time.time()
        response = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        assert time.time() - started < 20
        assert httpx.get(url + "/health").json()["running"] == 0


def test_image_urls_are_fetched_only_from_allowed_hosts(tiny_engine) -> None:
    import http.server
    import threading

    png = _png(64, 64, (200, 0, 0))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args) -> None:
            pass

    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    image_url = f"http://127.0.0.1:{images.server_address[1]}/red.png"
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                      {"type": "text", "text": "Color?"}]}], "max_tokens": 3}
    try:
        allowed = ServerSettings(images=ServerImagePolicy(allow_url_fetch=True, allowed_hosts=("127.0.0.1",)))
        with running_server(tiny_engine, allowed) as url:
            ok = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
            assert ok.status_code == 200, ok.text
            assert ok.json()["usage"]["prompt_tokens"] > 256  # the fetched image is in the prompt
        other = ServerSettings(images=ServerImagePolicy(allow_url_fetch=True, allowed_hosts=("images.example.com",)))
        with running_server(tiny_engine, other) as url:
            refused = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
            assert refused.status_code == 400 and "allowlist" in refused.json()["error"]["message"]
    finally:
        images.shutdown()
