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
    "PROVIDER",
    "ChunkTranslator",
    "ResponseStream",
    "chat_result",
    "combine_llm_outputs",
    "finish_chunk",
    "finish_result",
    "message_from_events",
    "message_from_result",
    "response_metadata",
    "token_usage",
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


# --- what both backends' answers carry alike ---------------------------------------------------

PROVIDER = "nvlm"
"""`response_metadata["model_provider"]`, `llm_output["model_provider"]` and LangSmith's `ls_provider`."""


def finish_chunk(chunk: ChatGenerationChunk) -> ChatGenerationChunk:
    """Stamps the last chunk (the only one with response_metadata) with the provider and the
    token usage that invoke's `llm_output` reports, so that a stream aggregates to an invoke."""
    if getattr(chunk.message, "chunk_position", None) == "last":
        usage = getattr(chunk.message, "usage_metadata", None)
        chunk.message.response_metadata["token_usage"] = token_usage(usage) if usage else None
        chunk.message.response_metadata["model_provider"] = PROVIDER
    return chunk


def finish_result(result: ChatResult, default_model_name: str) -> ChatResult:
    """Adds the legacy `llm_output` (token usage and model name, as ChatOpenAI's, which
    callbacks such as cost trackers read) and the provider to an aggregated stream."""
    for generation in result.generations:
        generation.message.response_metadata["model_provider"] = PROVIDER
    message = result.generations[0].message
    usage = getattr(message, "usage_metadata", None)
    result.llm_output = {
        "token_usage": token_usage(usage) if usage else None,
        "model_name": message.response_metadata.get("model_name", default_model_name),
        "model_provider": PROVIDER,
    }
    return result


def combine_llm_outputs(llm_outputs: list[dict[str, Any] | None], default_model_name: str) -> dict[str, Any]:
    """As ChatOpenAI's: a batch's `llm_output` sums the token usage."""
    total: dict[str, int] = {}
    model_name = None
    for output in llm_outputs:
        if not output:
            continue
        model_name = model_name or output.get("model_name")
        for key, value in (output.get("token_usage") or {}).items():
            total[key] = total.get(key, 0) + value
    return {"token_usage": total, "model_name": model_name or default_model_name, "model_provider": PROVIDER}


def token_usage(usage: Any) -> dict[str, int]:
    """LangChain's usage metadata in OpenAI's `usage` names (`llm_output["token_usage"]`)."""
    return {"prompt_tokens": usage["input_tokens"], "completion_tokens": usage["output_tokens"],
            "total_tokens": usage["total_tokens"]}
