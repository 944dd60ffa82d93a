"""Chat events -> LangChain messages and chunks: the one translator, for local and remote answers.

`nvlm_engine.chat` turns a local answer into typed events (`TextDelta`, `ToolCallStarted`,
`ToolCallArgumentsDelta`, `ToolCallDone`, `Finished`); `remote_responses.py` turns OpenAI wire
answers into the same events. Here they become LangChain objects, once:

- `ChunkTranslator`: events -> `ChatGenerationChunk`s; the last chunk alone carries
  `usage_metadata` and `response_metadata`, with `chunk_position="last"`;
- `message_from_events`: all events of an answer -> one `AIMessage`, equal to what the
  chunks aggregate to.

`ResponseStream` and `chat_result` are the local answer's adapters (engine deltas and
`GenerationResult`s). Knows nothing of how requests are made or scheduled.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from nvlm_engine import GenerationResult
from nvlm_engine.chat import (
    ChatEvent,
    EventReader,
    Finished,
    TextDelta,
    ToolCallArgumentsDelta,
    ToolCallDone,
    ToolCallStarted,
)

__all__ = [
    "ChunkTranslator",
    "ResponseStream",
    "chat_result",
    "message_from_events",
    "message_from_result",
    "response_metadata",
    "usage_metadata",
]


def usage_metadata(usage: Any) -> UsageMetadata | None:
    """Engine or OpenAI usage (both have prompt/completion/total_tokens) as LangChain's; None if unknown."""
    if usage is None:
        return None
    prompt, completion = usage.prompt_tokens or 0, usage.completion_tokens or 0
    total = usage.total_tokens if usage.total_tokens is not None else prompt + completion
    return UsageMetadata(input_tokens=prompt, output_tokens=completion, total_tokens=total)


def response_metadata(finished: Finished, model_name: str) -> dict[str, Any]:
    """Model name and finish reason; for a local answer also image tokens and timings (seconds)."""
    metadata: dict[str, Any] = {"model_name": model_name, "finish_reason": finished.finish_reason}
    if finished.result is not None:
        metadata.update(image_tokens=finished.result.usage.image_tokens, timings=dict(finished.result.timings))
    return metadata


class ChunkTranslator:
    """One answer's events -> chunks.

    A call is announced with its name (`ToolCallStarted`), then gets its arguments; chunks of
    one index merge by concatenating strings. An invalid call's arguments are its raw text,
    which starts with "<tool_call>" and so never parses: it aggregates to an invalid call.
    """

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self._announced: set[int] = set()
        self._held: dict[int, str] = {}  # arguments of a call not announced yet

    def chunk(self, events: Iterable[ChatEvent]) -> ChatGenerationChunk | None:
        """The chunk for some events, or None when there is nothing to show; with a `Finished`
        among them, the last chunk."""
        text, calls, finished = "", [], None
        for event in events:
            if isinstance(event, TextDelta):
                text += event.text
            elif isinstance(event, ToolCallStarted):
                self._announced.add(event.index)
                calls.append(tool_call_chunk(name=event.name, args="", id=event.id, index=event.index))
            elif isinstance(event, ToolCallArgumentsDelta):
                if event.index in self._announced:
                    calls.append(tool_call_chunk(name=None, args=event.text, id=None, index=event.index))
                else:
                    self._held[event.index] = self._held.get(event.index, "") + event.text
            elif isinstance(event, ToolCallDone) and event.index not in self._announced:
                args = self._held.pop(event.index, None)
                args = args if args is not None else (event.raw if not event.valid else "")
                calls.append(tool_call_chunk(name=event.name, args=args, id=event.id, index=event.index))
            elif isinstance(event, Finished):
                finished = event
        if finished is None:
            if not text and not calls:
                return None
            return ChatGenerationChunk(message=AIMessageChunk(content=text, tool_call_chunks=calls))
        metadata = response_metadata(finished, self.model_name)
        message = AIMessageChunk(content=text, tool_call_chunks=calls, chunk_position="last",
                                 usage_metadata=usage_metadata(finished.usage), response_metadata=metadata)
        return ChatGenerationChunk(message=message, generation_info={"finish_reason": finished.finish_reason})


def message_from_events(events: Iterable[ChatEvent], model_name: str) -> AIMessage:
    """A whole answer's events (ending with `Finished`) -> its `AIMessage`."""
    text, valid, invalid, finished = "", [], [], None
    for event in events:
        if isinstance(event, TextDelta):
            text += event.text
        elif isinstance(event, ToolCallDone) and event.valid:
            valid.append(tool_call(name=event.name or "", args=event.args or {}, id=event.id))
        elif isinstance(event, ToolCallDone):
            invalid.append(invalid_tool_call(name=event.name, args=event.raw, id=event.id, error=event.error))
        elif isinstance(event, Finished):
            finished = event
    assert finished is not None, "an answer's events end with Finished"
    return AIMessage(content=text, tool_calls=valid, invalid_tool_calls=invalid,
                     usage_metadata=usage_metadata(finished.usage),
                     response_metadata=response_metadata(finished, model_name))


def as_chat_result(message: AIMessage) -> ChatResult:
    info = {"finish_reason": message.response_metadata["finish_reason"]}
    return ChatResult(generations=[ChatGeneration(message=message, generation_info=info)])


# --- local answers -------------------------------------------------------------------------


def message_from_result(result: GenerationResult, model_name: str, *, parse_tools: bool) -> AIMessage:
    """The whole local answer as an `AIMessage` (tool calls parsed when they may be made)."""
    reader = EventReader(parse_tools=parse_tools)
    return message_from_events([*reader.text(result.text), *reader.finish(result)], model_name)


def chat_result(result: GenerationResult, model_name: str, *, parse_tools: bool) -> ChatResult:
    return as_chat_result(message_from_result(result, model_name, parse_tools=parse_tools))


class ResponseStream:
    """One local request's deltas -> chunks.

    Args:
        model_name: reported in the last chunk's `response_metadata`.
        parse_tools: split `<tool_call>` blocks out of the text (tools may be called).
    """

    def __init__(self, model_name: str, *, parse_tools: bool) -> None:
        self.model_name = model_name
        self._reader = EventReader(parse_tools=parse_tools)
        self._chunks = ChunkTranslator(model_name)

    def chunk(self, text: str) -> ChatGenerationChunk | None:
        """The chunk for a delta, or None when nothing can be shown yet (e.g. inside a call)."""
        return self._chunks.chunk(self._reader.text(text))

    def last(self, text: str, result: GenerationResult) -> ChatGenerationChunk:
        """The final chunk: the last delta's text, what the parser held back, usage and metadata."""
        chunk = self._chunks.chunk([*self._reader.text(text), *self._reader.finish(result)])
        assert chunk is not None
        return chunk
