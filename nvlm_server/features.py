"""Per-request behaviour beyond plain text: tools, tool_choice and response_format.

`plan_features()` reads those fields once and returns a `RequestFeatures` that knows how to
change the prompt, which decoding constraint to apply, and how to turn the model's text into
an OpenAI message (plain content, or `tool_calls`), whole or streamed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nvlm_engine import NVLMEngine, TokenConstraint

from .convert import RequestRejected
from .schemas import ChatCompletionRequest


class _PlainStream:
    """Streams text deltas as OpenAI `content` deltas."""

    def push(self, piece: str) -> list[dict[str, Any]]:
        return [{"content": piece}] if piece else []

    def finish(self) -> list[dict[str, Any]]:
        return []

    def finish_reason(self, engine_reason: str) -> str:
        return _openai_reason(engine_reason)


@dataclass
class RequestFeatures:
    """What a request asks for beyond plain chat."""

    def messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return messages

    def constraint(self) -> TokenConstraint | None:
        return None

    def message(self, text: str, engine_reason: str) -> tuple[dict[str, Any], str]:
        return {"role": "assistant", "content": text}, _openai_reason(engine_reason)

    def stream_translator(self) -> _PlainStream:
        return _PlainStream()


def plan_features(req: ChatCompletionRequest, engine: NVLMEngine) -> RequestFeatures:
    """Check tools / tool_choice / response_format and build the request's features."""
    if req.tools or (req.response_format and req.response_format.type != "text"):
        raise RequestRejected("tools and response_format are not supported by this server build", code="unsupported")
    return RequestFeatures()


def _openai_reason(engine_reason: str) -> str:
    # OpenAI has no "cancelled"; a cancelled request ended early like a length cut.
    return {"stop": "stop", "length": "length"}.get(engine_reason, "length")
