"""The engine's chat layer (`nvlm_engine.chat`) on the tiny checkpoint: events, tool_choice, the
system turn and the tile budget, each decided once for every front end."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from shared_paths import TOKEN_SCALE

from nvlm_engine.chat import (
    ChatRequest,
    ChatService,
    Finished,
    ResponseFormat,
    Sampling,
    TextDelta,
    ToolBinding,
    ToolCallArgumentsDelta,
    ToolCallDone,
    ToolCallStarted,
    compose_system,
    tiles_per_image,
)

ROOT = Path(__file__).resolve().parents[1]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
HI = ({"role": "user", "content": "What's the weather in Paris?"},)


def run(service: ChatService, request: ChatRequest) -> list:
    prepared = service.prepare(request)
    return list(prepared.events(service.engine.stream_batch([prepared.request])))


@pytest.fixture(scope="module")
def service(tiny_engine) -> ChatService:
    return ChatService(tiny_engine)


def test_plain_text_is_text_deltas_then_finished_with_the_engines_answer(service, tiny_engine) -> None:
    events = run(service, ChatRequest(HI, sampling=Sampling(max_tokens=8)))
    expected = tiny_engine.generate(list(HI), max_new_tokens=8)
    assert all(isinstance(e, TextDelta) for e in events[:-1]) and isinstance(events[-1], Finished)
    assert "".join(e.text for e in events[:-1]) == expected.text
    assert events[-1].finish_reason == expected.finish_reason and events[-1].usage == expected.usage


def test_a_forced_call_is_started_given_arguments_and_done(service) -> None:
    tools = ToolBinding.build([WEATHER], {"type": "function", "function": {"name": "get_weather"}})
    events = run(service, ChatRequest(HI, sampling=Sampling(max_tokens=60 * TOKEN_SCALE), tools=tools))
    done = [e for e in events if isinstance(e, ToolCallDone)]
    assert len(done) == 1 and done[0].name == "get_weather" and done[0].valid
    started = [e for e in events if isinstance(e, ToolCallStarted)]
    assert started and started[0].id == done[0].id
    arguments = "".join(e.text for e in events if isinstance(e, ToolCallArgumentsDelta))
    assert json.loads(arguments) == done[0].arguments
    assert events[-1] == Finished("tool_calls", events[-1].usage, None, events[-1].result)


def _call_token(service: ChatService) -> int:
    (token,) = service.engine.tokenizer.encode("<tool_call>", add_special_tokens=False)
    return token


def _after_one_call(service: ChatService, parallel: bool):
    request = ChatRequest(HI, tools=ToolBinding.build([WEATHER], "required", parallel))
    constraint = service.constraint(request)
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    for token in service.engine.tokenizer.encode(text, add_special_tokens=False):
        assert constraint.allowed() is None or constraint.allowed()[token], token
        constraint.accept(token)
    return constraint


def test_parallel_tool_calls_false_allows_exactly_one_call(service) -> None:
    call = _call_token(service)
    assert _after_one_call(service, parallel=True).allowed()[call]  # a second call may follow
    with pytest.raises(AssertionError):  # with parallel False the newline after the call is already refused
        _after_one_call(service, parallel=False)


def test_tool_choice_none_keeps_the_tools_in_the_prompt_and_makes_no_call(service) -> None:
    unused = ChatRequest(HI, sampling=Sampling(max_tokens=20 * TOKEN_SCALE), tools=ToolBinding.build([WEATHER], "none"))
    system = service.messages(unused)[0]
    assert system["role"] == "system" and json.dumps(WEATHER) in system["content"]
    assert system == service.messages(ChatRequest(HI, tools=ToolBinding.build([WEATHER], "auto")))[0]
    mask = service.constraint(unused).allowed()
    assert mask is not None and not mask[_call_token(service)] and mask.sum() == mask.numel() - 1
    events = run(service, unused)
    assert not any(isinstance(e, (ToolCallStarted, ToolCallDone)) for e in events)
    assert _call_token(service) not in events[-1].result.token_ids


def test_the_system_turn_is_user_text_then_tools_then_answer_format() -> None:
    tools = ToolBinding.build([WEATHER])
    answer = ResponseFormat.parse({"type": "json_object"})
    text = compose_system("Be brief.", "reference", tools, answer)
    assert text.startswith("Be brief.\n\n# Tools\n") and text.endswith(answer.instruction(with_tools=True))
    assert compose_system(None, "vllm", tools, None).startswith("You are Qwen")
    assert compose_system(None, "reference", ToolBinding(), None) is None  # nothing to add: the engine's default


def test_server_and_chatnvlm_build_the_same_prompt(service, tiny_checkpoint) -> None:
    from langchain_core.messages import HumanMessage, SystemMessage

    from nvlm_langchain import ChatNVLM
    from nvlm_langchain.call_plan import compose_call
    from nvlm_server.chat_request import to_chat_request
    from nvlm_server.schemas import ChatCompletionRequest

    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "tools": [WEATHER], "tool_choice": "none", "response_format": {"type": "json_object"}}
    served = to_chat_request(ChatCompletionRequest.model_validate(body),
                             [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                              {"role": "user", "content": [{"type": "text", "text": "Hi"}]}], 6, 8)
    local = compose_call(ChatNVLM(model=str(tiny_checkpoint), device_map="cpu", dtype="float32"),
                         [SystemMessage("Be brief."), HumanMessage("Hi")],
                         {"tools": [WEATHER], "tool_choice": "none", "response_format": {"type": "json_object"}})
    assert service.messages(served)[0] == local.messages[0]


def test_the_tile_budget_is_shared_by_the_images(service, tiny_engine) -> None:
    assert [tiles_per_image(6, n) for n in (0, 1, 2, 4, 7)] == [None, 6, 3, 1, 1]
    from PIL import Image

    image = Image.new("RGB", (900, 600), (200, 30, 30))
    two = ({"role": "user", "content": [{"type": "image", "image": image}, {"type": "image", "image": image},
                                        {"type": "text", "text": "Compare."}]},)
    assert service.max_tiles(ChatRequest(two, max_tiles=6)) == 3
    # the engine's own default rule gives the same prompt
    assert service.count_tokens(ChatRequest(two, max_tiles=6)) == tiny_engine.count_tokens(list(two))


def _imports(package: str) -> set[str]:
    names = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
    return names


def test_the_server_and_the_engine_do_not_import_langchain() -> None:
    assert not {n for n in _imports("nvlm_server") if n.split(".")[0] == "nvlm_langchain"}
    assert not {n for n in _imports("nvlm_engine") if n.split(".")[0] in ("nvlm_langchain", "nvlm_server", "langchain_core",
                                                                           "fastapi")}
