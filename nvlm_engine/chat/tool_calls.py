"""Tool calling in the Qwen2.5 / Hermes text format, which NVLM-D's Qwen2 decoder was trained on.

NVLM-D has no tool-call tokens of its own beyond the tokenizer's `<tool_call>` / `</tool_call>`
added tokens, so tools travel as text, exactly as the tokenizer's own Qwen2.5 chat template
writes them (see `nvlm_engine.tokenizer.QWEN2_CHAT_TEMPLATE`):

- the tool schemas go into the system message, after its text, in a `<tools>` block;
- the model answers with `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks;
- earlier calls are written back into assistant turns the same way, and tool results go into
  a user turn as `<tool_response>\\n...\\n</tool_response>`.

`ToolCallParser` reads the answer incrementally (text deltas in, events out) and never raises:
a block that is not a call of the expected shape, or that the answer cut off, comes out as an
invalid call carrying the raw text. Knows nothing of LangChain, HTTP or the model.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .events import TextDelta, ToolCallDone, ToolCallStarted

__all__ = [
    "TOOL_CALL_END",
    "TOOL_CALL_START",
    "TOOL_RESPONSE_END",
    "TOOL_RESPONSE_START",
    "ParsedOutput",
    "ToolCallParser",
    "ToolSpec",
    "parse_tool_calls",
    "render_tool_calls",
    "tools_system_text",
]

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_RESPONSE_START = "<tool_response>"
TOOL_RESPONSE_END = "</tool_response>"

# The Qwen2.5 chat template's tool preamble, word for word (only the system text before it varies).
_TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)
# `{"name": "...", "arguments": ` at the start of a call: enough to announce the call while it streams.
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class ToolSpec:
    """A bound tool as the prompt and the grammar need it.

    Attributes:
        name: the function name.
        parameters: JSON schema of its arguments (an object schema).
        openai: the whole OpenAI-format tool dict, as the chat template prints it.
    """

    name: str
    parameters: dict[str, Any]
    openai: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_openai(cls, tool: Mapping[str, Any]) -> ToolSpec:
        function = tool["function"]
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        return cls(name=function["name"], parameters=dict(parameters), openai=dict(tool))


# --- prompt side ---------------------------------------------------------------------------


def tools_system_text(system: str, tools: Sequence[ToolSpec]) -> str:
    """The system message text with the tools block, as Qwen2.5's template renders it."""
    lines = "".join("\n" + json.dumps(tool.openai, ensure_ascii=False) for tool in tools)
    block = _TOOLS_HEADER + lines + _TOOLS_FOOTER
    return f"{system}\n\n{block}" if system else block


def render_tool_calls(content: str, calls: Iterable[Mapping[str, Any]]) -> str:
    """An assistant turn's text: its content, then each call as the template writes it."""
    pieces = [content] if content else []
    for call in calls:
        arguments = json.dumps(call.get("args") or {}, ensure_ascii=False)
        pieces.append(f'{TOOL_CALL_START}\n{{"name": {json.dumps(call["name"], ensure_ascii=False)}, '
                      f'"arguments": {arguments}}}\n{TOOL_CALL_END}')
    return "\n".join(pieces)


# --- answer side ---------------------------------------------------------------------------


Event = TextDelta | ToolCallStarted | ToolCallDone


class ToolCallParser:
    """Splits an answer into text and `<tool_call>` blocks, delta by delta.

    Whitespace next to a call is dropped (Qwen2.5 writes a newline between text and calls);
    text after a call is joined to the text before it with a newline.
    """

    def __init__(self) -> None:
        self._pending = ""  # text not yet handed out (a possible partial tag, trailing whitespace)
        self._body: str | None = None  # inside a call: what follows <tool_call>
        self._call_id = ""
        self._announced = False
        self._index = 0
        self._wrote_text = False
        self._after_call = False

    def feed(self, text: str) -> list[Event]:
        events: list[Event] = []
        if self._body is not None:
            self._body += text
        else:
            self._pending += text
        while True:
            if self._body is None:
                if not self._scan_text(events):
                    return events
            elif not self._scan_call(events):
                return events

    def finish(self) -> list[Event]:
        """The answer ended: hand out held text, and an unclosed call as invalid."""
        events: list[Event] = []
        if self._body is not None:
            body, self._body = self._body, None
            events.append(self._invalid(TOOL_CALL_START + body, "the answer ended before </tool_call>", body))
        elif self._pending.strip():
            self._emit_text(self._pending.rstrip(), events)
        self._pending = ""
        return events

    # --- states -------------------------------------------------------------------------

    def _scan_text(self, events: list[Event]) -> bool:
        """Hands out text up to the next `<tool_call>`; True if a call was entered."""
        at = self._pending.find(TOOL_CALL_START)
        if at >= 0:
            before, rest = self._pending[:at], self._pending[at + len(TOOL_CALL_START) :]
            self._pending = ""
            if before.strip():
                self._emit_text(before.rstrip(), events)
            self._body, self._call_id, self._announced = rest, _new_id(), False
            return True
        # Hold back a possible partial "<tool_call>" and trailing whitespace (it may precede a call).
        keep = _partial_suffix(self._pending, TOOL_CALL_START)
        head, tail = self._pending[: len(self._pending) - keep], self._pending[len(self._pending) - keep :]
        stripped = head.rstrip()
        if stripped.strip():
            self._emit_text(stripped, events)
            self._pending = head[len(stripped) :] + tail
        return False

    def _scan_call(self, events: list[Event]) -> bool:
        """Completes the current call if its end tag arrived; True if back in text."""
        assert self._body is not None
        end = self._body.find(TOOL_CALL_END)
        nested = self._body.find(TOOL_CALL_START)
        if nested >= 0 and (end < 0 or nested < end):
            # A new call opened before this one closed: this one is broken, the new one goes on.
            body = self._body[:nested]
            events.append(self._invalid(TOOL_CALL_START + body, "a new <tool_call> began before </tool_call>", body))
            self._body, self._call_id, self._announced = self._body[nested + len(TOOL_CALL_START) :], _new_id(), False
            return True
        if end < 0:
            if not self._announced and (match := _HEADER.match(self._body)):
                events.append(ToolCallStarted(self._index, self._call_id, _unescape(match.group(1))))
                self._announced = True
            return False
        body, rest = self._body[:end], self._body[end + len(TOOL_CALL_END) :]
        self._body = None
        events.append(self._complete(body))
        self._pending, self._after_call = rest, True
        return True

    # --- pieces -------------------------------------------------------------------------

    def _emit_text(self, text: str, events: list[Event]) -> None:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            if self._wrote_text:
                text = "\n" + text
            self._after_call = False
        if text:
            events.append(TextDelta(text))
            self._wrote_text = True

    def _complete(self, body: str) -> ToolCallDone:
        raw = TOOL_CALL_START + body + TOOL_CALL_END
        try:
            call = json.loads(body)
        except json.JSONDecodeError as e:
            return self._invalid(raw, f"the call is not valid JSON: {e}", body)
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return self._invalid(raw, 'the call must be a JSON object with a string "name"', body)
        args = call.get("arguments", call.get("parameters", {}))
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                pass
        if args is None:
            args = {}
        if not isinstance(args, dict):
            return self._invalid(raw, '"arguments" must be a JSON object', body, name=call["name"])
        return self._finished(call["name"], args, raw, None)

    def _invalid(self, raw: str, error: str, body: str, *, name: str | None = None) -> ToolCallDone:
        if name is None and (match := _NAME.search(body)):
            name = _unescape(match.group(1))
        return self._finished(name, None, raw, error)

    def _finished(self, name: str | None, args: dict[str, Any] | None, raw: str, error: str | None) -> ToolCallDone:
        event = ToolCallDone(self._index, self._call_id or _new_id(), name, raw if args is None else args,
                             args is not None, error, self._announced)
        self._index += 1
        self._call_id, self._announced = "", False
        return event


@dataclass(frozen=True)
class ParsedOutput:
    """A whole answer split into text, valid calls and invalid ones (in call order)."""

    content: str
    calls: list[ToolCallDone]

    @property
    def valid(self) -> list[ToolCallDone]:
        return [c for c in self.calls if c.valid]

    @property
    def invalid(self) -> list[ToolCallDone]:
        return [c for c in self.calls if not c.valid]


def parse_tool_calls(text: str) -> ParsedOutput:
    """Parses a complete answer; the same as feeding it to `ToolCallParser` in any number of pieces."""
    parser = ToolCallParser()
    events = [*parser.feed(text), *parser.finish()]
    return ParsedOutput(
        content="".join(e.text for e in events if isinstance(e, TextDelta)),
        calls=[e for e in events if isinstance(e, ToolCallDone)],
    )


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _unescape(name: str) -> str:
    try:
        return json.loads(f'"{name}"')
    except json.JSONDecodeError:
        return name


def _new_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"
