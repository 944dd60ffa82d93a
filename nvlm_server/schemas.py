"""The OpenAI chat-completions wire format: requests validated with pydantic, responses built as dicts.

A top-level field this server does not implement is a 400 naming it (never silently ignored);
the harmless ones OpenAI clients and LangChain's ChatOpenAI send (`user`, `metadata`, `store`
false, an empty `logit_bias`, `stream_options`, `n` 1) are accepted. Inside messages and tools
unknown keys are ignored (clients add their own, e.g. `strict`). Known fields with the wrong
type or out of range are a 400 with the field named. vLLM's sampling extensions `top_k` and
`repetition_penalty` are accepted too, and its `continue_final_message` / `add_generation_prompt`
(a request ending with an assistant message is continued unless it asks otherwise). Numbers must be finite (Python's JSON reader accepts
`NaN` and `Infinity`, which would poison a whole decode batch) and seeds must fit 64 bits,
signed or unsigned (what a torch generator takes); the engine makes tiny temperatures greedy.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Lenient):
    url: str
    detail: str | None = None


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


class FunctionCall(_Lenient):
    name: str
    arguments: str = "{}"


class ToolCall(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class FunctionDef(_Lenient):
    name: str
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class Tool(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    # vLLM's extensions for a final assistant message. Without them such a message is continued
    # (lm-eval's chat-completions model sends HumanEval's answer prefix that way, with no flag).
    continue_final_message: bool | None = None
    add_generation_prompt: bool | None = None
    # Accepted because clients send them by default, and harmless: who the end user is, tags,
    # and "do not store" (this server stores nothing). A bias or storing is refused below.
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported by this server; send none (or an empty object)")
        return value

    @field_validator("store")
    @classmethod
    def _no_store(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("store=true is not supported: this server stores no completions")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 16:
            raise ValueError("at most 16 stop strings")
        return stops


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, message: dict[str, Any], finish_reason: str, usage: dict[str, int],
               logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason,
                     "logprobs": None if logprobs is None else {"content": logprobs}}],
        "usage": usage,
    }


def chunk(cid: str, model: str, delta: dict[str, Any], finish_reason: str | None = None,
          usage: dict[str, int] | None = None, *, empty_choices: bool = False,
          logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [] if empty_choices else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                              "logprobs": None if logprobs is None else {"content": logprobs}}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def error_body(message: str, *, kind: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
