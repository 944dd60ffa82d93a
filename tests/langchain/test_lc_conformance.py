"""ChatNVLM behaves like LangChain's reference chat model, ChatOpenAI, where users rely on it.

Constructor spellings (ChatOpenAI's aliases, a single stop string, temperature=None), errors
for arguments no field reads (with the nearest field named), serialization with `dumpd` /
`loads`, response metadata (`model_provider`, a readable `model_name`, `llm_output` with token
usage) and the remote profile, read from the server's /models entry. The local model is the
session's tiny checkpoint; remote checks talk HTTP to a real nvlm-serve, or to a loopback
stand-in that answers /v1/models as vLLM does (a network boundary, nothing else faked).
"""

from __future__ import annotations

import http.server
import json
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from langchain_core.load import dumpd, dumps, loads
from langchain_core.messages import AIMessageChunk, HumanMessage
from lc_inputs import CHAT_PARAMS

from nvlm_langchain import ChatNVLM
from nvlm_langchain import profile as profiles


def build(**fields: Any) -> ChatNVLM:
    """A ChatNVLM built with warnings as errors: a dropped argument warned before this fix."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return ChatNVLM(**fields)


def offline(**fields: Any) -> ChatNVLM:
    """A remote ChatNVLM whose server is never called."""
    return build(base_url="http://127.0.0.1:9/v1", model="nvidia/NVLM-D-72B", **fields)


# --- constructor spellings --------------------------------------------------------------------------


def test_max_completion_tokens_limits_the_answer(nvlm_path) -> None:
    llm = build(model=nvlm_path, max_completion_tokens=3, **CHAT_PARAMS)
    assert llm.max_tokens == 3
    assert llm.invoke("Tell me a long story.").usage_metadata["output_tokens"] <= 3


def test_chat_openai_aliases_set_their_fields(nvlm_path) -> None:
    llm = build(model_name=nvlm_path, stop_sequences=["\n\n"], **CHAT_PARAMS)
    assert (llm.model, llm.stop) == (nvlm_path, ["\n\n"])
    assert offline(request_timeout=7.5).timeout == 7.5


def test_one_stop_string_and_no_temperature(nvlm_path) -> None:
    llm = build(model=nvlm_path, stop="x", temperature=None, **CHAT_PARAMS)
    assert llm.stop == ["x"]
    assert llm.temperature == 0.0  # None is the model's default: greedy


def test_max_tokens_zero_is_an_error(nvlm_path) -> None:
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        ChatNVLM(model=nvlm_path, max_tokens=0)


@pytest.mark.parametrize("option", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [0, -1])
def test_max_tokens_below_one_at_call_time_is_an_error(chat, option, value) -> None:
    # As the field: 0 used to mean the model card's 1,024, silently.
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        chat.invoke("hi", **{option: value})
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        offline(max_retries=0).invoke("hi", **{option: value})  # refused before any request


def test_chat_openai_aliases_at_call_time(chat) -> None:
    from nvlm_langchain.remote import build_request

    assert chat.invoke("Tell me a long story.", max_completion_tokens=3).usage_metadata["output_tokens"] <= 3
    full = chat.invoke("Hello").content
    stop = full[3:6]
    stopped = chat.invoke("Hello", stop_sequences=[stop]).content
    assert stopped == chat.invoke("Hello", stop=[stop]).content and len(stopped) < len(full)
    params = build_request(offline(), [HumanMessage("hi")], None,
                           {"max_completion_tokens": 5, "stop_sequences": "x"}).params
    assert (params["max_tokens"], params["stop"]) == (5, ["x"])
    with pytest.raises(ValueError, match="not both"):
        chat.invoke("hi", max_tokens=3, max_completion_tokens=4)


@pytest.mark.parametrize(("argument", "suggestion"), [
    ("tempreature", "temperature"), ("max_new_tokens", "max_tokens"), ("top_n", "top_p"),
])
def test_an_unknown_argument_is_an_error_naming_the_nearest_field(nvlm_path, argument, suggestion) -> None:
    with pytest.raises(ValueError, match=f"'{argument}' \\(did you mean '{suggestion}'\\?\\)"):
        ChatNVLM(model=nvlm_path, **{argument: 1})


def test_model_kwargs_is_refused_in_both_modes(nvlm_path) -> None:
    with pytest.raises(ValueError, match="model_kwargs \\(no pass-through"):
        ChatNVLM(model=nvlm_path, model_kwargs={"presence_penalty": 1})
    with pytest.raises(ValueError, match="model_kwargs \\(no pass-through"):
        offline(model_kwargs={"logit_bias": {}})


# --- serialization ----------------------------------------------------------------------------------


def test_local_model_round_trips_through_dumps(nvlm_path) -> None:
    llm = build(model=nvlm_path, max_tokens=7, stop=["x"], dialect="vllm", **CHAT_PARAMS)
    serialized = dumpd(llm)
    assert serialized["type"] == "constructor" and serialized["id"] == ["nvlm_langchain", "chat_models", "ChatNVLM"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*is in beta")
        loaded = loads(dumps(llm), valid_namespaces=["nvlm_langchain"], allowed_objects=[ChatNVLM])
    assert loaded.model_dump() == llm.model_dump()


def test_remote_model_round_trips_with_its_key_as_a_secret() -> None:
    llm = offline(api_key="sk-secret", max_tokens=9, timeout=30)
    text = dumps(llm)
    assert "sk-secret" not in text
    assert dumpd(llm)["kwargs"]["api_key"] == {"lc": 1, "type": "secret", "id": ["NVLM_API_KEY"]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*is in beta")
        loaded = loads(text, valid_namespaces=["nvlm_langchain"], secrets_map={"NVLM_API_KEY": "sk-secret"},
                       allowed_objects=[ChatNVLM])
    assert loaded.model_dump() == llm.model_dump()
    assert loaded.api_key.get_secret_value() == "sk-secret"


# --- response metadata ------------------------------------------------------------------------------


def test_metadata_names_the_provider_and_the_checkpoint_not_its_path(chat) -> None:
    name = Path(chat.model).name
    message = chat.invoke("hi")
    assert message.response_metadata["model_provider"] == "nvlm"
    assert message.response_metadata["model_name"] == name
    assert chat._get_ls_params()["ls_model_name"] == name
    chunks = list(chat.stream("hi"))
    assert chunks[-1].response_metadata["model_provider"] == "nvlm"
    whole = sum(chunks[1:], chunks[0])
    assert isinstance(whole, AIMessageChunk) and whole.response_metadata["model_name"] == name

    def untimed(metadata: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in metadata.items() if k != "timings"}

    # invoke's metadata gets llm_output's token_usage; a stream's last chunk carries it too.
    assert untimed(whole.response_metadata) == untimed(message.response_metadata)


@pytest.mark.asyncio
async def test_async_metadata_names_the_provider(chat) -> None:
    message = await chat.ainvoke("hi")
    assert message.response_metadata["model_provider"] == "nvlm"
    chunks = [chunk async for chunk in chat.astream("hi")]
    assert chunks[-1].response_metadata["model_provider"] == "nvlm"


def test_llm_output_carries_token_usage_and_model_name(chat) -> None:
    result = chat.generate([[HumanMessage("hi")], [HumanMessage("hello there")]])
    usages = [g[0].message.usage_metadata for g in result.generations]
    assert result.llm_output["model_name"] == Path(chat.model).name
    assert result.llm_output["model_provider"] == "nvlm"
    assert result.llm_output["token_usage"] == {
        "prompt_tokens": sum(u["input_tokens"] for u in usages),
        "completion_tokens": sum(u["output_tokens"] for u in usages),
        "total_tokens": sum(u["total_tokens"] for u in usages),
    }


# --- remote: metadata and the profile read from the server ------------------------------------------


@pytest.fixture(scope="module")
def nvlm_serve(tiny_engine) -> Iterator[str]:
    pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from server.conftest import running_server

    from nvlm_server import ServerSettings

    with running_server(tiny_engine, ServerSettings(model_name="nvlm-tiny")) as url:
        yield url + "/v1"


class _ModelsHandler(http.server.BaseHTTPRequestHandler):
    entries: ClassVar[list[dict[str, Any]]] = []

    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": self.entries}).encode()
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def models_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A loopback server answering GET /v1/models with the entries the test puts in the list."""
    entries: list[dict[str, Any]] = []
    handler = type("Handler", (_ModelsHandler,), {"entries": entries})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", entries
    finally:
        server.shutdown()
        server.server_close()
        profiles._entries.clear()


def test_remote_answers_name_the_provider(nvlm_serve) -> None:
    remote = build(base_url=nvlm_serve, model="nvlm-tiny", max_tokens=4, max_retries=0)
    message = remote.invoke("hi")
    assert message.response_metadata["model_provider"] == "nvlm"
    assert message.response_metadata["model_name"] == "nvlm-tiny"
    assert list(remote.stream("hi"))[-1].response_metadata["model_provider"] == "nvlm"
    assert remote.generate([[HumanMessage("hi")]]).llm_output["token_usage"]["completion_tokens"] >= 1


def test_a_vllm_server_gets_its_context_and_no_structured_output_claim(models_server) -> None:
    url, entries = models_server
    entries.append({"id": "nvidia/NVLM-D-72B", "object": "model", "owned_by": "vllm", "max_model_len": 8192})
    llm = build(base_url=url, model="nvidia/NVLM-D-72B")
    assert llm.profile["max_input_tokens"] == 8192
    assert not llm.profile["structured_output"] and not llm.profile["pdf_inputs"]
    assert llm.profile["tool_calling"] and llm.profile["image_inputs"]
    entries.clear()  # read once per process: a second model on the server does not ask again
    assert build(base_url=url, model="nvidia/NVLM-D-72B").profile["max_input_tokens"] == 8192


def test_nvlm_serve_is_known_to_do_structured_output(nvlm_serve, tiny_engine) -> None:
    profile = build(base_url=nvlm_serve, model="nvlm-tiny").profile
    assert profile["structured_output"] and profile["tool_choice"]
    assert profile["max_input_tokens"] == tiny_engine.context_length  # its /v1/models max_model_len
    profiles._entries.clear()


def test_an_unreachable_or_unknown_server_gets_the_conservative_profile(models_server) -> None:
    llm = offline()
    assert "not read yet" in repr(llm.profile)  # construction asks nothing
    assert not llm.profile["structured_output"] and "max_input_tokens" not in llm.profile
    url, entries = models_server
    entries.append({"id": "other-model", "owned_by": "nvlm", "max_model_len": 4096})
    unknown = build(base_url=url, model="nvidia/NVLM-D-72B")
    assert not unknown.profile["structured_output"] and "max_input_tokens" not in unknown.profile


# --- logprobs and penalties -------------------------------------------------------------------------


def test_logprobs_take_chat_openai_shape_and_spell_the_answer(chat) -> None:
    from nvlm_engine.chat.logprobs import openai_logprobs

    result = chat.engine.generate([{"role": "user", "content": "hi"}], max_new_tokens=8, logprobs=True,
                                  top_logprobs=2)
    shaped = openai_logprobs(chat.engine.tokenizer, result.logprobs)
    content = shaped["content"]
    assert len(content) == len(result.token_ids)
    assert set(content[0]) == {"token", "logprob", "bytes", "top_logprobs"}
    assert all(len(e["top_logprobs"]) == 2 and set(e["top_logprobs"][0]) == {"token", "logprob", "bytes"}
               for e in content)
    # Greedy: each token is its step's likeliest; the bytes, joined, are the answer's text.
    assert all(e["top_logprobs"][0]["bytes"] == e["bytes"] for e in content)
    assert bytes(b for e in content for b in e["bytes"]).decode() == result.text


def test_logprobs_land_in_response_metadata(chat) -> None:
    message = chat.bind(logprobs=True, top_logprobs=2).invoke("hi")
    content = message.response_metadata["logprobs"]["content"]
    assert len(content) == message.usage_metadata["output_tokens"] and len(content[0]["top_logprobs"]) == 2
    assert "logprobs" not in chat.invoke("hi").response_metadata  # only when asked
    chunks = list(chat.model_copy(update={"logprobs": True}).stream("hi"))
    whole = sum(chunks[1:], chunks[0])
    assert [e["token"] for e in whole.response_metadata["logprobs"]["content"]] == [e["token"] for e in content]


def test_penalties_reach_the_engine_and_the_server(chat) -> None:
    from nvlm_langchain.call_plan import plan_call
    from nvlm_langchain.remote import build_request

    penalized = chat.model_copy(update={"presence_penalty": 0.5, "frequency_penalty": 1.5})
    plan = plan_call(penalized, [HumanMessage("hi")], None, {})
    assert (plan.request.options.presence_penalty, plan.request.options.frequency_penalty) == (0.5, 1.5)
    params = build_request(offline(presence_penalty=0.5), [HumanMessage("hi")], None, {}).params
    assert params.get("presence_penalty", params.get("extra_body", {}).get("presence_penalty")) == 0.5
