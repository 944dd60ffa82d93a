"""Engine output -> LangChain messages: text, tool calls, usage and response metadata.

`ResponseStream` turns one request's text deltas into `ChatGenerationChunk`s (text, then
`tool_call_chunks` as calls complete) and its `GenerationResult` into the last chunk, which
alone carries `usage_metadata` and `response_metadata`, with `chunk_position="last"`.
`message_from_result` builds the whole `AIMessage` from the final text with the same parser,
so a streamed answer aggregates to exactly what `invoke` returns.

Knows nothing of how requests are made or scheduled.
"""

from __future__ import annotations

import json
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from nvlm_engine import GenerationResult

from .tool_calls import CallFinished, CallStarted, TextDelta, ToolCallParser, parse_tool_calls

__all__ = ["ResponseStream", "chat_result", "message_from_result", "response_metadata", "usage_metadata"]


def usage_metadata(result: GenerationResult) -> UsageMetadata:
    usage = result.usage
    return UsageMetadata(
        input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens, total_tokens=usage.total_tokens
    )


def response_metadata(result: GenerationResult, model_name: str, *, tool_calls: bool) -> dict[str, Any]:
    """Model name, finish reason ("tool_calls" when the answer ended with calls), timings in seconds."""
    finish = "tool_calls" if tool_calls and result.finish_reason == "stop" else result.finish_reason
    return {
        "model_name": model_name,
        "finish_reason": finish,
        "image_tokens": result.usage.image_tokens,
        "timings": dict(result.timings),
    }


def message_from_result(result: GenerationResult, model_name: str, *, parse_tools: bool) -> AIMessage:
    """The whole answer as an `AIMessage` (tool calls parsed when tools were bound)."""
    if not parse_tools:
        return AIMessage(
            content=result.text,
            usage_metadata=usage_metadata(result),
            response_metadata=response_metadata(result, model_name, tool_calls=False),
        )
    parsed = parse_tool_calls(result.text)
    return AIMessage(
        content=parsed.content,
        tool_calls=[tool_call(name=c.name or "", args=c.args or {}, id=c.id) for c in parsed.valid],
        invalid_tool_calls=[invalid_tool_call(name=c.name, args=c.raw, id=c.id, error=c.error) for c in parsed.invalid],
        usage_metadata=usage_metadata(result),
        response_metadata=response_metadata(result, model_name, tool_calls=bool(parsed.valid)),
    )


def chat_result(result: GenerationResult, model_name: str, *, parse_tools: bool) -> ChatResult:
    message = message_from_result(result, model_name, parse_tools=parse_tools)
    info = {"finish_reason": message.response_metadata["finish_reason"]}
    return ChatResult(generations=[ChatGeneration(message=message, generation_info=info)])


class ResponseStream:
    """One request's deltas -> chunks.

    Args:
        model_name: reported in the last chunk's `response_metadata`.
        parse_tools: split `<tool_call>` blocks out of the text (tools are bound).
    """

    def __init__(self, model_name: str, *, parse_tools: bool) -> None:
        self.model_name = model_name
        self._parser = ToolCallParser() if parse_tools else None
        self._valid_calls = 0

    def chunk(self, text: str) -> ChatGenerationChunk | None:
        """The chunk for a delta, or None when nothing can be shown yet (e.g. inside a call)."""
        if self._parser is None:
            return ChatGenerationChunk(message=AIMessageChunk(content=text)) if text else None
        return self._from_events(self._parser.feed(text), last=None)

    def last(self, text: str, result: GenerationResult) -> ChatGenerationChunk:
        """The final chunk: the last delta's text, what the parser held back, usage and metadata."""
        if self._parser is None:
            message = AIMessageChunk(content=text, chunk_position="last")
            tool_calls = False
        else:
            events = [*self._parser.feed(text), *self._parser.finish()]
            built = self._from_events(events, last=result)
            assert built is not None
            message = built.message  # type: ignore[assignment]
            tool_calls = self._valid_calls > 0
        message.usage_metadata = usage_metadata(result)
        message.response_metadata = response_metadata(result, self.model_name, tool_calls=tool_calls)
        info = {"finish_reason": message.response_metadata["finish_reason"]}
        return ChatGenerationChunk(message=message, generation_info=info)

    def _from_events(self, events: list[Any], *, last: GenerationResult | None) -> ChatGenerationChunk | None:
        text = "".join(e.text for e in events if isinstance(e, TextDelta))
        chunks = []
        for event in events:
            if isinstance(event, CallStarted):
                chunks.append(tool_call_chunk(name=event.name, args="", id=event.id, index=event.index))
            elif isinstance(event, CallFinished):
                chunks.append(self._finished_chunk(event))
        if last is None and not text and not chunks:
            return None
        message = AIMessageChunk(content=text, tool_call_chunks=chunks, chunk_position="last" if last else None)
        return ChatGenerationChunk(message=message)

    def _finished_chunk(self, event: CallFinished) -> Any:
        # Chunks of one index are merged by concatenating their strings, so a call announced
        # earlier gets its arguments only. An invalid call's arguments are its raw text, which
        # starts with "<tool_call>" and so never parses: it aggregates to an invalid tool call.
        args = json.dumps(event.args, ensure_ascii=False) if event.valid else event.raw
        self._valid_calls += event.valid
        if event.announced:
            return tool_call_chunk(name=None, args=args, id=None, index=event.index)
        return tool_call_chunk(name=event.name, args=args, id=event.id, index=event.index)
