"""What a chat answer is made of, as typed events: text, tool calls, the end.

`ChatService.events()` produces them once from the engine's deltas; every output format
(OpenAI JSON and SSE in nvlm_server, LangChain messages and chunks in nvlm_langchain)
translates them once. A remote client turns OpenAI wire chunks back into the same events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nvlm_engine.generation import GenerationResult

__all__ = [
    "ChatEvent",
    "Finished",
    "TextDelta",
    "ToolCallArgumentsDelta",
    "ToolCallDone",
    "ToolCallStarted",
    "finish_reason",
]


@dataclass(frozen=True)
class TextDelta:
    """Answer text that became safe to show (never part of a `<tool_call>` block)."""

    text: str
    logprobs: tuple[Any, ...] = ()  # nvlm_engine.generation.TokenLogprob of this delta's tokens, when asked


@dataclass(frozen=True)
class ToolCallStarted:
    """A call's name is known; its arguments are still coming."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgumentsDelta:
    """Text of a call's arguments (JSON for a valid call, the raw block for a broken named one)."""

    index: int
    text: str


@dataclass(frozen=True)
class ToolCallDone:
    """A call is complete.

    Attributes:
        arguments: the parsed arguments (a dict) when `valid`, else the raw `<tool_call>` text.
        valid: the block was a JSON object with a string name and object arguments.
        error: why it is invalid. `announced`: a `ToolCallStarted` of this index came first.
    """

    index: int
    id: str
    name: str | None
    arguments: dict[str, Any] | str
    valid: bool
    error: str | None = None
    announced: bool = False

    @property
    def args(self) -> dict[str, Any] | None:
        return self.arguments if isinstance(self.arguments, dict) else None

    @property
    def raw(self) -> str:
        return self.arguments if isinstance(self.arguments, str) else ""


@dataclass(frozen=True)
class Finished:
    """The answer ended.

    Attributes:
        finish_reason: "stop", "length", "cancelled" or "tool_calls" (see `finish_reason`).
        usage: the engine's token counts (`nvlm_engine.Usage`), None when unknown (remote).
        logprobs: every generated token's `TokenLogprob`, when asked.
        result: the engine's whole `GenerationResult` (None when remote).
    """

    finish_reason: str
    usage: Any = None
    logprobs: list[Any] | None = None
    result: GenerationResult | None = None


ChatEvent = TextDelta | ToolCallStarted | ToolCallArgumentsDelta | ToolCallDone | Finished


def finish_reason(engine_reason: str, valid_calls: int) -> str:
    """"tool_calls" when the answer ended normally with at least one valid call, else the engine's."""
    return "tool_calls" if valid_calls and engine_reason == "stop" else engine_reason
