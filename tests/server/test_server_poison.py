"""One poisoned request never takes the other clients down (issue 10, C1), over real HTTP.

Values that used to overflow the logits or the seed are refused with a 400 or made safe, and a
request that still fails while being decoded gets its own error (an SSE error event followed by
`[DONE]`, or a 422 JSON error) while the concurrent streams finish with their solo answers.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

import nvlm_server.app as server_app
from nvlm_server.schemas import ChatCompletionRequest

PROMPTS = [f"Question number {i}: what is {i} plus {i}?" for i in range(6)]
MAX_TOKENS = 40
POISON = "Please poison this batch."


def _body(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "nvlm-tiny", "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS,
            "stream": True, **extra}


@pytest.fixture(scope="module")
def solo(tiny_engine) -> dict[str, str]:
    return {p: tiny_engine.generate([{"role": "user", "content": p}], max_new_tokens=MAX_TOKENS).text
            for p in [*PROMPTS, POISON]}


async def _stream(client: httpx.AsyncClient, body: dict[str, Any], started: asyncio.Event | None = None) -> list[Any]:
    """The SSE payloads of one streamed request, `[DONE]` included; `started` is set at the first content."""
    events: list[Any] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
            if started is not None and _text(events):
                started.set()
    return events


def _text(events: list[Any]) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if isinstance(e, dict) and e.get("choices"))


def _six_streams_and(server_url: str, poisoned: dict[str, Any]) -> tuple[list[list[Any]], list[Any]]:
    """Start six streams, send `poisoned` once all six are decoding, and collect everything."""

    async def main() -> tuple[list[list[Any]], list[Any]]:
        async with httpx.AsyncClient(base_url=server_url, timeout=120) as client:
            started = [asyncio.Event() for _ in PROMPTS]
            streams = [asyncio.create_task(_stream(client, _body(p), s)) for p, s in zip(PROMPTS, started)]
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 60)
            bad = await _stream(client, poisoned)
            return list(await asyncio.gather(*streams)), bad

    return asyncio.run(main())


def _assert_the_six_finished(streams: list[list[Any]], solo: dict[str, str]) -> None:
    for prompt, events in zip(PROMPTS, streams):
        assert events[-1] == "[DONE]", events[-3:]
        assert not any(isinstance(e, dict) and "error" in e for e in events)
        assert _text(events) == solo[prompt]


def test_tiny_temperature_is_greedy_and_harms_nobody(server_url, solo) -> None:
    streams, poisoned = _six_streams_and(server_url, _body(POISON, temperature=1e-300))
    _assert_the_six_finished(streams, solo)
    assert poisoned[-1] == "[DONE]" and _text(poisoned) == solo[POISON]  # 1e-300 is greedy


@pytest.fixture()
def poisoned_prepare(monkeypatch):
    """Let a decode failure through both validation layers for the request that says POISON:
    the request then fails at its first sampled token, as 1e-300 did before the fix."""
    real = server_app._prepare

    def prepare(service, chat, settings):
        prepared = real(service, chat, settings)
        if any(POISON in str(m["content"]) for m in chat.messages):
            object.__setattr__(prepared.request.options, "temperature", 1e-300)
        return prepared

    monkeypatch.setattr(server_app, "_prepare", prepare)


def test_a_failing_stream_gets_its_own_error_event_and_done(server_url, solo, poisoned_prepare) -> None:
    streams, poisoned = _six_streams_and(server_url, _body(POISON))
    _assert_the_six_finished(streams, solo)
    errors = [e for e in poisoned if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and poisoned[-1] == "[DONE]"
    assert errors[0]["error"]["code"] == "RequestFailedError"
    assert "other requests were not affected" in errors[0]["error"]["message"]
    assert POISON not in errors[0]["error"]["message"]


def test_a_failing_request_is_a_422_not_a_500(server_url, solo, poisoned_prepare) -> None:
    from openai import OpenAI, UnprocessableEntityError

    response = httpx.post(server_url + "/v1/chat/completions", json=_body(POISON, stream=False), timeout=60)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "RequestFailedError"
    client = OpenAI(base_url=server_url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(UnprocessableEntityError):
        client.chat.completions.create(model="nvlm-tiny", messages=[{"role": "user", "content": POISON}], max_tokens=4)
    # the server goes on serving
    reply = client.chat.completions.create(model="nvlm-tiny", messages=[{"role": "user", "content": PROMPTS[0]}],
                                           max_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == solo[PROMPTS[0]]


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ('"seed": 1180591620717411303424', "seed"),  # 2**70
        ('"seed": -9223372036854775809', "seed"),  # below int64
        ('"temperature": NaN', "temperature"),
        ('"temperature": Infinity', "temperature"),
        ('"temperature": 2.5', "temperature"),
        ('"top_p": NaN', "top_p"),
        ('"repetition_penalty": Infinity', "repetition_penalty"),
        ('"repetition_penalty": NaN', "repetition_penalty"),
    ],
)
def test_unsafe_numbers_are_400(server_url, raw: str, param: str) -> None:
    body = '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, ' + raw + "}"
    response = httpx.post(server_url + "/v1/chat/completions", content=body.encode(),
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    # NaN and Infinity may already be refused by the strict JSON reader, before the schema
    assert error["code"] in ("invalid_request", "invalid_json")
    assert error["param"] == param or param in error["message"]


@pytest.mark.parametrize(
    "field", [{"temperature": math.nan}, {"temperature": math.inf}, {"top_p": math.nan},
              {"repetition_penalty": math.inf}, {"repetition_penalty": math.nan}, {"seed": 2**64}, {"seed": -(2**63) - 1}],
)
def test_the_schema_refuses_them_too(field: dict[str, Any]) -> None:
    """Defence in depth: whatever JSON reader produced the payload, the schema refuses these values."""
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **field})
    assert info.value.errors()[0]["loc"] == tuple(field)


@pytest.mark.parametrize("seed", [-1, 2**64 - 1, -(2**63)])
def test_seeds_in_64_bits_are_served(server_url, seed: int) -> None:
    body = _body("Hi", stream=False, temperature=1.0, seed=seed, max_tokens=4)
    response = httpx.post(server_url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    again = httpx.post(server_url + "/v1/chat/completions", json=body, timeout=60)
    assert again.json()["choices"][0]["message"] == response.json()["choices"][0]["message"]
