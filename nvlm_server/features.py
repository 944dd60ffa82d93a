"""Per-request behaviour beyond plain text: tools, tool_choice and response_format.

`plan_features()` reads those fields once and returns a `RequestFeatures` that knows how to
change the prompt (the Qwen2.5 / Hermes tools block in the system turn), which grammar
constraint to decode under (the same xgrammar machinery as ChatNVLM: forced and required
calls are always valid calls, `json_schema` output always validates), and how to turn the
model's text into an OpenAI message (`content` and `tool_calls`), whole or streamed.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nvlm_engine import NVLMEngine, TokenConstraint
from nvlm_engine.prompts import DEFAULT_SYSTEM_PROMPT, QWEN_DEFAULT_SYSTEM_PROMPT, PromptDialect

from .convert import RequestRejected
from .schemas import ChatCompletionRequest

_grammars_lock = threading.Lock()
_grammars: dict[int, Any] = {}


def grammars_for(engine: NVLMEngine) -> Any:
    """The engine's xgrammar compiler, built once (about a second for a 152k vocabulary)."""
    with _grammars_lock:
        grammars = _grammars.get(id(engine))
        if grammars is None:
            from nvlm_langchain.grammar import Grammars

            grammars = Grammars(engine.tokenizer, engine.config.llm.vocab_size, [engine.token_ids.end])
            _grammars[id(engine)] = grammars
        return grammars


@dataclass
class RequestFeatures:
    """What a request asks for beyond plain chat.

    Attributes:
        tools: the bound tools (nvlm_langchain `ToolSpec`s) shown to the model, if any.
        make_constraint: builds a fresh grammar constraint for one decode (None: free text).
        system_default: the system text used when the request has none.
    """

    tools: list[Any] = field(default_factory=list)
    make_constraint: Callable[[], TokenConstraint] | None = None
    system_default: str = DEFAULT_SYSTEM_PROMPT
    answer_format: Any = None  # nvlm_langchain ResponseFormat, when the request asks for JSON

    def messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The system turn as ChatNVLM composes it: the request's text (or the default), then the
        tools block, then the answer-format sentence; so server and local answers are the same."""
        if not self.tools and self.answer_format is None:
            return messages
        from nvlm_langchain.tool_calls import tools_system_text

        if messages and messages[0]["role"] == "system":
            system = "".join(p["text"] for p in messages[0]["content"] if p["type"] == "text")
            rest = messages[1:]
        else:
            system, rest = self.system_default, messages
        if self.tools:
            system = tools_system_text(system, self.tools)
        if self.answer_format is not None:
            system = f"{system}\n\n{self.answer_format.instruction(with_tools=bool(self.tools))}"
        return [{"role": "system", "content": system}, *rest]

    def constraint(self) -> TokenConstraint | None:
        return self.make_constraint() if self.make_constraint is not None else None

    def message(self, text: str, engine_reason: str) -> tuple[dict[str, Any], str]:
        """The OpenAI assistant message for a whole answer, and its finish reason."""
        if not self.tools:
            return {"role": "assistant", "content": text}, _openai_reason(engine_reason)
        from nvlm_langchain.tool_calls import parse_tool_calls

        parsed = parse_tool_calls(text)
        # A call whose name is known but whose JSON is broken (cut off, say) stays a tool call with
        # its raw text as arguments, so clients see it as an invalid call; a nameless one is text.
        content = "\n".join([parsed.content, *(c.raw for c in parsed.invalid if not c.name)]).strip()
        calls = [_openai_call(c.id, c.name, c.args if c.valid else c.raw) for c in parsed.calls if c.name]
        message: dict[str, Any] = {"role": "assistant", "content": content or None}
        if calls:
            message["tool_calls"] = calls
            return message, "tool_calls"
        return message, _openai_reason(engine_reason)

    def stream_translator(self) -> _PlainStream | _ToolStream:
        return _ToolStream() if self.tools else _PlainStream()


class _PlainStream:
    """Text deltas -> OpenAI `content` deltas."""

    def push(self, piece: str) -> list[dict[str, Any]]:
        return [{"content": piece}] if piece else []

    def finish(self) -> list[dict[str, Any]]:
        return []

    def finish_reason(self, engine_reason: str) -> str:
        return _openai_reason(engine_reason)


class _ToolStream:
    """Text deltas -> `content` and `tool_calls` deltas, as the OpenAI stream format has them."""

    def __init__(self) -> None:
        from nvlm_langchain.tool_calls import ToolCallParser

        self._parser = ToolCallParser()
        self._calls = 0
        self._index: dict[int, int] = {}

    def push(self, piece: str) -> list[dict[str, Any]]:
        return self._translate(self._parser.feed(piece))

    def finish(self) -> list[dict[str, Any]]:
        return self._translate(self._parser.finish())

    def finish_reason(self, engine_reason: str) -> str:
        return "tool_calls" if self._calls else _openai_reason(engine_reason)

    def _translate(self, events: list[Any]) -> list[dict[str, Any]]:
        from nvlm_langchain.tool_calls import CallFinished, CallStarted, TextDelta

        deltas: list[dict[str, Any]] = []
        for event in events:
            if isinstance(event, TextDelta):
                deltas.append({"content": event.text})
            elif isinstance(event, CallStarted):
                index = self._slot(event.index)
                deltas.append({"tool_calls": [{"index": index, "id": event.id, "type": "function",
                                               "function": {"name": event.name, "arguments": ""}}]})
            elif isinstance(event, CallFinished) and event.valid:
                index = self._slot(event.index)
                arguments = json.dumps(event.args, ensure_ascii=False)
                call: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
                if not event.announced:
                    call.update(id=event.id, type="function", function={"name": event.name, "arguments": arguments})
                deltas.append({"tool_calls": [call]})
            elif isinstance(event, CallFinished) and event.name:
                # Invalid (e.g. cut off): its raw text as arguments, so clients see an invalid call.
                index = self._slot(event.index)
                call = {"index": index, "function": {"arguments": event.raw}}
                if not event.announced:
                    call.update(id=event.id, type="function", function={"name": event.name, "arguments": event.raw})
                deltas.append({"tool_calls": [call]})
            elif isinstance(event, CallFinished):
                deltas.append({"content": event.raw})  # a nameless broken call stays visible as text
        return deltas

    def _slot(self, parser_index: int) -> int:
        if parser_index not in self._index:
            self._index[parser_index] = self._calls
            self._calls += 1
        return self._index[parser_index]


def plan_features(req: ChatCompletionRequest, engine: NVLMEngine,
                  grammar_timeout_s: float | None = None) -> RequestFeatures:
    """Check tools / tool_choice / response_format and build the request's features.

    Compiling a grammar can take seconds (see `nvlm_langchain.grammar.GrammarLimits`): call this
    off the event loop. It waits at most `grammar_timeout_s` for the compile (plus the wait for a
    free compile worker), then answers 400 `grammar_too_complex`; busy workers answer 503.
    """
    system_default = QWEN_DEFAULT_SYSTEM_PROMPT if engine.prompts.dialect == PromptDialect.VLLM else DEFAULT_SYSTEM_PROMPT
    answer_schema = _answer_schema(req)
    choice = _tool_choice(req)
    tools = _tools(req) if choice != "none" else []
    if not tools and answer_schema is None:
        return RequestFeatures(system_default=system_default)
    from nvlm_langchain.grammar import GrammarBusyError, GrammarTooComplexError

    grammars = grammars_for(engine)
    param = "tools" if tools else "response_format"
    try:
        if not tools:
            compiled = grammars.json_schema(answer_schema, timeout_s=grammar_timeout_s)
        elif choice in ("auto", "required"):
            compiled = grammars.tool_calls(tools, choice, answer_schema=answer_schema if choice == "auto" else None,
                                           timeout_s=grammar_timeout_s)
        else:
            (tool,) = [t for t in tools if t.name == choice]
            compiled = grammars.tool_calls([tool], "forced", timeout_s=grammar_timeout_s)
    except GrammarTooComplexError as e:
        raise RequestRejected(str(e), code="grammar_too_complex", param=param) from e
    except GrammarBusyError as e:
        raise RequestRejected(str(e), status=503, code="grammar_busy", param=param) from e
    except ValueError as e:
        raise RequestRejected(f"cannot use the given schema: {e}", code="invalid_schema") from e
    from nvlm_langchain.requests import ResponseFormat

    answer_format = ResponseFormat(schema=answer_schema if req.response_format.type == "json_schema" else None) \
        if req.response_format is not None and answer_schema is not None else None
    return RequestFeatures(tools=tools, make_constraint=lambda: grammars.constraint(compiled),
                           system_default=system_default, answer_format=answer_format)


def _tools(req: ChatCompletionRequest) -> list[Any]:
    if not req.tools:
        return []
    from nvlm_langchain.tool_calls import ToolSpec

    specs = [ToolSpec.from_openai(tool.model_dump(exclude_none=True)) for tool in req.tools]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise RequestRejected("tool names must be unique", param="tools")
    return specs


def _tool_choice(req: ChatCompletionRequest) -> str:
    """"none", "auto", "required" or the name of the one tool that must be called."""
    choice = req.tool_choice
    if choice is None:
        return "auto" if req.tools else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise RequestRejected(f"tool_choice {choice!r} must be 'none', 'auto', 'required' or a function",
                                  param="tool_choice")
        if choice != "none" and not req.tools:
            raise RequestRejected(f"tool_choice {choice!r} needs tools", param="tool_choice")
        return choice
    name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    if not name or name not in [t.function.name for t in req.tools or []]:
        raise RequestRejected(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
    return str(name)


def _answer_schema(req: ChatCompletionRequest) -> dict[str, Any] | None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    schema = (fmt.json_schema or {}).get("schema")
    if not isinstance(schema, dict):
        raise RequestRejected("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                              param="response_format")
    return schema


def _openai_call(call_id: str, name: str | None, args: dict[str, Any] | str | None) -> dict[str, Any]:
    arguments = args if isinstance(args, str) else json.dumps(args or {}, ensure_ascii=False)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _openai_reason(engine_reason: str) -> str:
    # OpenAI has no "cancelled"; a cancelled request ended early like a length cut.
    return {"stop": "stop", "length": "length"}.get(engine_reason, "length")
