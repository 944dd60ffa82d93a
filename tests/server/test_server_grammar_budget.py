"""Grammar compilation cannot freeze nvlm-serve: size limits, a time budget off the event loop, a cache.

A regex quantifier such as `{1,30000}` in a `response_format` schema used to compile on the
event loop for about a minute, holding every request and `/health`; a tools schema with
`{1,12000}` stalled running streams for seconds. These run the real server and the real
xgrammar compiler on the session's tiny checkpoint (real tokenizer when ../shared has it).
"""

from __future__ import annotations

import threading
import time
import uuid

import httpx

from nvlm_engine.chat import grammars_for
from nvlm_server import ServerSettings

from .conftest import running_server

HOSTILE_PATTERN = {"type": "object", "properties": {"s": {"type": "string", "pattern": "^a{1,30000}$"}},
                   "required": ["s"]}
HOSTILE_TOOL = {"type": "function", "function": {"name": "spell", "parameters": {
    "type": "object", "properties": {"word": {"type": "string", "pattern": "^[a-z]{1,12000}$"}}, "required": ["word"]}}}


def slow_schema() -> dict:
    """Within every static limit, yet ~0.7 s to compile for a 152k vocabulary (each property ~0.24 s)."""
    pattern = "^{0}{{1,1000}}{1}{{1,1000}}{2}{{1,1000}}$"
    props = {f"p{i}": {"type": "string", "pattern": pattern.format(*abc)}
             for i, abc in enumerate(["abc", "def", "ghi"])}
    return {"type": "object", "properties": props, "required": list(props)}


def many_optional_properties() -> dict:
    """Within every static limit, yet ~8 s to compile (3 objects of 250 optional properties: xgrammar
    0.2.9 grows quadratically in optional properties)."""
    def obj(k: str) -> dict:
        return {"type": "object", "properties": {f"{k}{i}": {"type": "string"} for i in range(250)}}

    return {"type": "object", "properties": {k: obj(k) for k in "abc"}, "required": list("abc")}


def wait_for_compiles(engine, seconds: float = 60) -> None:
    """Let compiles that ran past their budget end, so that they do not slow the next test."""
    deadline = time.monotonic() + seconds
    while grammars_for(engine).stats.pending and time.monotonic() < deadline:
        time.sleep(0.05)


def json_schema_body(schema: dict, **extra) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}, **extra}


def post_in_thread(url: str, body: dict) -> tuple[threading.Thread, dict]:
    """POST `body` from another thread; the dict gets `response`, `started`, `ended`."""
    out: dict = {}

    def run() -> None:
        out["started"] = time.monotonic()
        out["response"] = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        out["ended"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_health_answers_while_a_hostile_response_format_is_handled(server_url) -> None:
    thread, out = post_in_thread(server_url, json_schema_body(HOSTILE_PATTERN))
    time.sleep(0.3)  # the hostile request is being handled (it compiled on the loop for ~60 s)
    started = time.monotonic()
    health = httpx.get(server_url + "/health", timeout=5)
    assert health.status_code == 200 and time.monotonic() - started < 2
    thread.join(30)
    assert out["response"].status_code == 400


def test_health_answers_while_a_schema_within_the_limits_compiles_for_seconds(tiny_engine) -> None:
    with running_server(tiny_engine, ServerSettings(grammar_timeout_s=5.0)) as url:
        thread, out = post_in_thread(url, json_schema_body(many_optional_properties()))
        time.sleep(0.2)  # compiling now: on the loop this held /health until the compile or its budget ended
        started = time.monotonic()
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        assert time.monotonic() - started < 2  # a liveness bound (a loaded 2-core box), not a benchmark
        thread.join(30)
        response = out["response"]  # 400 past the budget; a machine that compiles it within 5 s answers 200
        assert response.status_code == 200 or response.json()["error"]["code"] == "grammar_too_complex", response.text
    wait_for_compiles(tiny_engine)


def test_a_hostile_schema_is_refused_with_400_at_once(server_url) -> None:
    started = time.monotonic()
    response = httpx.post(server_url + "/v1/chat/completions", json=json_schema_body(HOSTILE_PATTERN), timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "grammar_too_complex" and "30000" in error["message"] and "1000" in error["message"]
    assert time.monotonic() - started < 2


def test_a_schema_past_the_time_budget_is_refused_and_remembered(tiny_engine) -> None:
    # A 1 ms budget: no real compile of `slow_schema` fits in it, on any machine.
    with running_server(tiny_engine, ServerSettings(grammar_timeout_s=0.001)) as url:
        stats = grammars_for(tiny_engine).stats
        compiles, refused = stats.compiles, stats.refused
        thread, out = post_in_thread(url, json_schema_body(slow_schema()))
        time.sleep(0.1)
        started = time.monotonic()
        assert httpx.get(url + "/health", timeout=5).status_code == 200  # while the compile runs on
        assert time.monotonic() - started < 2
        thread.join(30)
        response = out["response"]
        assert response.status_code == 400 and response.json()["error"]["code"] == "grammar_too_complex", response.text
        assert "budget" in response.json()["error"]["message"]
        assert out["ended"] - out["started"] < 2
        again = httpx.post(url + "/v1/chat/completions", json=json_schema_body(slow_schema()), timeout=30)
        assert again.status_code == 400 and again.json()["error"]["code"] == "grammar_too_complex"
        assert stats.compiles == compiles + 1 and stats.refused == refused + 2  # the repeat is not compiled again
    wait_for_compiles(tiny_engine)


def test_the_same_schema_twice_is_compiled_once(server_url, tiny_engine) -> None:
    name = f"k{uuid.uuid4().hex[:8]}"  # a schema no other test compiled
    schema = {"type": "object", "properties": {name: {"type": "integer"}}, "required": [name]}
    stats = grammars_for(tiny_engine).stats
    compiles, hits = stats.compiles, stats.hits
    for _ in range(2):
        response = httpx.post(server_url + "/v1/chat/completions", json=json_schema_body(schema), timeout=60)
        assert response.status_code == 200, response.text
    assert stats.compiles == compiles + 1 and stats.hits == hits + 1


def test_a_running_stream_keeps_streaming_while_a_hostile_tools_schema_is_handled(server_url) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3000, "stream": True}
    arrivals: list[float] = []
    stop = threading.Event()

    def read() -> None:
        url = server_url + "/v1/chat/completions"
        with httpx.Client(timeout=60) as client, client.stream("POST", url, json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    arrivals.append(time.monotonic())
                if stop.is_set() or line == "data: [DONE]":
                    break

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while len(arrivals) < 3:
        assert reader.is_alive()
        time.sleep(0.01)
    tools = {"messages": [{"role": "user", "content": "spell it"}], "max_tokens": 4, "tools": [HOSTILE_TOOL],
             "tool_choice": "required"}
    sent = time.monotonic()
    response = httpx.post(server_url + "/v1/chat/completions", json=tools, timeout=60)
    answered = time.monotonic()
    time.sleep(0.3)
    stop.set()
    reader.join(30)
    assert response.status_code == 400 and response.json()["error"]["code"] == "grammar_too_complex", response.text
    window = [t for t in arrivals if sent - 0.5 <= t <= answered + 0.3]
    assert window and window[-1] > answered, "the stream ended before the tools request was answered"
    gaps = [b - a for a, b in zip(window, window[1:])]
    assert max(gaps, default=0.0) < 1.5, f"the stream stalled {max(gaps):.1f}s"
