"""OpenAI conformance of nvlm-serve: model names, unsupported fields, parallel_tool_calls,
logprobs and penalties; nothing a client sends is silently ignored."""

from __future__ import annotations

import json

import httpx
import pytest
from shared_paths import TOKEN_SCALE

import nvlm_server.app as server_app
from nvlm_engine.chat.logprobs import logprob_entry

from .test_server import WEATHER_TOOL

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "What's the weather in Paris?"}]


@pytest.fixture(scope="module")
def http(server_url):
    with httpx.Client(base_url=server_url, timeout=60) as client:
        yield client


def test_an_unknown_model_is_404_model_not_found(http) -> None:
    response = http.post(CHAT, json={"model": "gpt-4o", "messages": HI, "max_tokens": 2})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found" and "gpt-4o" in response.json()["error"]["message"]
    assert http.post(CHAT, json={"model": "nvlm-tiny", "messages": HI, "max_tokens": 2}).json()["model"] == "nvlm-tiny"
    assert http.post(CHAT, json={"messages": HI, "max_tokens": 2}).json()["model"] == "nvlm-tiny"


def test_models_carry_the_context_length(http, tiny_engine) -> None:
    (entry,) = http.get("/v1/models").json()["data"]
    assert entry["id"] == "nvlm-tiny" and entry["max_model_len"] == tiny_engine.context_length


@pytest.mark.parametrize("field, value", [("functions", [{"name": "f"}]), ("modalities", ["audio"]),
                                          ("logit_bias", {"50": 10}), ("store", True), ("service_tier", "flex")])
def test_an_unsupported_field_is_a_400_naming_it(http, field: str, value) -> None:
    response = http.post(CHAT, json={"messages": HI, "max_tokens": 2, field: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"]


def test_fields_clients_send_by_default_are_accepted(http) -> None:
    body = {"messages": HI, "max_tokens": 2, "n": 1, "user": "u1", "metadata": {"k": "v"}, "store": False,
            "logit_bias": {}, "stream_options": {"include_usage": True}, "stream": False, "parallel_tool_calls": True}
    assert http.post(CHAT, json=body).status_code == 200


def test_parallel_tool_calls_false_reaches_the_grammar_and_gives_one_call(http, monkeypatch) -> None:
    seen = []
    real = server_app._prepare

    def spy(service, chat, settings):
        seen.append(chat.tools)
        return real(service, chat, settings)

    monkeypatch.setattr(server_app, "_prepare", spy)
    body = {"messages": HI, "tools": [WEATHER_TOOL], "tool_choice": "required", "parallel_tool_calls": False,
            "max_tokens": 80 * TOKEN_SCALE}
    reply = http.post(CHAT, json=body).json()
    assert seen[-1].parallel is False and seen[-1].choice == "required"
    assert len(reply["choices"][0]["message"]["tool_calls"]) == 1


def test_tool_choice_none_keeps_the_tools_and_makes_no_call(http, monkeypatch) -> None:
    seen = []
    real = server_app._prepare

    def spy(service, chat, settings):
        seen.append(service.messages(chat)[0]["content"])
        return real(service, chat, settings)

    monkeypatch.setattr(server_app, "_prepare", spy)
    reply = http.post(CHAT, json={"messages": HI, "tools": [WEATHER_TOOL], "tool_choice": "none", "max_tokens": 8}).json()
    assert "get_weather" in seen[-1] and "<tools>" in seen[-1]
    assert "tool_calls" not in reply["choices"][0]["message"] and reply["choices"][0]["finish_reason"] != "tool_calls"


def test_logprobs_equal_the_engines_whole_and_streamed(http, tiny_engine) -> None:
    body = {"messages": HI, "max_tokens": 6, "logprobs": True, "top_logprobs": 2}
    reply = http.post(CHAT, json=body).json()
    content = reply["choices"][0]["logprobs"]["content"]
    prepared = tiny_engine.prepare(HI, max_new_tokens=6, logprobs=True, top_logprobs=2)
    (expected,) = tiny_engine.run([prepared])
    assert len(content) == len(expected.logprobs) == expected.usage.completion_tokens
    for entry, token in zip(content, expected.logprobs, strict=True):
        # the same entries ChatNVLM reports: a token's exact bytes (byte-level BPE may split a character)
        assert entry == logprob_entry(tiny_engine.tokenizer, token) | {"logprob": entry["logprob"],
                                                                         "top_logprobs": entry["top_logprobs"]}
        assert bytes(entry["bytes"]).decode("utf-8", errors="replace") == entry["token"]
        assert entry["logprob"] == pytest.approx(token.logprob, abs=1e-4)
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx([v for _, v in token.top], abs=1e-4)
    with http.stream("POST", CHAT, json={**body, "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    streamed = [e for c in chunks if c["choices"] and c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]


def test_presence_and_frequency_penalties_reach_the_engine(http, tiny_engine, monkeypatch) -> None:
    seen = []
    real = type(tiny_engine).prepare

    def spy(self, messages, **options):
        seen.append(options)
        return real(self, messages, **options)

    monkeypatch.setattr(type(tiny_engine), "prepare", spy)
    body = {"messages": HI, "max_tokens": 2, "presence_penalty": 0.5, "frequency_penalty": -0.25}
    assert http.post(CHAT, json=body).status_code == 200
    assert (seen[-1]["presence_penalty"], seen[-1]["frequency_penalty"]) == (0.5, -0.25)
