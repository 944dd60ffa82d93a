"""The Hermes / Qwen2.5 tool-call format: the streaming parser (pure), chunk assembly (pure), and
the prompt text against the tokenizer's own Qwen2.5 chat template."""

from __future__ import annotations

import json
import random

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from lc_inputs import CHAT_PARAMS

from nvlm_engine import GenerationResult, Usage
from nvlm_engine.chat import TextDelta, ToolCallDone, ToolCallParser, ToolCallStarted, parse_tool_calls
from nvlm_langchain import ChatNVLM
from nvlm_langchain.call_plan import compose_call
from nvlm_langchain.responses import ResponseStream, message_from_result

CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'


def feed_in_pieces(text: str, seed: int) -> list:
    parser, rng, events, at = ToolCallParser(), random.Random(seed), [], 0
    while at < len(text):
        step = rng.randint(1, 7)
        events += parser.feed(text[at : at + step])
        at += step
    return events + parser.finish()


def summary(events: list) -> tuple[str, list]:
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    calls = [(e.name, e.args, e.raw if not e.valid else None) for e in events if isinstance(e, ToolCallDone)]
    return text, calls


@pytest.mark.parametrize(
    "text, content, calls",
    [
        ("Just text.", "Just text.", []),
        (CALL, "", [("add", {"a": 1, "b": 2})]),
        ("Let me add.\n" + CALL, "Let me add.", [("add", {"a": 1, "b": 2})]),
        (CALL + "\n" + CALL.replace("add", "mul"), "", [("add", {"a": 1, "b": 2}), ("mul", {"a": 1, "b": 2})]),
        ("Before\n" + CALL + "\nAfter", "Before\nAfter", [("add", {"a": 1, "b": 2})]),
        # nested JSON arguments
        ('<tool_call>\n{"name": "q", "arguments": {"f": {"and": [{"x": 1}, {"y": [2, {"z": "}"}]}]}}}\n</tool_call>',
         "", [("q", {"f": {"and": [{"x": 1}, {"y": [2, {"z": "}"}]}]}})]),
        # arguments written as a JSON string, and missing arguments (a no-argument tool)
        ('<tool_call>{"name": "q", "arguments": "{\\"a\\": 1}"}</tool_call>', "", [("q", {"a": 1})]),
        ('<tool_call>{"name": "now"}</tool_call>', "", [("now", {})]),
        ('<tool_call>\n{"name": "日本", "arguments": {"名前": "こんにちは"}}\n</tool_call>', "", [("日本", {"名前": "こんにちは"})]),
        ("a < b and <tool", "a < b and <tool", []),  # a dangling partial tag at the end is text
    ],
)
def test_valid_calls_and_text(text: str, content: str, calls: list) -> None:
    parsed = parse_tool_calls(text)
    assert parsed.content == content
    assert [(c.name, c.args) for c in parsed.calls] == calls and not parsed.invalid
    for seed in range(5):  # any split into deltas gives the same answer
        assert summary(feed_in_pieces(text, seed)) == (content, [(n, a, None) for n, a in calls])


@pytest.mark.parametrize(
    "text, name, error",
    [
        ('<tool_call>\n{"name": "add", "arguments": {"a": 1,}}\n</tool_call>', "add", "not valid JSON"),
        ('<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>', None, 'string "name"'),
        ('<tool_call>\n["add", 1]\n</tool_call>', None, 'string "name"'),
        ('<tool_call>\n{"name": "add", "arguments": [1, 2]}\n</tool_call>', "add", "must be a JSON object"),
        ('<tool_call>\n{"name": "add", "arguments": {"a": 1', "add", "ended before </tool_call>"),
        ("<tool_call>", None, "ended before </tool_call>"),
    ],
)
def test_malformed_and_partial_calls_are_invalid_never_raised(text: str, name: str | None, error: str) -> None:
    parsed = parse_tool_calls(text)
    (call,) = parsed.calls
    assert not call.valid and call.name == name and error in call.error
    assert call.raw.startswith("<tool_call>") and text.startswith(call.raw.removesuffix("</tool_call>"))
    assert parsed.content == ""


def test_a_call_opened_inside_another_breaks_the_outer_one_only() -> None:
    text = '<tool_call>\n{"name": "a", "arguments": {}}\n' + CALL
    first, second = parse_tool_calls(text).calls
    assert not first.valid and first.name == "a" and "new <tool_call>" in first.error
    assert second.valid and second.args == {"a": 1, "b": 2}


def test_a_call_is_announced_as_soon_as_its_name_is_known() -> None:
    parser = ToolCallParser()
    assert parser.feed('<tool_call>\n{"name": "add", "argu') == []
    (started,) = parser.feed('ments": {"a"')
    assert isinstance(started, ToolCallStarted) and started.name == "add" and started.index == 0
    (finished,) = parser.feed(": 1}}\n</tool_call>")
    assert finished.id == started.id and finished.announced and finished.args == {"a": 1}


def _result(text: str, finish: str = "stop") -> GenerationResult:
    return GenerationResult(text=text, finish_reason=finish, usage=Usage(20, 9), token_ids=[], timings={"total": 0.1})


@pytest.mark.parametrize("text", [
    "Plain answer.",
    "Checking.\n" + CALL + "\n" + CALL.replace('"a": 1', '"a": 5'),
    '<tool_call>\n{"name": "add", "arguments": {"a": 1,}}\n</tool_call>',
    '<tool_call>\n{"name": "add", "arguments": {"a": 1',
])
def test_streamed_chunks_aggregate_to_the_invoked_message(text: str) -> None:
    invoked = message_from_result(_result(text), "nvlm", parse_tools=True)
    for seed in range(4):
        stream, rng, chunks, at = ResponseStream("nvlm", parse_tools=True), random.Random(seed), [], 0
        while at < len(text) - 3:
            step = rng.randint(1, 6)
            chunks.append(stream.chunk(text[at : at + step]))
            at += step
        chunks.append(stream.last(text[at:], _result(text)))
        chunks = [c.message for c in chunks if c is not None]
        full = sum(chunks[1:], chunks[0])
        assert full.content == invoked.content
        assert [(c["name"], c["args"]) for c in full.tool_calls] == [(c["name"], c["args"]) for c in invoked.tool_calls]
        assert len({c["id"] for c in full.tool_calls + full.invalid_tool_calls}) == len(invoked.tool_calls + invoked.invalid_tool_calls)
        assert [(c["name"], c["args"]) for c in full.invalid_tool_calls] == \
            [(c["name"], c["args"]) for c in invoked.invalid_tool_calls]
        assert full.usage_metadata == invoked.usage_metadata and full.chunk_position == "last"
        assert full.response_metadata["finish_reason"] == invoked.response_metadata["finish_reason"]
    assert invoked.response_metadata["finish_reason"] == ("tool_calls" if invoked.tool_calls else "stop")


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_prompt_matches_the_qwen25_chat_template_with_tools(nvlm_path: str) -> None:
    """Tools, assistant calls and tool results render exactly as the tokenizer's template writes them."""
    chat = ChatNVLM(model=nvlm_path, dialect="vllm", **CHAT_PARAMS)
    calls = [{"name": "get_weather", "args": {"city": c}, "id": f"call_{c}", "type": "tool_call"} for c in ("Paris", "東京")]
    messages = [
        SystemMessage("You are terse."), HumanMessage("Weather in Paris and Tokyo?"),
        AIMessage("Checking both.", tool_calls=calls),
        ToolMessage("sunny", tool_call_id="call_Paris"), ToolMessage("雨", tool_call_id="call_東京"),
    ]
    call = compose_call(chat, messages, {"tools": [WEATHER]})
    ours = call.engine.prepare(call.messages, max_new_tokens=1).prompt_ids
    template = [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Weather in Paris and Tokyo?"},
        {"role": "assistant", "content": "Checking both.",
         "tool_calls": [{"type": "function", "function": {"name": c["name"], "arguments": c["args"]}} for c in calls]},
        {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "雨"},
    ]
    tokenizer = call.engine.tokenizer
    text = tokenizer.apply_chat_template(template, tools=[WEATHER], tokenize=False, add_generation_prompt=True)
    assert ours == tokenizer.encode(text, add_special_tokens=False)


def test_reference_dialect_keeps_the_card_system_prompt_and_adds_the_tools(nvlm_path: str) -> None:
    chat = ChatNVLM(model=nvlm_path, **CHAT_PARAMS)
    system = compose_call(chat, [HumanMessage("hi")], {"tools": [WEATHER]}).messages[0]
    assert system["role"] == "system" and system["content"].startswith("Answer the questions.\n\n# Tools\n")
    assert json.dumps(WEATHER) in system["content"]
    # tool_choice "none" (OpenAI's meaning): the tools stay visible, the grammar forbids a call
    unused = compose_call(chat, [HumanMessage("hi")], {"tools": [WEATHER], "tool_choice": "none"}).messages[0]
    assert unused == system
    mine = compose_call(chat, [SystemMessage("Be brief."), HumanMessage("hi")], {"tools": [WEATHER]}).messages[0]
    assert mine["content"].startswith("Be brief.\n\n# Tools\n")
