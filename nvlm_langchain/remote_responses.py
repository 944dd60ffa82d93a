"""OpenAI chat-completion answers -> LangChain messages, for `ChatNVLM`'s remote backend.

Tool calls arrive one of two ways, and users get `tool_calls` either way:

- structured, as `message.tool_calls` (streamed as `delta.tool_calls`): from a server that
  parses calls (nvlm-serve; vLLM started with `--enable-auto-tool-choice --tool-call-parser
  hermes`, or any forced `tool_choice`);
- as text, `<tool_call>` blocks in the content (vLLM without a tool parser): when tools were
  sent, the content goes through the local model's `ToolCallParser`, whole or delta by delta.

As locally, the last chunk of a stream alone carries `usage_metadata` and `response_metadata`
(model name, finish reason; "tool_calls" when the answer ended with calls), with
`chunk_position="last"`, and a streamed answer aggregates to what `invoke` returns.

Knows the shapes of the `openai` client's response objects; knows nothing of requests.
"""

from __future__ import annotations

import json
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import ToolCall, ToolCallChunk, invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from .tool_calls import CallFinished, CallStarted, TextDelta, ToolCallParser, parse_tool_calls

__all__ = ["CompletionStream", "chat_result", "message_from_completion"]


def usage_metadata(usage: Any) -> UsageMetadata | None:
    """The server's `usage` as LangChain's; None when the server sent none."""
    if usage is None:
        return None
    prompt, completion = usage.prompt_tokens or 0, usage.completion_tokens or 0
    total = usage.total_tokens if usage.total_tokens is not None else prompt + completion
    return UsageMetadata(input_tokens=prompt, output_tokens=completion, total_tokens=total)


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
    content = choice.message.content or ""
    valid: list[ToolCall] = []
    invalid: list[Any] = []
    if parse_tools:  # also when the server parsed calls itself: the text is then read the same way as streamed
        parsed = parse_tool_calls(content)
        content = parsed.content
        valid += [tool_call(name=c.name or "", args=c.args or {}, id=c.id) for c in parsed.valid]
        invalid += [invalid_tool_call(name=c.name, args=c.raw, id=c.id, error=c.error) for c in parsed.invalid]
    for raw in choice.message.tool_calls or []:
        call = _structured_call(raw)
        (valid if call["type"] == "tool_call" else invalid).append(call)
    finish = _finish_reason(choice.finish_reason, tool_calls=bool(valid))
    return AIMessage(
        content=content,
        tool_calls=valid,
        invalid_tool_calls=invalid,
        usage_metadata=usage_metadata(completion.usage),
        response_metadata={"model_name": completion.model or model_name, "finish_reason": finish},
    )


def chat_result(completion: Any, model_name: str, *, parse_tools: bool) -> ChatResult:
    message = message_from_completion(completion, model_name, parse_tools=parse_tools)
    info = {"finish_reason": message.response_metadata["finish_reason"]}
    return ChatResult(generations=[ChatGeneration(message=message, generation_info=info)])


class CompletionStream:
    """One streamed answer's `ChatCompletionChunk`s -> `ChatGenerationChunk`s, then the last chunk.

    Args:
        model_name: the requested model, reported when the server names none.
        parse_tools: tools were sent: read `<tool_call>` blocks out of the text too.
    """

    def __init__(self, model_name: str, *, parse_tools: bool) -> None:
        self.model_name = model_name
        self._parser = ToolCallParser() if parse_tools else None
        self._finish: str | None = None
        self._usage: Any = None
        self._valid_calls = 0  # complete, valid calls seen, structured or from text

    def push(self, chunk: Any) -> ChatGenerationChunk | None:
        """The chunk for a server chunk, or None when it holds nothing to show (a role, usage, a finish)."""
        self.model_name = chunk.model or self.model_name
        if chunk.usage is not None:  # the include_usage chunk (no choices)
            self._usage = chunk.usage
        if not chunk.choices:
            return None
        choice = chunk.choices[0]
        self._finish = choice.finish_reason or self._finish
        text = choice.delta.content or ""
        calls: list[ToolCallChunk] = []
        if self._parser is not None and text:
            text, calls = self._from_events(self._parser.feed(text))
        for raw in choice.delta.tool_calls or []:
            function = raw.function
            calls.append(tool_call_chunk(name=function.name if function else None,
                                         args=function.arguments if function else None, id=raw.id, index=raw.index))
            self._valid_calls += bool(function and function.name)
        if not text and not calls:
            return None
        return ChatGenerationChunk(message=AIMessageChunk(content=text, tool_call_chunks=calls))

    def last(self) -> ChatGenerationChunk:
        """The final chunk: what the parser held back, usage and metadata."""
        text, calls = self._from_events(self._parser.finish()) if self._parser is not None else ("", [])
        finish = _finish_reason(self._finish, tool_calls=self._valid_calls > 0)
        message = AIMessageChunk(
            content=text,
            tool_call_chunks=calls,
            chunk_position="last",
            usage_metadata=usage_metadata(self._usage),
            response_metadata={"model_name": self.model_name, "finish_reason": finish},
        )
        return ChatGenerationChunk(message=message, generation_info={"finish_reason": finish})

    def _from_events(self, events: list[Any]) -> tuple[str, list[ToolCallChunk]]:
        # As responses.ResponseStream: a call is announced with its name, then completed with
        # its arguments; an invalid call's arguments are its raw text, which never parses.
        text = "".join(e.text for e in events if isinstance(e, TextDelta))
        chunks = []
        for event in events:
            if isinstance(event, CallStarted):
                chunks.append(tool_call_chunk(name=event.name, args="", id=event.id, index=event.index))
            elif isinstance(event, CallFinished):
                self._valid_calls += event.valid
                args = json.dumps(event.args, ensure_ascii=False) if event.valid else event.raw
                if event.announced:
                    chunks.append(tool_call_chunk(name=None, args=args, id=None, index=event.index))
                else:
                    chunks.append(tool_call_chunk(name=event.name, args=args, id=event.id, index=event.index))
        return text, chunks


def _structured_call(raw: Any) -> Any:
    """A server-parsed call -> a LangChain tool call, or an invalid one when its arguments are not a JSON object."""
    function = getattr(raw, "function", None)
    name = function.name if function is not None else None
    arguments = (function.arguments if function is not None else None) or ""
    try:
        args = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError as e:
        return invalid_tool_call(name=name, args=arguments, id=raw.id, error=f"the arguments are not valid JSON: {e}")
    if not isinstance(args, dict) or not name:
        error = "a call needs a name and a JSON object of arguments"
        return invalid_tool_call(name=name, args=arguments, id=raw.id, error=error)
    return tool_call(name=name, args=args, id=raw.id)


def _finish_reason(reason: str | None, *, tool_calls: bool) -> str:
    # "tool_calls" when the answer ended with calls, as locally (and as OpenAI reports it).
    reason = reason or "stop"
    return "tool_calls" if tool_calls and reason == "stop" else reason
