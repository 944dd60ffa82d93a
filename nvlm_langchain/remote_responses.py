"""OpenAI chat-completion answers -> chat events, for `ChatNVLM`'s remote backend.

Tool calls arrive one of two ways, and users get `tool_calls` either way:

- structured, as `message.tool_calls` (streamed as `delta.tool_calls`): from a server that
  parses calls (nvlm-serve; vLLM started with `--enable-auto-tool-choice --tool-call-parser
  hermes`, or any forced `tool_choice`);
- as text, `<tool_call>` blocks in the content (vLLM without a tool parser): when tools were
  sent, the content goes through the engine chat layer's `EventReader`, whole or delta by delta.

Logprobs (`choices[].logprobs`, when asked) go on the last chunk, `{"content": [...]}` as
ChatOpenAI's. Both become the `nvlm_engine.chat` events a local answer makes, and `responses.py` turns
those into LangChain messages and chunks, so local and remote answers share one translator.
Knows the shapes of the `openai` client's response objects; knows nothing of requests.
"""

from __future__ import annotations

import json
from typing import Any

from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult

from nvlm_engine.chat import (
    ChatEvent,
    EventReader,
    Finished,
    ToolCallArgumentsDelta,
    ToolCallDone,
    ToolCallStarted,
    finish_reason,
)

from .responses import ChunkTranslator, as_chat_result, message_from_events

__all__ = ["CompletionStream", "chat_result", "message_from_completion"]


def message_from_completion(completion: Any, model_name: str, *, parse_tools: bool) -> AIMessage:
    """A `ChatCompletion` -> the whole answer as an `AIMessage`.

    Args:
        completion: the openai client's `ChatCompletion`.
        model_name: the requested model, reported when the server names none.
        parse_tools: tools were sent: read `<tool_call>` blocks out of the text too.
    """
    if not completion.choices:
        raise ValueError(f"the server answered without a choice: {completion!r:.300}")
    choice = completion.choices[0]
    # Also when the server parsed calls itself: the text is then read the same way as streamed.
    reader = EventReader(parse_tools=parse_tools)
    events: list[ChatEvent] = [*reader.text(choice.message.content or ""), *reader.finish(None)[:-1]]
    start = sum(isinstance(e, ToolCallDone) for e in events)
    structured = [_structured_call(start + i, raw) for i, raw in enumerate(choice.message.tool_calls or [])]
    valid = sum(e.valid for e in [*events, *structured] if isinstance(e, ToolCallDone))
    events += structured
    events.append(Finished(finish_reason(choice.finish_reason or "stop", valid), completion.usage))
    return message_from_events(events, completion.model or model_name)


def chat_result(completion: Any, model_name: str, *, parse_tools: bool) -> ChatResult:
    return as_chat_result(message_from_completion(completion, model_name, parse_tools=parse_tools))


class CompletionStream:
    """One streamed answer's `ChatCompletionChunk`s -> events -> `ChatGenerationChunk`s, then the last chunk.

    Args:
        model_name: the requested model, reported when the server names none.
        parse_tools: tools were sent: read `<tool_call>` blocks out of the text too.
    """

    def __init__(self, model_name: str, *, parse_tools: bool) -> None:
        self._reader = EventReader(parse_tools=parse_tools)
        self._chunks = ChunkTranslator(model_name)
        self._finish: str | None = None
        self._usage: Any = None
        self._named_calls = 0  # structured calls announced with a name
        self._logprobs: list[dict[str, Any]] | None = None  # when the server sent choices[].logprobs

    def push(self, chunk: Any) -> ChatGenerationChunk | None:
        """The chunk for a server chunk, or None when it holds nothing to show (a role, usage, a finish)."""
        self._chunks.model_name = chunk.model or self._chunks.model_name
        if chunk.usage is not None:  # the include_usage chunk (no choices)
            self._usage = chunk.usage
        if not chunk.choices:
            return None
        choice = chunk.choices[0]
        self._finish = choice.finish_reason or self._finish
        logprobs = getattr(choice, "logprobs", None)
        if logprobs is not None:
            self._logprobs = [*(self._logprobs or []), *(_plain(entry) for entry in logprobs.content or [])]
        events = self._reader.text(choice.delta.content or "") if choice.delta.content else []
        for raw in choice.delta.tool_calls or []:
            function = raw.function
            if function is not None and function.name:
                self._named_calls += 1
                events.append(ToolCallStarted(raw.index, raw.id or "", function.name))
            if function is not None and function.arguments:
                events.append(ToolCallArgumentsDelta(raw.index, function.arguments))
        return self._chunks.chunk(events)

    def last(self) -> ChatGenerationChunk:
        """The final chunk: what the parser held back, usage and metadata."""
        events = self._reader.finish(None, self._finish or "stop")
        held = events.pop()
        assert isinstance(held, Finished)
        reason = held.finish_reason
        if self._named_calls:
            reason = finish_reason(self._finish or "stop", self._named_calls)
        chunk = self._chunks.chunk([*events, Finished(reason, self._usage)])
        assert chunk is not None
        if self._logprobs is not None:
            # The whole answer's, where the local backend puts them and ChatOpenAI does: the
            # generation info, which LangChain copies into response_metadata.
            chunk.generation_info = {**(chunk.generation_info or {}), "logprobs": {"content": self._logprobs}}
        return chunk


def _plain(entry: Any) -> dict[str, Any]:
    """One `ChatCompletionTokenLogprob` as the plain dict ChatOpenAI puts in response_metadata."""
    return entry.model_dump() if hasattr(entry, "model_dump") else dict(entry)


def _structured_call(index: int, raw: Any) -> ToolCallDone:
    """A server-parsed call -> a `ToolCallDone`, invalid when its arguments are not a JSON object."""
    function = getattr(raw, "function", None)
    name = function.name if function is not None else None
    arguments = (function.arguments if function is not None else None) or ""
    try:
        args = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError as e:
        return ToolCallDone(index, raw.id, name, arguments, False, f"the arguments are not valid JSON: {e}")
    if not isinstance(args, dict) or not name:
        return ToolCallDone(index, raw.id, name, arguments, False, "a call needs a name and a JSON object of arguments")
    return ToolCallDone(index, raw.id, name, args, True)
