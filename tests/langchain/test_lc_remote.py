"""ChatNVLM(base_url=...): the remote backend against a real nvlm-serve on a loopback port.

The server runs the session's tiny engine; the local ChatNVLM (the `chat` fixture) runs the
same checkpoint in-process, so greedy answers, usage and finish reasons must be equal. The
openai client really talks HTTP to the server: nothing on the transport is faked. Request
building (vLLM's quirks) and answer reading (calls written as text, as vLLM without a tool
parser returns them) are also checked as pure units, on the openai client's own types.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any, Literal

import pytest

pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("langchain_tests")
import httpx
import test_lc_standard as standard  # the local suites and their reasoned xfails (a module: not collected twice)
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_tests.unit_tests import ChatModelUnitTests
from lc_inputs import b64, pdf_bytes, png_bytes, random_image
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from server.conftest import running_server  # tests/server: the real nvlm-serve on a loopback port
from shared_paths import TOKEN_SCALE
from typing_extensions import TypedDict

import nvlm_server.openai_output
from nvlm_engine import ImageSourceError
from nvlm_langchain import ChatNVLM
from nvlm_langchain.remote import RemoteError, ServerConnectionError, ServerError, build_request
from nvlm_langchain.remote_responses import CompletionStream, message_from_completion
from nvlm_server import ServerSettings

KEY = "remote-test-key"
_REFUSAL = "tools and response_format are not supported"
SERVER_LACKS_TOOLS = pytest.mark.skipif(
    _REFUSAL in Path(nvlm_server.openai_output.__file__).read_text(),
    reason=f"nvlm-serve still answers 400 '{_REFUSAL} by this server build' (nvlm_server/openai_output.py)",
)


@pytest.fixture(scope="module")
def server_url(tiny_engine) -> Any:
    # the integration suite's model override asks for "nvlm-tiny-renamed": one more name of the model
    settings = ServerSettings(model_name="nvlm-tiny", model_aliases=("nvlm-tiny-renamed",), api_key=KEY, max_batch_size=8)
    with running_server(tiny_engine, settings) as url:
        yield url


@pytest.fixture(scope="module")
def remote(server_url: str) -> ChatNVLM:
    return ChatNVLM(base_url=server_url + "/v1", api_key=KEY, model="nvlm-tiny", max_tokens=12, max_retries=0)


_suite: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _suite_server(server_url: str) -> None:
    _suite["base_url"] = server_url + "/v1"


def offline(**fields: Any) -> ChatNVLM:
    """A remote ChatNVLM whose server is never called (request-building tests)."""
    return ChatNVLM(base_url="http://127.0.0.1:9/v1", model="nvidia/NVLM-D-72B", **fields)


def same_answer(remote_message: AIMessage, local_message: AIMessage) -> None:
    assert remote_message.content == local_message.content
    assert remote_message.usage_metadata == local_message.usage_metadata
    assert remote_message.response_metadata["finish_reason"] == local_message.response_metadata["finish_reason"]


# --- the same answers as the local model ---------------------------------------------------------


@pytest.mark.parametrize("messages", [
    [HumanMessage("Name three colours.")],
    [SystemMessage("Be brief."), HumanMessage("Hello"), AIMessage("Hi!"), HumanMessage("How are you?")],
], ids=["default system prompt", "system and history"])
def test_invoke_equals_the_local_model(remote, chat, messages) -> None:
    answer = remote.invoke(messages)
    same_answer(answer, chat.invoke(messages))
    assert answer.response_metadata["model_name"] == "nvlm-tiny"


def test_stop_strings_and_sampling_options_reach_the_server(remote, chat) -> None:
    full = chat.invoke("Hello")
    stop = full.content[3:6]
    assert remote.invoke("Hello", stop=[stop]).content == chat.invoke("Hello", stop=[stop]).content
    sampled = {"temperature": 0.8, "top_p": 0.9, "top_k": 20, "seed": 7}
    assert remote.invoke("Hello", **sampled).content == remote.invoke("Hello", **sampled).content  # seeded


def test_image_forms_equal_the_local_model(remote, chat, tmp_path) -> None:
    data = png_bytes(random_image(224, 160, seed=5))  # one tile
    path = tmp_path / "picture.png"
    path.write_bytes(data)
    forms = {
        "path": {"type": "image", "url": str(path)},
        "file URL": {"type": "image", "url": path.as_uri()},
        "base64": {"type": "image", "base64": b64(data), "mime_type": "image/png"},
        "openai data URL": {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(data)}"}},
    }
    question = {"type": "text", "text": "What is in the picture?"}
    expected = chat.invoke([HumanMessage([question, forms["path"]])])
    assert expected.usage_metadata["input_tokens"] > 256  # the image is in the prompt
    for block in forms.values():
        same_answer(remote.invoke([HumanMessage([question, block])]), expected)


def test_pdf_pages_equal_the_local_model(remote, chat) -> None:
    pytest.importorskip("pypdfium2")
    block = {"type": "file", "base64": b64(pdf_bytes(random_image(100, 140, seed=6))), "mime_type": "application/pdf"}
    messages = [HumanMessage([{"type": "text", "text": "Summarize."}, block])]
    same_answer(remote.invoke(messages), chat.invoke(messages))  # a rendered page travels as a lossless PNG


def test_logprobs_equal_the_local_model(remote, chat) -> None:
    # nvlm-serve answers choices[].logprobs when asked; they land where the local model's do
    # (and ChatOpenAI's): response_metadata["logprobs"] == {"content": [...]}.
    asked = {"logprobs": True, "top_logprobs": 2, "max_tokens": 8}
    local = chat.invoke("Hello", **asked).response_metadata["logprobs"]["content"]
    answer = remote.invoke("Hello", **asked)
    content = answer.response_metadata["logprobs"]["content"]
    assert [e["token"] for e in content] == [e["token"] for e in local]
    assert len(content) == answer.usage_metadata["output_tokens"]
    assert [e["logprob"] for e in content] == pytest.approx([e["logprob"] for e in local], abs=1e-3)
    assert [len(e["top_logprobs"]) for e in content] == [2] * len(content)
    whole = sum(remote.stream("Hello", **asked), start=AIMessageChunk(""))
    streamed = whole.response_metadata["logprobs"]["content"]
    # The repeat reuses the cached prompt (prefix caching): same tokens, logprobs equal up to float rounding.
    assert [(e["token"], [t["token"] for t in e["top_logprobs"]]) for e in streamed] == [
        (e["token"], [t["token"] for t in e["top_logprobs"]]) for e in content]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content], abs=1e-4)
    assert "logprobs" not in remote.invoke("Hello").response_metadata  # only when asked


def test_stream_concatenates_to_invoke_with_usage_on_the_last_chunk(remote, chat) -> None:
    messages = [SystemMessage("Be brief."), HumanMessage("Name three colours.")]
    invoked = remote.invoke(messages)
    chunks = list(remote.stream(messages))
    assert len(chunks) > 3 and all(isinstance(c, AIMessageChunk) for c in chunks)
    assert "".join(c.content for c in chunks) == invoked.content == chat.invoke(messages).content
    assert [c.chunk_position for c in chunks] == [None] * (len(chunks) - 1) + ["last"]
    assert [c.usage_metadata is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].usage_metadata == invoked.usage_metadata
    assert chunks[-1].response_metadata == invoked.response_metadata


@pytest.mark.asyncio
async def test_astream_and_ainvoke(remote) -> None:
    expected = remote.invoke("Hello")
    chunks = [c async for c in remote.astream("Hello")]
    assert "".join(c.content for c in chunks) == expected.content
    assert chunks[-1].usage_metadata == expected.usage_metadata
    same_answer(await remote.ainvoke("Hello"), expected)


def test_stopping_a_stream_early_frees_the_server_slot(remote, server_url) -> None:
    stream = remote.stream("Tell me a long story.", max_tokens=5000)  # ~15 s if it ran to the end
    next(stream)
    stream.close()  # closes the HTTP response: the server cancels the request
    deadline = time.monotonic() + 5
    while httpx.get(server_url + "/health").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(server_url + "/health").json()["running"] == 0


def test_batch_and_abatch_send_concurrent_requests(remote, chat) -> None:
    inputs = ["Hello", "Hey", "How are you?", "Good morning"]
    alone = [chat.invoke(x).content for x in inputs]
    assert [m.content for m in remote.batch(inputs)] == alone
    assert [m.content for m in asyncio.run(remote.abatch(inputs, config={"max_concurrency": 2}))] == alone
    bad = [HumanMessage([{"type": "audio", "base64": "AAAA", "mime_type": "audio/wav"}])]
    results = remote.batch(["Hello", bad], return_exceptions=True)
    assert results[0].content == alone[0] and isinstance(results[1], ValueError)


# --- errors --------------------------------------------------------------------------------------


def test_server_errors_are_clear_exceptions_with_the_servers_message(remote, server_url) -> None:
    with pytest.raises(ServerError, match=r"\(400, context_length_exceeded\): .*context length") as caught:
        remote.invoke("Hello", max_tokens=10**6)
    assert caught.value.status_code == 400 and caught.value.code == "context_length_exceeded"
    with pytest.raises(ServerError, match="context length"):
        list(remote.stream("Hello", max_tokens=10**6))
    with pytest.raises(ServerError, match=r"\(401, invalid_api_key\).*NVLM_API_KEY"):
        remote.model_copy(update={"api_key": None}).invoke("Hello")
    tiny = {"type": "image", "base64": b64(png_bytes(random_image(8, 8))), "mime_type": "image/png"}
    too_many = HumanMessage([tiny] * 9)
    with pytest.raises(ServerError, match="at most 8 images"):
        remote.invoke([too_many])


def test_unreachable_server_and_local_refusals() -> None:
    unreachable = offline(max_retries=0, timeout=2)
    with pytest.raises(ServerConnectionError, match="cannot reach http://127.0.0.1:9/v1"):
        unreachable.invoke("Hello")
    with pytest.raises(ImageSourceError, match="allow_url_fetch"):  # refused before any request
        unreachable.invoke([HumanMessage([{"type": "image", "url": "http://example.com/a.png"}, "?"])])
    with pytest.raises(ValueError, match="max_tiles is the server's setting"):
        unreachable.invoke("Hello", max_tiles=2)
    with pytest.raises(ValueError, match="unknown call option"):
        unreachable.invoke("Hello", tempreature=0.5)


def test_without_the_openai_package_the_error_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "openai", None)  # `import openai` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'nvlm-langchain\[remote\]'"):
        offline().invoke("Hello")


# --- tools and structured output through the server ---------------------------------------------


@tool
def get_weather(city: Literal["Paris", "Tokyo", "Lima"], unit: Literal["C", "F"] = "C") -> str:
    """Get the current weather in a city."""
    return f"22 degrees {unit} and sunny in {city}"


class TicketDict(TypedDict):
    """A support ticket."""

    priority: Literal["low", "medium", "high"]
    urgent: bool


@SERVER_LACKS_TOOLS
def test_tool_calling_through_the_server_equals_the_local_model(remote, chat) -> None:
    question = "What's the weather in Paris?"
    local = chat.bind_tools([get_weather], tool_choice="get_weather").invoke(question, max_tokens=40 * TOKEN_SCALE)
    bound = remote.bind_tools([get_weather], tool_choice="get_weather")
    message = bound.invoke(question, max_tokens=40 * TOKEN_SCALE)  # the server's grammar: always a valid call
    assert message.tool_calls and not message.invalid_tool_calls, message
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and call["id"]
    get_weather.args_schema.model_validate(call["args"])
    assert [(c["name"], c["args"]) for c in local.tool_calls] == [(call["name"], call["args"])]
    same_answer(message, local)  # content, usage, finish reason "tool_calls"
    chunks = list(bound.stream(question, max_tokens=40 * TOKEN_SCALE))
    assert any(c.tool_call_chunks for c in chunks)
    streamed = sum(chunks[1:], chunks[0])
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [(call["name"], call["args"])]
    # The call and its result go back as OpenAI tool traffic: the prompt is the local model's.
    history = [HumanMessage(question), message, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    for choice in ("none", "auto"):
        same_answer(remote.bind_tools([get_weather], tool_choice=choice).invoke(history),
                    chat.bind_tools([get_weather], tool_choice=choice).invoke(history))


@SERVER_LACKS_TOOLS
def test_a_truncated_call_is_invalid_whole_and_streamed(remote) -> None:
    bound = remote.bind_tools([get_weather], tool_choice="get_weather")
    whole = bound.invoke("Weather in Paris?", max_tokens=40 * TOKEN_SCALE)
    cut = whole.usage_metadata["output_tokens"] - 4  # inside the arguments, after the call's name
    truncated = bound.invoke("Weather in Paris?", max_tokens=cut)
    assert not truncated.tool_calls and len(truncated.invalid_tool_calls) == 1
    chunks = list(bound.stream("Weather in Paris?", max_tokens=cut))
    streamed = sum(chunks[1:], chunks[0])
    assert not streamed.tool_calls and len(streamed.invalid_tool_calls) == 1


@SERVER_LACKS_TOOLS
def test_structured_output_through_the_server(remote) -> None:
    llm = remote.model_copy(update={"max_tokens": 40 * TOKEN_SCALE})
    ticket = llm.with_structured_output(TicketDict).invoke("File a ticket about the login button.")
    assert ticket["priority"] in ("low", "medium", "high") and isinstance(ticket["urgent"], bool)
    assert isinstance(llm.with_structured_output(None, method="json_mode").invoke("Reply in JSON."), dict)


@SERVER_LACKS_TOOLS
def test_structured_output_through_the_server_equals_the_local_model(remote, chat) -> None:
    question = "File a ticket about the login button."
    local, served = (m.model_copy(update={"max_tokens": 40 * TOKEN_SCALE}) for m in (chat, remote))
    local, served = (m.with_structured_output(TicketDict, include_raw=True) for m in (local, served))
    same_answer(served.invoke(question)["raw"], local.invoke(question)["raw"])


# --- request building: what vLLM's NVLM-D needs -------------------------------------------------


def test_top_p_is_always_sent_and_the_model_card_system_prompt_is_the_default() -> None:
    params = build_request(offline(), [HumanMessage("Hi")], None, {}).params
    assert params["top_p"] == 1.0  # vLLM's default from the checkpoint, top_p 0, is refused
    assert params["messages"] == [{"role": "system", "content": "Answer the questions."},
                                  {"role": "user", "content": "Hi"}]
    assert params["temperature"] == 0.0 and params["max_tokens"] == 1024 and params["model"] == "nvidia/NVLM-D-72B"
    messages = [SystemMessage("Rule one."), HumanMessage("Hi"), SystemMessage("Rule two.")]
    params = build_request(offline(top_p=0.5), messages, ["END"], {"top_k": 5, "seed": 3, "model": "other"}).params
    assert params["messages"][0] == {"role": "system", "content": "Rule one.\n\nRule two."}  # one system turn
    assert len(params["messages"]) == 2
    assert (params["top_p"], params["stop"], params["seed"], params["model"]) == (0.5, ["END"], 3, "other")
    assert params["extra_body"] == {"top_k": 5}  # vLLM's sampling extension, outside OpenAI's schema


def test_images_are_sent_as_data_urls_of_the_original_bytes(tmp_path) -> None:
    png = png_bytes(random_image(32, 24))
    jpeg_path = tmp_path / "misnamed.png"
    random_image(32, 24).save(jpeg_path, format="JPEG")
    png_path = tmp_path / "picture.png"
    png_path.write_bytes(png)
    message = HumanMessage([
        {"type": "text", "text": "Compare."},
        {"type": "image", "url": str(png_path)},
        {"type": "image", "url": jpeg_path.as_uri()},
        {"type": "image", "base64": b64(png), "mime_type": "image/png"},
    ])
    _, user = build_request(offline(), [message], None, {}).params["messages"]
    parts = user["content"]
    assert [p["type"] for p in parts] == ["image_url"] * 3 + ["text"]  # images first, as NVLM-D was trained
    urls = [p["image_url"]["url"] for p in parts[:3]]
    assert urls[0] == urls[2] == f"data:image/png;base64,{b64(png)}"
    assert urls[1] == f"data:image/jpeg;base64,{b64(jpeg_path.read_bytes())}"  # the header decides, not the name
    with pytest.raises(Exception, match="not a readable image"):
        bad = tmp_path / "notes.png"
        bad.write_text("not an image")
        build_request(offline(), [HumanMessage([{"type": "image", "url": str(bad)}, "?"])], None, {})


def test_tool_traffic_is_written_the_openai_way() -> None:
    chat = offline()
    bound = chat.bind_tools([get_weather], tool_choice="any", parallel_tool_calls=False)
    picture = b64(png_bytes(random_image(16, 16)))
    history = [
        HumanMessage("Weather in Paris?"),
        AIMessage("Let me check.", tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1"}]),
        ToolMessage([{"type": "text", "text": "Sunny."}, {"type": "image", "base64": picture,
                                                           "mime_type": "image/png"}], tool_call_id="call_1"),
    ]
    params = build_request(chat, history, None, bound.kwargs).params
    assert params["tools"][0]["function"]["name"] == "get_weather"
    assert params["tool_choice"] == "required" and params["parallel_tool_calls"] is False
    _, _, assistant, tool_message, images = params["messages"]
    assert assistant == {"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    assert tool_message == {"role": "tool", "tool_call_id": "call_1", "content": "Sunny."}
    # OpenAI tool messages hold text only: the tool's image follows them in a user message.
    assert images == {"role": "user", "content": [{"type": "image_url",
                                                   "image_url": {"url": f"data:image/png;base64,{picture}"}}]}
    named = build_request(chat, history[:1], None, chat.bind_tools([get_weather], tool_choice="get_weather").kwargs)
    assert named.params["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    # tool_choice "none" as OpenAI means it: the tools are sent (the model sees them), no call is made
    unused = build_request(chat, history[:1], None, chat.bind_tools([get_weather], tool_choice="none").kwargs)
    assert unused.params["tool_choice"] == "none" and unused.params["tools"] == named.params["tools"]
    assert not unused.parse_tools


def test_response_formats_are_sent_in_openai_shape() -> None:
    chat = offline()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "title": "Thing"}
    sent = build_request(chat, [HumanMessage("?")], None, {"response_format": {
        "type": "json_schema", "json_schema": {"name": "thing", "schema": schema}}}).params["response_format"]
    assert sent == {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}}
    sent = build_request(chat, [HumanMessage("?")], None, {"response_format": {"type": "json_object"}}).params
    assert sent["response_format"] == {"type": "json_object"}
    with pytest.raises(ValueError, match="response_format"):
        build_request(chat, [HumanMessage("?")], None, {"response_format": {"type": "yaml"}})


# --- answer reading: calls written as text (vLLM without a tool parser) ---------------------------

_CALL_TEXT = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>'


def _completion(content: str | None, tool_calls: list[dict[str, Any]] | None = None) -> ChatCompletion:
    message = {"role": "assistant", "content": content, "tool_calls": tool_calls}
    return ChatCompletion.model_validate({
        "id": "c1", "object": "chat.completion", "created": 0, "model": "nvidia/NVLM-D-72B",
        "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
        "usage": {"prompt_tokens": 30, "completion_tokens": 20, "total_tokens": 50},
    })


def _chunk(delta: dict[str, Any] | None, finish: str | None = None,
           usage: dict[str, int] | None = None) -> ChatCompletionChunk:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return ChatCompletionChunk.model_validate({"id": "c1", "object": "chat.completion.chunk", "created": 0,
                                               "model": "nvidia/NVLM-D-72B", "choices": choices, "usage": usage})


def _replay(chunks: list[ChatCompletionChunk], *, parse_tools: bool) -> AIMessageChunk:
    stream = CompletionStream("nvidia/NVLM-D-72B", parse_tools=parse_tools)
    pieces = [p.message for c in chunks if (p := stream.push(c)) is not None] + [stream.last().message]
    assert pieces[-1].chunk_position == "last"
    return sum(pieces[1:], pieces[0])


def test_tool_calls_written_as_text_are_parsed_whole_and_streamed() -> None:
    message = message_from_completion(_completion(_CALL_TEXT), "m", parse_tools=True)
    assert message.content == "Checking."
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("get_weather", {"city": "Lima"})]
    assert message.response_metadata == {"model_name": "nvidia/NVLM-D-72B", "finish_reason": "tool_calls"}
    assert message.usage_metadata == {"input_tokens": 30, "output_tokens": 20, "total_tokens": 50}
    pieces = [_chunk({"role": "assistant", "content": ""})]
    pieces += [_chunk({"content": _CALL_TEXT[i:i + 5]}) for i in range(0, len(_CALL_TEXT), 5)]
    pieces += [_chunk({}, "stop"), _chunk(None, usage={"prompt_tokens": 30, "completion_tokens": 20,
                                                      "total_tokens": 50})]
    streamed = _replay(pieces, parse_tools=True)
    assert streamed.content == message.content
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [("get_weather", {"city": "Lima"})]
    assert streamed.usage_metadata == message.usage_metadata
    assert streamed.response_metadata["finish_reason"] == "tool_calls"
    # Without tools the text is the answer, tags and all.
    assert message_from_completion(_completion(_CALL_TEXT), "m", parse_tools=False).content == _CALL_TEXT


def test_structured_tool_calls_whole_and_streamed() -> None:
    raw = [{"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Tokyo"}'}},
           {"id": "call_8", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": '}}]
    message = message_from_completion(_completion(None, raw), "m", parse_tools=True)
    assert message.content == "" and [c["id"] for c in message.tool_calls] == ["call_7"]
    (invalid,) = message.invalid_tool_calls
    assert invalid["id"] == "call_8" and "not valid JSON" in invalid["error"]
    start = {"index": 0, "id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    deltas = [_chunk({"role": "assistant", "content": None, "tool_calls": [start]}),
              _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
              _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Tokyo"}'}}]}),
              _chunk({}, "tool_calls")]
    streamed = _replay(deltas, parse_tools=True)
    assert streamed.tool_calls == [{"name": "get_weather", "args": {"city": "Tokyo"}, "id": "call_7",
                                    "type": "tool_call"}]
    assert streamed.response_metadata["finish_reason"] == "tool_calls" and streamed.usage_metadata is None


# --- the model itself in remote mode ----------------------------------------------------------------


def test_remote_models_are_cheap_and_say_what_they_cannot_do(monkeypatch) -> None:
    monkeypatch.setenv("NVLM_API_KEY", "from-env")
    chat = offline()  # nothing is contacted, nothing loaded
    assert chat.api_key.get_secret_value() == "from-env" and "from-env" not in repr(chat)
    with pytest.raises(RemoteError, match="engine needs local weights"):
        chat.engine  # noqa: B018
    with pytest.raises(RemoteError, match="load"):
        chat.load()
    with pytest.raises(RemoteError, match="tokenizer"):
        chat.get_token_ids("hello")
    assert chat.get_num_tokens("12345678") == 2  # LangChain's estimate: 4 characters a token
    assert chat.get_num_tokens_from_messages([HumanMessage("hello there")]) > 0
    with pytest.warns(UserWarning, match=r"\['device_map', 'max_tiles'\] with base_url"):
        offline(device_map="cpu", max_tiles=4)
    with pytest.warns(UserWarning, match=r"\['compile'\] with base_url"):  # the server decides how it decodes
        compiled = offline(compile=True)
    assert "compile" not in compiled.to_json()["kwargs"] and "compile" not in compiled._identifying_params
    with pytest.raises(ValueError, match="base_url must be an http"):
        ChatNVLM(base_url="localhost:8000/v1", model="m")
    assert chat._identifying_params["base_url"] == "http://127.0.0.1:9/v1"
    assert "device_map" not in chat._identifying_params
    assert chat._get_ls_params()["ls_provider"] == "nvlm"
    assert "max_input_tokens" not in chat.profile  # the server's context is unknown here
    assert chat.lc_secrets == {"api_key": "NVLM_API_KEY"}


# --- LangChain's standard suites, in remote mode ------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.filterwarnings("ignore:.*marked with '@pytest.mark.asyncio' but it is not an async function")
class TestRemoteUnit(standard.TestChatNVLMUnit):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"base_url": "http://127.0.0.1:9/v1", "model": "nvidia/NVLM-D-72B"}

    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        return ChatModelUnitTests().standard_chat_model_params  # api_key, timeout, max_retries apply here

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        return {"NVLM_API_KEY": "key-from-env"}, self.chat_model_params, {"api_key": "key-from-env"}

    @property
    def model_override_value(self) -> str:
        return "nvidia/NVLM-D-72B-other"


@pytest.mark.asyncio
@pytest.mark.filterwarnings("ignore:.*marked with '@pytest.mark.asyncio' but it is not an async function")
class TestRemoteIntegration(standard.TestChatNVLMIntegration):
    """Every call goes through nvlm-serve; the local suite's xfails (a capable model needed) carry over."""

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"base_url": _suite["base_url"], "api_key": KEY, "model": "nvlm-tiny", "max_tokens": 48 * TOKEN_SCALE}

    @property
    def model_override_value(self) -> str:
        return "nvlm-tiny-renamed"  # nvlm-serve answers under the name it is asked for, one of its names

    @pytest.fixture(autouse=True)
    def _local_downloads(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # The suites download a PNG and a PDF with httpx.get: local bytes instead (the openai
        # client uses its own HTTP stack, which this does not touch).
        image, pdf = png_bytes(random_image(224, 160, seed=3)), pdf_bytes(random_image(100, 140, seed=4))

        def get(url: str, *args: Any, **kwargs: Any) -> httpx.Response:
            content = pdf if url.endswith(".pdf") else image
            return httpx.Response(200, content=content, request=httpx.Request("GET", url))

        monkeypatch.setattr(httpx, "get", get)
