"""Fuzzing the request schema on a real nvlm-serve: whatever a client sends, the answer is JSON (or a
well-formed event stream) with a status below 500.

Two generators, both derandomized so CI runs the same ~320 cases every time (about 20 s):
request-shaped bodies (every field of `ChatCompletionRequest` plausible, then 0-2 values at any
depth replaced by any JSON value, huge numbers included, or given a lone surrogate), and raw
bytes (random, mutated, deeply nested, NaN and overflowing number tokens, bad UTF-8). Generation
is capped at 2 tokens so the cases stay cheap.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError

from nvlm_server import schemas

CHAT = "/v1/chat/completions"
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _tiny_png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# --- JSON values, with what a strict client would never send ---------------------------------

surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"])
texts = st.text(max_size=12)
odd_texts = texts | st.text(st.characters() | surrogates, min_size=1, max_size=6)
numbers = (st.integers(-(2**64), 2**64) | st.integers(-(10**40), 10**40) | st.sampled_from([0, -1, 1, 2**31, 2**63])
           | st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([1e308, -1e308, 5e-324, -0.0]))
leaves = st.none() | st.booleans() | numbers | odd_texts
json_values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(odd_texts, inner, max_size=3),
                           max_leaves=8)

# --- plausible requests: every field of ChatCompletionRequest, each optional ---------------

schema_like = st.fixed_dictionaries({"type": st.sampled_from(["object", "string", "integer", "array", "boolean"])},
                                    optional={"properties": st.dictionaries(texts, json_values, max_size=2),
                                              "required": st.lists(texts, max_size=2),
                                              "enum": st.lists(json_values, max_size=3),
                                              "items": json_values, "additionalProperties": json_values})
url = st.sampled_from([_tiny_png(), "data:image/png;base64,AAAA", "data:,", "http://127.0.0.1:9/x.png", "/etc/passwd",
                       "file:///etc/hostname", "data:image/png;base64," + "A" * 3]) | texts
part = (st.fixed_dictionaries({"type": st.just("text"), "text": texts})
        | st.fixed_dictionaries({"type": st.just("image_url"),
                                 "image_url": st.fixed_dictionaries({"url": url}, optional={"detail": texts})}))
tool_call = st.fixed_dictionaries(
    {"function": st.fixed_dictionaries({"name": texts}, optional={"arguments": st.sampled_from(["{}", '{"city": "Rome"}'])
                                                                   | texts})},
    optional={"id": texts, "type": st.just("function")})


def message(roles: list[str]) -> st.SearchStrategy:
    return st.fixed_dictionaries({"role": st.sampled_from(roles)}, optional={
        "content": st.none() | texts | st.lists(part, max_size=3), "name": texts,
        "tool_calls": st.lists(tool_call, max_size=2), "tool_call_id": texts})


conversation = st.builds(lambda head, middle, last: [*head, *middle, last],  # mostly well-ordered turns
                         st.lists(message(["system", "developer"]), max_size=1),
                         st.lists(message(["user", "assistant", "tool"]), max_size=2),
                         st.fixed_dictionaries({"role": st.just("user"), "content": texts | st.lists(part, max_size=2)}))
tool = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.sampled_from(["get_weather", "f"]) | texts}, optional={"description": texts, "parameters": schema_like})})
FIELDS = {  # every field of schemas.ChatCompletionRequest but messages
    "model": st.none() | texts,
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "max_tokens": st.sampled_from([1, 2]),
    "max_completion_tokens": st.sampled_from([1, 2]),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1, exclude_min=True),
    "top_k": st.integers(0, 100),
    "repetition_penalty": st.floats(0.5, 2),
    "seed": st.integers(0, 2**32),
    "stop": texts | st.lists(texts, max_size=3),
    "n": st.just(1),
    "tools": st.lists(tool, max_size=2),
    "tool_choice": st.sampled_from(["auto", "none", "required", {"type": "function", "function": {"name": "get_weather"}}]),
    "response_format": st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "json_object", "json_schema"])},
        optional={"json_schema": st.fixed_dictionaries({"name": texts}, optional={"schema": schema_like})}),
    "parallel_tool_calls": st.booleans(),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 20),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "logit_bias": st.just({}) | st.dictionaries(st.sampled_from(["1", "50"]), st.floats(-100, 100), max_size=1),
    "user": texts,
    "metadata": st.dictionaries(st.sampled_from(["k"]), texts, max_size=1),
    "store": st.booleans(),
    "continue_final_message": st.none() | st.booleans(),
    "add_generation_prompt": st.none() | st.booleans(),
}
assert set(FIELDS) == set(schemas.ChatCompletionRequest.model_fields) - {"messages"}
plausible = st.fixed_dictionaries({"messages": conversation}, optional=FIELDS)  # type: ignore[arg-type]


def _places(value: Any, path: tuple = ()) -> list[tuple]:
    """Every path into a JSON value (dict keys and list indices), the root excluded."""
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [place for key, item in children for place in [(*path, key), *_places(item, (*path, key))]]


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    """A plausible request with 0-2 of its values, at any depth, replaced by any JSON value at all
    or given a lone surrogate (in a string that is there)."""
    body = draw(plausible)
    for _ in range(draw(st.integers(0, 2))):
        places = _places(body)
        strings = [place for place in places if isinstance(_at(body, place), str)]
        if strings and draw(st.booleans()):
            place = draw(st.sampled_from(strings))
            text, cut = _at(body, place), draw(st.integers(0, len(_at(body, place))))
            value = text[:cut] + draw(surrogates) + text[cut:]
        else:
            place, value = draw(st.sampled_from(places)), draw(json_values)
        _at(body, place[:-1])[place[-1]] = value
    return body


def _at(value: Any, place: tuple) -> Any:
    for key in place:
        value = value[key]
    return value


def _cheap(body: dict[str, Any]) -> dict[str, Any]:
    """Cap generation at 2 tokens where the request would be accepted: the fuzz is about the edge, not decoding."""
    try:
        request = schemas.ChatCompletionRequest.model_validate(body)
    except (ValidationError, ValueError):
        return body
    if (request.max_completion_tokens or request.max_tokens or 10**6) > 2:
        body["max_completion_tokens"] = 2
    return body


def _costly(payload: bytes) -> bool:
    """Whether a raw body would be accepted with a long generation (a mutation hit the "max_tokens" key)."""
    try:
        body = json.loads(payload)
        return _cheap(dict(body)) != body
    except (ValueError, TypeError, RecursionError):
        return False


def _encode(body: Any, ascii_only: bool) -> bytes:
    # ensure_ascii writes lone surrogates as \udxxx escapes; otherwise they become raw (invalid) UTF-8 bytes
    return json.dumps(body, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


# --- raw bodies ----------------------------------------------------------------------------

VALID = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
TOKENS = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"9" * 5000, b"-0", b"1E400", b'"\\ud800"',
          b'"\\udfff\\ud800"', b'"\xed\xa0\x80"', b'"\xff"', b'"\xe9"', b"\x00", b'"\\u0000"', b"[" * 3000, b"{" * 3000,
          b"true", b"null", b'"' + b"\\" * 7 + b'"']
raw_bodies = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda n, c: c * n, st.integers(1, 200_000), st.sampled_from([b"[", b"{", b'{"a":', b"[{"])),
    st.builds(lambda pos, junk: VALID[:pos] + junk + VALID[pos:], st.integers(0, len(VALID)),
              st.binary(min_size=1, max_size=4) | st.sampled_from(TOKENS)),
    st.builds(lambda key, token: VALID[:-1] + b', "' + key.encode() + b'": ' + token + b"}",
              st.sampled_from(sorted(set(FIELDS) - {"max_tokens"})), st.sampled_from(TOKENS)),  # null: 1024 tokens
)


@pytest.fixture(scope="module")
def client(server_url):
    with httpx.Client(base_url=server_url, timeout=60) as http:
        yield http


def _assert_sane(response: httpx.Response) -> None:
    event(f"status {response.status_code}")  # pytest --hypothesis-show-statistics: how many got through
    assert response.status_code < 500, response.text[:500]
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        assert response.status_code == 200
        events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", events[-3:]
        assert all("error" not in json.loads(data) for data in events[:-1]), events
        return
    body = response.json()  # JSON, whatever the status
    if response.status_code >= 400:
        assert body["error"]["message"] and "Traceback" not in response.text
    else:
        assert body["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")


@FUZZ
@given(body=requests(), ascii_only=st.booleans())
def test_fuzzed_requests_never_500(client: httpx.Client, body: dict[str, Any], ascii_only: bool) -> None:
    response = client.post(CHAT, content=_encode(_cheap(body), ascii_only), headers={"content-type": "application/json"})
    _assert_sane(response)


@settings(FUZZ, max_examples=120)
@given(payload=raw_bodies)
def test_fuzzed_raw_bodies_never_500(client: httpx.Client, payload: bytes) -> None:
    assume(not _costly(payload))
    response = client.post(CHAT, content=payload, headers={"content-type": "application/json"})
    _assert_sane(response)
