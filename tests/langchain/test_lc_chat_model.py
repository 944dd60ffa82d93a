"""ChatNVLM end to end on the tiny random checkpoint: images, streaming, usage, batching, tools,
structured output, agents, tracing parameters and the engine registry.

The engine is real throughout; where a test needs to see what reached it, it wraps the engine's
own method and calls through.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import math
import threading
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
import torch
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from lc_inputs import CHAT_PARAMS, b64, pdf_bytes, png_bytes, random_image
from pydantic import BaseModel, Field, TypeAdapter
from shared_paths import TOKEN_SCALE
from typing_extensions import TypedDict

from nvlm_engine import CheckpointError
from nvlm_engine.chunk_budget import ChunkBudget
from nvlm_engine.scheduler import Scheduler
from nvlm_langchain import ChatNVLM
from nvlm_langchain.engines import get_engine, loaded_specs


class Recorder:
    """Wraps the engine's scheduler (calling through) to see the requests it admits and their results.

    `batches` are the groups the scheduler admitted together (requests queued at once, e.g. by
    `batch`, are admitted as one group by an idle scheduler).
    """

    def __init__(self, scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch) -> None:
        self.batches: list[list[Any]] = []
        self.results: list[Any] = []
        admit, dispatch = scheduler.core.admit, scheduler._dispatch

        def recording_admit(admitted: Any) -> Any:
            self.batches.append([request for _, request in admitted])
            return admit(admitted)

        def recording_dispatch(deltas: Any) -> None:
            self.results += [d.result for d in deltas if d.result is not None and d.index in scheduler._handles]
            dispatch(deltas)

        monkeypatch.setattr(scheduler.core, "admit", recording_admit)
        monkeypatch.setattr(scheduler, "_dispatch", recording_dispatch)

    @property
    def requests(self) -> list[Any]:
        return [r for batch in self.batches for r in batch]


@pytest.fixture
def recorder(chat: ChatNVLM, monkeypatch: pytest.MonkeyPatch) -> Recorder:
    return Recorder(get_engine(chat.engine_spec()).scheduler, monkeypatch)


@pytest.fixture(scope="module")
def image_server():
    """A local HTTP server for URL images (the engine's fetcher really fetches)."""
    files: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = files.get(self.path, b"")
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield files, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


# --- images ------------------------------------------------------------------------------------


def test_every_image_form_reaches_the_engine_as_the_same_pixels(chat, recorder, tmp_path, image_server) -> None:
    image = random_image(160, 120, seed=1)  # one tile: cheap to encode 13 times
    data = png_bytes(image)
    path = tmp_path / "picture.png"
    path.write_bytes(data)
    files, base = image_server
    files["/picture.png"] = data
    url, data_url = f"{base}/picture.png", f"data:image/png;base64,{b64(data)}"
    forms = {
        "standard base64": {"type": "image", "base64": b64(data), "mime_type": "image/png"},
        "standard data URL": {"type": "image", "url": data_url},
        "standard path": {"type": "image", "url": str(path)},
        "standard file URL": {"type": "image", "url": path.as_uri()},
        "openai data URL": {"type": "image_url", "image_url": {"url": data_url}},
        "openai string": {"type": "image_url", "image_url": data_url},
        "openai path": {"type": "image_url", "image_url": {"url": str(path)}},
        "v0 source_type": {"type": "image", "source_type": "base64", "data": b64(data), "mime_type": "image/png"},
        "anthropic base64": {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(data)}},
        "file block": {"type": "file", "base64": b64(data), "mime_type": "image/png"},
        "http URL": {"type": "image", "url": url},
        "openai http URL": {"type": "image_url", "image_url": {"url": url}},
        "anthropic URL": {"type": "image", "source": {"type": "url", "url": url}},
    }
    fetching = chat.model_copy(update={"allow_url_fetch": True, "allow_private_image_hosts": True, "max_tokens": 1})
    for name, block in forms.items():
        fetching.invoke([HumanMessage([{"type": "text", "text": "What is this?"}, block])])
    expected = chat.engine.prepare([{"role": "user", "content": [{"type": "image", "image": image}]}]).pixel_values
    assert len(recorder.requests) == len(forms)
    for name, request in zip(forms, recorder.requests):
        assert torch.equal(request.pixel_values, expected), name
    assert len({tuple(r.prompt_ids) for r in recorder.requests}) == 1  # same prompt whatever the form


def test_url_images_need_allow_url_fetch(chat, image_server) -> None:
    files, base = image_server
    files["/other.png"] = png_bytes(random_image(64, 64))
    with pytest.raises(Exception, match="allow_url_fetch"):
        chat.invoke([HumanMessage([{"type": "image", "url": f"{base}/other.png"}, {"type": "text", "text": "?"}])])


def test_images_in_earlier_turns_tool_messages_and_pdfs(chat, recorder) -> None:
    pytest.importorskip("pypdfium2")
    a, b, c = random_image(200, 100, 1), random_image(100, 200, 2), random_image(120, 120, 3)
    pdf = pdf_bytes(random_image(90, 120, 4), random_image(120, 90, 5))
    messages = [
        HumanMessage([{"type": "image", "base64": b64(png_bytes(a)), "mime_type": "image/png"},
                      {"type": "image", "base64": b64(png_bytes(b)), "mime_type": "image/png"},
                      {"type": "text", "text": "Compare them."}]),
        AIMessage("", tool_calls=[{"name": "snapshot", "args": {}, "id": "call_1", "type": "tool_call"}]),
        ToolMessage([{"type": "image", "base64": b64(png_bytes(c)), "mime_type": "image/png"},
                     {"type": "text", "text": "the snapshot"}], tool_call_id="call_1"),
        HumanMessage([{"type": "text", "text": "And this document?"},
                      {"type": "file", "base64": b64(pdf), "mime_type": "application/pdf"}]),
    ]
    result = chat.bind(max_tokens=1).invoke(messages)
    (request,) = recorder.requests
    # Five images (2 + 1 + 2 PDF pages), each small enough for one tile: 5 x 256 image tokens.
    assert request.pixel_values.shape[0] == 5
    assert result.usage_metadata["input_tokens"] == len(request.prompt_ids) == chat.get_num_tokens_from_messages(messages)
    assert result.response_metadata["image_tokens"] == 5 * 256


def test_max_tiles_is_a_budget_shared_by_the_images(chat, recorder) -> None:
    wide = {"type": "image", "base64": b64(png_bytes(random_image(1600, 400, 6))), "mime_type": "image/png"}
    chat.bind(max_tokens=1, max_tiles=4).invoke([HumanMessage([wide, wide, {"type": "text", "text": "?"}])])
    (request,) = recorder.requests
    assert request.pixel_values.shape[0] == 2 * 3  # 4 // 2 = 2 tiles each, plus a thumbnail each


@pytest.mark.parametrize(
    "block, named",
    [
        ({"type": "audio", "base64": "AAAA", "mime_type": "audio/wav"}, "'audio'"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "'audio'"),
        ({"type": "video", "url": "https://example.com/v.mp4"}, "'video'"),
        ({"type": "file", "base64": "AAAA", "mime_type": "text/csv"}, "'file' (text/csv)"),
        ({"type": "image", "file_id": "file-123"}, "file_id"),
    ],
)
def test_unsupported_blocks_are_a_value_error_naming_the_block(chat, block: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        chat.invoke([HumanMessage([{"type": "text", "text": "hi"}, block])])


# --- streaming, usage, metadata --------------------------------------------------------------


class TokenCounter(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[Any] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(kwargs.get("chunk"))


class AsyncTokenCounter(AsyncCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[Any] = []

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(kwargs.get("chunk"))


def test_stream_concatenates_to_invoke_and_reports_usage_on_the_last_chunk(chat) -> None:
    messages = [SystemMessage("Be brief."), HumanMessage("Name three colours.")]
    invoked = chat.invoke(messages)
    counter = TokenCounter()
    chunks = list(chat.stream(messages, config={"callbacks": [counter]}))
    assert len(chunks) > 3  # token by token, not one blob
    assert "".join(c.content for c in chunks) == invoked.content
    assert len(counter.tokens) == len(chunks)  # on_llm_new_token exactly once per chunk
    assert [c.chunk_position for c in chunks] == [None] * (len(chunks) - 1) + ["last"]
    assert [c.usage_metadata is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    last = chunks[-1]
    assert last.usage_metadata == invoked.usage_metadata
    assert set(last.response_metadata) >= {"model_name", "finish_reason", "timings"}
    assert last.response_metadata["finish_reason"] == "length"
    engine_result = chat.engine.generate([{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Name three colours."}], max_new_tokens=12)
    assert invoked.content == engine_result.text
    assert invoked.usage_metadata == {"input_tokens": engine_result.usage.prompt_tokens,
                                      "output_tokens": engine_result.usage.completion_tokens,
                                      "total_tokens": engine_result.usage.total_tokens}


@pytest.mark.asyncio
async def test_astream_matches_stream_without_a_thread_hop_per_token(chat, monkeypatch) -> None:
    expected = [c.content for c in chat.stream("Hello")]
    loop = asyncio.get_running_loop()
    hops = []
    run_in_executor = loop.run_in_executor
    monkeypatch.setattr(loop, "run_in_executor", lambda *a: hops.append(a) or run_in_executor(*a))
    counter = AsyncTokenCounter()  # a sync handler would itself be run in the executor, per token
    chunks = [c async for c in chat.astream("Hello", config={"callbacks": [counter]})]
    assert [c.content for c in chunks] == expected
    assert len(counter.tokens) == len(chunks)
    assert len(hops) == 1  # planning (image reading) only: deltas arrive by call_soon_threadsafe
    assert (await chat.ainvoke("Hello")).content == "".join(expected)


@pytest.mark.asyncio
async def test_stopping_an_async_stream_cancels_the_engine_request(chat, recorder) -> None:
    stream = chat.astream("Tell me a long story.", max_tokens=500)
    async for _ in stream:
        break
    await stream.aclose()
    for _ in range(200):  # the worker notices the cancel at its next token
        if recorder.results:
            break
        await asyncio.sleep(0.01)
    (result,) = recorder.results
    assert result.finish_reason == "cancelled" and result.usage.completion_tokens < 500


def test_stopping_a_sync_stream_cancels_the_engine_request(chat, recorder) -> None:
    stream = chat.stream("Tell me a long story.", max_tokens=500)
    next(stream)
    stream.close()
    (request,) = recorder.requests
    assert request.cancel.is_set()


def test_langgraph_messages_mode_streams_tokens(chat) -> None:
    pytest.importorskip("langgraph")
    from langgraph.graph import START, MessagesState, StateGraph

    graph = StateGraph(MessagesState)
    graph.add_node("model", lambda state: {"messages": [chat.invoke(state["messages"])]})
    graph.add_edge(START, "model")
    parts = list(graph.compile().stream({"messages": [HumanMessage("Hello")]}, stream_mode="messages"))
    chunks = [m for m, _ in parts if isinstance(m, AIMessageChunk)]
    assert len(chunks) > 3
    assert "".join(c.content for c in chunks) == chat.invoke("Hello").content


# --- batching ------------------------------------------------------------------------------------


def test_batch_is_one_engine_batch_and_keeps_errors_per_input(chat, recorder) -> None:
    bad = [HumanMessage([{"type": "text", "text": "hi"}, {"type": "audio", "base64": "AAAA", "mime_type": "audio/wav"}])]
    inputs = ["Hello", "Hey", bad, "How are you?"]
    results = chat.batch(inputs, return_exceptions=True)
    assert len(recorder.batches) == 1 and len(recorder.batches[0]) == 3
    assert isinstance(results[2], ValueError)
    alone = [chat.invoke(x) for x in ("Hello", "Hey", "How are you?")]
    assert [r.content for r in results if isinstance(r, AIMessage)] == [a.content for a in alone]
    with pytest.raises(ValueError, match="'audio'"):
        chat.batch(inputs)


@pytest.mark.asyncio
async def test_abatch_is_one_engine_batch(chat, recorder) -> None:
    results = await chat.abatch(["Hello", "Hey"], config={"max_concurrency": 1})
    assert len(recorder.batches) == 1 and len(recorder.batches[0]) == 2
    assert [r.content for r in results] == [(await chat.ainvoke(x)).content for x in ("Hello", "Hey")]


CONCURRENT = ["Hello", "Name three colours.", "Hey", "What is the capital of France, and why?", "How are you?", "Count."]


def _gate_first_prefill(scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch, expected: int) -> None:
    """Holds the scheduler's first prefill until `expected` requests were submitted, so concurrent
    callers deterministically overlap (the later ones then join the running batch). Prompts are
    prefilled whole: the chunk budget follows measured step times, so a joiner's prompt could
    otherwise take a few steps, by which time a short answer may have ended."""
    monkeypatch.setattr(scheduler.core, "budget", ChunkBudget(scheduler.core.chunk_tokens, allowance=math.inf))
    submitted, everyone = [], threading.Event()
    submit, admit = scheduler.submit, scheduler.core.admit

    def counting_submit(*args: Any, **kwargs: Any) -> Any:
        handle = submit(*args, **kwargs)
        submitted.append(handle)
        if len(submitted) >= expected:
            everyone.set()
        return handle

    def gated_admit(admitted: Any) -> Any:
        assert everyone.wait(60), f"only {len(submitted)} of {expected} requests were submitted"
        return admit(admitted)

    monkeypatch.setattr(scheduler, "submit", counting_submit)
    monkeypatch.setattr(scheduler.core, "admit", gated_admit)
    monkeypatch.setattr(scheduler, "max_rows", 0)


def test_concurrent_invokes_from_threads_share_decode_batches(chat, monkeypatch) -> None:
    sequential = [chat.invoke(q) for q in CONCURRENT]
    scheduler = get_engine(chat.engine_spec()).scheduler
    _gate_first_prefill(scheduler, monkeypatch, len(CONCURRENT))
    answers: dict[int, AIMessage] = {}

    def call(i: int) -> None:
        answers[i] = chat.invoke(CONCURRENT[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(CONCURRENT))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [answers[i].content for i in range(len(CONCURRENT))] == [m.content for m in sequential]
    assert [answers[i].usage_metadata for i in range(len(CONCURRENT))] == [m.usage_metadata for m in sequential]
    assert scheduler.max_rows == len(CONCURRENT)  # all six decoded in the same steps, on one scheduler
    assert scheduler.running == 0 and scheduler.queued == 0


@pytest.mark.asyncio
async def test_concurrent_astreams_and_ainvokes_share_decode_batches(chat, monkeypatch) -> None:
    sequential = [chat.invoke(q).content for q in CONCURRENT[:4]]
    scheduler = get_engine(chat.engine_spec()).scheduler
    _gate_first_prefill(scheduler, monkeypatch, 4)

    async def streamed(q: str) -> str:
        return "".join([c.content async for c in chat.astream(q)])

    async def invoked(q: str) -> str:
        return (await chat.ainvoke(q)).content

    answers = await asyncio.gather(*(streamed(q) if i % 2 else invoked(q) for i, q in enumerate(CONCURRENT[:4])))
    assert list(answers) == sequential
    assert scheduler.max_rows == 4


# --- tools and structured output -----------------------------------------------------------------


@tool
def get_weather(city: Literal["Paris", "Tokyo", "Lima"], unit: Literal["C", "F"] = "C") -> str:
    """Get the current weather in a city."""
    return f"22 degrees {unit} and sunny in {city}"


@tool
def add(a: Annotated[int, Field(ge=0, le=99)], b: Annotated[int, Field(ge=0, le=99)]) -> int:
    """Add two small numbers."""
    return a + b


def test_forced_tool_calls_are_valid_calls_of_the_bound_tools(chat) -> None:
    llm = chat.model_copy(update={"max_tokens": 40 * TOKEN_SCALE})
    for choice, allowed in (("any", {"get_weather", "add"}), ("add", {"add"}), ("get_weather", {"get_weather"})):
        # One call: a random model, free to add calls, goes on until max_tokens cuts one short.
        bound = llm.bind_tools([get_weather, add], tool_choice=choice, parallel_tool_calls=False)
        message = bound.invoke("What's the weather in Paris?")
        assert message.tool_calls and not message.invalid_tool_calls, message
        for call in message.tool_calls:
            assert call["name"] in allowed
            {"get_weather": get_weather, "add": add}[call["name"]].args_schema.model_validate(call["args"])
        assert message.response_metadata["finish_reason"] == "tool_calls"
        chunks = list(bound.stream("What's the weather in Paris?"))
        assert any(c.tool_call_chunks for c in chunks)
        streamed = sum(chunks[1:], chunks[0])
        assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [(c["name"], c["args"]) for c in message.tool_calls]


def test_tool_results_are_fed_back_and_a_truncated_call_is_invalid_not_an_error(chat) -> None:
    call = {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_9", "type": "tool_call"}
    history = [HumanMessage("Weather in Paris?"), AIMessage("", tool_calls=[call]),
               ToolMessage("22 degrees C and sunny in Paris", tool_call_id="call_9")]
    truncated = chat.bind_tools([get_weather], tool_choice="get_weather").invoke(history, max_tokens=10 * TOKEN_SCALE)
    assert not truncated.tool_calls and len(truncated.invalid_tool_calls) == 1
    assert truncated.invalid_tool_calls[0]["name"] == "get_weather"
    streamed = list(chat.bind_tools([get_weather], tool_choice="get_weather").stream(history, max_tokens=10 * TOKEN_SCALE))
    assert len(sum(streamed[1:], streamed[0]).invalid_tool_calls) == 1


class Ticket(BaseModel):
    """A support ticket."""

    title: str = Field(max_length=12)
    priority: Literal["low", "medium", "high"]
    count: int = Field(ge=0, le=99)
    urgent: bool
    tags: list[Literal["bug", "ui", "api"]] = Field(max_length=2)


class TicketDict(TypedDict):
    """A support ticket."""

    priority: Literal["low", "medium", "high"]
    urgent: bool


@pytest.mark.parametrize("schema", [Ticket, TicketDict, Ticket.model_json_schema()], ids=["pydantic", "typeddict", "dict"])
def test_json_schema_output_validates_on_random_weights(chat, schema: Any) -> None:
    structured = chat.model_copy(update={"max_tokens": 80 * TOKEN_SCALE}).with_structured_output(schema, include_raw=True)
    out = structured.invoke("File a ticket about the broken login button.")
    assert out["parsing_error"] is None
    parsed = out["parsed"]
    if schema is Ticket:
        assert isinstance(parsed, Ticket)
        parsed = parsed.model_dump()
    TypeAdapter(TicketDict if schema is TicketDict else Ticket).validate_python(parsed)
    assert json.loads(out["raw"].content) == parsed


def test_function_calling_and_json_mode_methods(chat) -> None:
    llm = chat.model_copy(update={"max_tokens": 80 * TOKEN_SCALE})
    ticket = llm.with_structured_output(Ticket, method="function_calling").invoke("File a ticket.")
    assert isinstance(ticket, Ticket)
    anything = llm.with_structured_output(None, method="json_mode").invoke("Reply in JSON.")
    assert isinstance(anything, dict)


def test_tools_with_a_response_format_answer_with_calls_or_schema_json(chat) -> None:
    # What create_agent binds for a model whose profile claims structured output.
    format_ = {"type": "json_schema", "json_schema": {"name": "Ticket", "schema": Ticket.model_json_schema()}}
    message = chat.bind_tools([get_weather], response_format=format_).invoke("Weather?", max_tokens=80 * TOKEN_SCALE)
    if message.tool_calls:
        get_weather.args_schema.model_validate(message.tool_calls[0]["args"])
    else:
        Ticket.model_validate_json(message.content)


def test_agent_runs_a_tool_and_returns(chat) -> None:
    pytest.importorskip("langchain.agents")
    from langchain.agents import create_agent
    from langchain.agents.middleware import wrap_model_call

    # A random model never chooses a tool by itself: force a call on the first step (a
    # grammar-constrained call), then let the model answer once the tool's result is in.
    @wrap_model_call
    def first_step_calls_a_tool(request: Any, handler: Any) -> Any:
        answered = any(isinstance(m, ToolMessage) for m in request.messages)
        return handler(request.override(tool_choice="none" if answered else "any",
                                        model_settings={"parallel_tool_calls": False}))

    llm = chat.model_copy(update={"max_tokens": 40 * TOKEN_SCALE})
    agent = create_agent(llm, tools=[get_weather], middleware=[first_step_calls_a_tool])
    state = agent.invoke({"messages": [HumanMessage("What's the weather in Lima?")]})
    kinds = [type(m).__name__ for m in state["messages"]]
    assert kinds == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    assert "sunny" in state["messages"][2].content
    assert state["messages"][-1].content and not state["messages"][-1].tool_calls


# --- tracing, profile, registry ----------------------------------------------------------------------


def test_tracing_parameters(chat) -> None:
    params = chat._get_ls_params(stop=["x"], model="other", temperature=0.5, max_tokens=7)
    assert params == {"ls_provider": "nvlm", "ls_model_name": "other", "ls_model_type": "chat",
                      "ls_temperature": 0.5, "ls_max_tokens": 7, "ls_stop": ["x"]}
    assert chat._get_ls_params()["ls_model_name"] == Path(chat.model).name  # the checkpoint's name, not its path
    assert chat._identifying_params["model"] == chat.model and chat._identifying_params["max_tokens"] == 12


def test_profile_claims_what_works(chat) -> None:
    profile = chat.profile
    assert profile["image_inputs"] and profile["tool_calling"] and profile["tool_choice"] and profile["structured_output"]
    assert not profile["audio_inputs"] and not profile["video_inputs"] and not profile["image_url_inputs"]
    assert chat.model_copy(update={"allow_url_fetch": True})._resolve_model_profile()["image_url_inputs"]
    assert profile["max_input_tokens"] == 32768


def test_models_are_cheap_and_share_one_engine(chat, nvlm_alias) -> None:
    before = loaded_specs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lazy = ChatNVLM(model="/nonexistent/NVLM-D-72B")  # nothing is read until it is used
    assert loaded_specs() == before
    with pytest.raises(CheckpointError, match="does not exist"):
        lazy.invoke("hi")
    twin = ChatNVLM(model=nvlm_alias, temperature=0.7, **CHAT_PARAMS)
    assert get_engine(twin.engine_spec()) is get_engine(chat.engine_spec())
    vllm = ChatNVLM(model=chat.model, dialect="vllm", **CHAT_PARAMS)
    assert vllm.engine is not chat.engine and vllm.engine.model is chat.engine.model
    # Both dialects' requests run on the one scheduler of these weights, as their own engines would.
    expected = vllm.engine.generate([{"role": "user", "content": "hi"}], max_new_tokens=12)
    assert vllm.invoke("hi", max_tokens=12).content == expected.text
    assert chat.invoke("hi", model=nvlm_alias).response_metadata["model_name"] == Path(nvlm_alias).name


def test_compile_reaches_the_engine_and_is_another_engine(chat) -> None:
    """compile=True loads its own copy of the weights with compiled decode steps (nothing is compiled
    until a decode step runs, so this loads only); the eager models keep theirs."""
    compiled = ChatNVLM(model=chat.model, compile=True, **CHAT_PARAMS)
    assert compiled.engine.decoding.compile is True and chat.engine.decoding.compile is False
    assert get_engine(compiled.engine_spec()) is not get_engine(chat.engine_spec())
    assert compiled.engine.model is not chat.engine.model
    assert ChatNVLM(model=chat.model, compile=False, **CHAT_PARAMS).engine is chat.engine  # the default: shared


def test_bad_options_fail_early_and_clearly(chat) -> None:
    with pytest.raises(ValueError, match="temperature"):
        ChatNVLM(model=chat.model, temperature=-1)
    with pytest.warns(UserWarning, match="api_key"):
        ChatNVLM(model=chat.model, api_key="x")
    with pytest.raises(ValueError, match="unknown call option"):
        chat.invoke("hi", tempreature=0.5)
    with pytest.raises(ValueError, match="names no bound tool"):
        chat.bind_tools([get_weather], tool_choice="get_time")


def test_token_counting_uses_the_real_tokenizer(chat) -> None:
    text = "NVLM-D reads documents."
    assert chat.get_token_ids(text) == chat.engine.tokenizer.encode(text, add_special_tokens=False)
    with_tools = chat.get_num_tokens_from_messages([HumanMessage(text)], tools=[get_weather])
    assert with_tools > chat.get_num_tokens_from_messages([HumanMessage(text)]) + 50


def test_checkpoint_path_is_the_engine_folder(chat) -> None:
    assert Path(chat.engine_spec().path) == Path(chat.model).resolve()
