"""`ChatNVLM`'s remote backend: NVLM-D behind an OpenAI-compatible endpoint (nvlm-serve, or vLLM).

`ChatNVLM(base_url=...)` routes every call here instead of to a local engine. A call becomes
one streaming `chat.completions.create` request (`invoke` aggregates the stream) made with the official `openai` client (sync or async;
the optional `remote` extra, imported on the first remote call), and its answer becomes the
messages the local model gives: text, usage, finish reason, tool calls, and streamed chunks
with usage on the last one (`remote_responses.py`).

What a client of vLLM's NVLM-D must do, done here for every server:

- `top_p` is always sent, 1.0 when unset: vLLM takes the checkpoint's `top_p: 0` generation
  default and then refuses it;
- the model card's system prompt ("Answer the questions.") is sent when the conversation has
  none: vLLM's server would use the Qwen2.5 template's "You are Qwen, ..." instead;
- images travel as data URLs (`remote_messages.py`).

Tools and `response_format` are sent as OpenAI fields: the server renders and constrains them
(nvlm-serve with its grammar, vLLM with guided decoding). Server errors become `ServerError`
with the server's own message; connection failures and timeouts, after the client's retries,
`ServerConnectionError`.

Knows the OpenAI wire format and client; knows nothing of engines.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGenerationChunk
from langchain_core.runnables.config import run_in_executor

from nvlm_engine import NVLMError
from nvlm_engine.chat import ResponseFormat, ToolBinding
from nvlm_engine.fetch import FetchPolicy
from nvlm_engine.prompts import DEFAULT_SYSTEM_PROMPT

from .call_plan import call_options
from .remote_messages import to_openai_messages
from .remote_responses import CompletionStream

if TYPE_CHECKING:
    from openai import AsyncOpenAI, OpenAI

    from .chat_models import ChatNVLM

__all__ = [
    "DEFAULT_TOP_P",
    "RemoteError",
    "RemoteRequest",
    "ServerConnectionError",
    "ServerError",
    "astream",
    "build_request",
    "stream",
]

DEFAULT_TOP_P = 1.0
"""Sent when the user set no top_p (vLLM's default from the NVLM-D checkpoint, 0, is invalid)."""
_PLACEHOLDER_KEY = "EMPTY"  # the openai client needs a key; servers without one ignore it (vLLM's docs use this)


class RemoteError(NVLMError):
    """A failure of `ChatNVLM(base_url=...)`: the server refused or could not be reached, or a
    local-only feature (the engine, the tokenizer) was used in remote mode."""


class ServerError(RemoteError):
    """The server answered with an error (a 4xx or 5xx status, or an error event mid-stream).

    Attributes:
        status_code: the HTTP status (None for an error event inside a stream).
        code: the server's error code, e.g. "context_length_exceeded" (nvlm-serve), if any.
        param: the request field the server blames, if any.
        server_message: the server's own words.
    """

    def __init__(self, message: str, *, status_code: int | None, code: str | None, param: str | None,
                 server_message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.param = param
        self.server_message = server_message


class ServerConnectionError(RemoteError):
    """No answer: the server could not be reached or timed out, after the client's retries."""


# --- requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteRequest:
    """One call as the keyword arguments of `chat.completions.create`, and how to read its answer."""

    params: dict[str, Any]
    model_name: str
    parse_tools: bool


def build_request(chat: ChatNVLM, messages: Sequence[BaseMessage], stop: list[str] | None,
                  kwargs: Mapping[str, Any]) -> RemoteRequest:
    """Merges the chat model's fields with the call's options and converts the messages.

    Raises:
        ValueError: unknown call options, `max_tiles` (the server's setting), a bad
            tool_choice or response_format, unreadable content blocks.
        nvlm_engine.ImageError: an image that cannot be read (or a URL while fetching is off).
    """
    if kwargs.get("max_tiles") is not None:
        raise ValueError("max_tiles is the server's setting in remote mode (nvlm-serve --max-tiles; vLLM "
                         "--mm-processor-kwargs '{\"max_dynamic_patch\": N}'); drop it from the call")
    call = call_options(chat, stop, kwargs)  # the local model's merging, so both modes read the same options
    options, model_name = call.sampling, call.model_name
    params: dict[str, Any] = {
        "model": model_name,
        "messages": to_openai_messages(messages, chat.content_options(), allow_url_fetch=chat.allow_url_fetch,
                                       default_system=DEFAULT_SYSTEM_PROMPT,
                                       fetch_policy=FetchPolicy(allow_private_addresses=chat.allow_private_image_hosts)),
        "temperature": options["temperature"],
        "top_p": DEFAULT_TOP_P if options["top_p"] is None else options["top_p"],
        "max_tokens": options["max_tokens"] or chat.default_max_tokens(),
    }
    if call.stop:
        params["stop"] = call.stop
    for name in ("seed", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs"):
        if options[name] is not None:
            params[name] = options[name]
    # vLLM's (and nvlm-serve's) sampling extensions, outside OpenAI's schema.
    extra = {name: options[name] for name in ("top_k", "repetition_penalty") if options[name] is not None}
    if messages and isinstance(messages[-1], AIMessage) and not messages[-1].tool_calls:
        # A final AIMessage is continued, as the local model does; vLLM needs both flags to do so.
        extra.update(continue_final_message=True, add_generation_prompt=False)
    if extra:
        params["extra_body"] = extra
    _add_tools(params, call.tools, parallel_given=kwargs.get("parallel_tool_calls") is not None)
    if call.answer is not None:
        params["response_format"] = _response_format(kwargs["response_format"], call.answer)
    return RemoteRequest(params, model_name, call.tools.active)


def _add_tools(params: dict[str, Any], tools: ToolBinding, *, parallel_given: bool) -> None:
    """Adds tools and tool_choice as OpenAI writes them (with "none" the tools are sent, and no call is made)."""
    if not tools.tools:
        return
    params["tools"] = [t.openai or {"type": "function", "function": {"name": t.name, "parameters": t.parameters}}
                       for t in tools.tools]
    named = {"type": "function", "function": {"name": tools.choice}}
    params["tool_choice"] = tools.choice if tools.choice in ("auto", "required", "none") else named
    if parallel_given:
        params["parallel_tool_calls"] = tools.parallel


def _response_format(value: Any, answer: ResponseFormat) -> dict[str, Any]:
    if answer.schema is None:
        return {"type": "json_object"}
    inner = value.get("json_schema") if isinstance(value, Mapping) else None
    name = inner.get("name") if isinstance(inner, Mapping) else None
    return {"type": "json_schema", "json_schema": {"name": name or answer.schema.get("title") or "answer",
                                                   "schema": answer.schema}}


# --- calls ---------------------------------------------------------------------------------


def stream(chat: ChatNVLM, messages: Sequence[BaseMessage], stop: list[str] | None,
           kwargs: Mapping[str, Any]) -> Iterator[ChatGenerationChunk]:
    request = build_request(chat, messages, stop, kwargs)
    openai = _openai()
    response = CompletionStream(request.model_name, parse_tools=request.parse_tools)
    try:
        chunks = _client(chat).chat.completions.create(**request.params, stream=True,
                                                       stream_options={"include_usage": True})
    except openai.OpenAIError as e:
        raise _translate(e, chat) from e
    try:  # closing the response when the consumer stops early makes the server cancel the request
        for chunk in chunks:
            if (piece := response.push(chunk)) is not None:
                yield piece
    except openai.OpenAIError as e:
        raise _translate(e, chat) from e
    finally:
        chunks.close()
    yield response.last()


async def astream(chat: ChatNVLM, messages: Sequence[BaseMessage], stop: list[str] | None,
                  kwargs: Mapping[str, Any]) -> AsyncGenerator[ChatGenerationChunk, None]:
    request = await run_in_executor(None, build_request, chat, messages, stop, kwargs)
    openai = _openai()
    response = CompletionStream(request.model_name, parse_tools=request.parse_tools)
    try:
        chunks = await _aclient(chat).chat.completions.create(**request.params, stream=True,
                                                              stream_options={"include_usage": True})
    except openai.OpenAIError as e:
        raise _translate(e, chat) from e
    try:
        async for chunk in chunks:
            if (piece := response.push(chunk)) is not None:
                yield piece
    except openai.OpenAIError as e:
        raise _translate(e, chat) from e
    finally:
        await chunks.close()
    yield response.last()


# --- the openai client ---------------------------------------------------------------------


def _openai() -> Any:
    try:
        import openai
    except ImportError as e:
        raise ImportError(
            "ChatNVLM(base_url=...) talks to the server with the openai client, which is not installed: "
            "pip install 'nvlm-langchain[remote]'"
        ) from e
    return openai


_ClientKey = tuple[str, str, "float | None", int]
_clients: dict[_ClientKey, OpenAI] = {}
_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[_ClientKey, AsyncOpenAI]] = (
    weakref.WeakKeyDictionary()
)
_clients_lock = threading.Lock()


def _client_key(chat: ChatNVLM) -> _ClientKey:
    assert chat.base_url is not None
    key = chat.api_key.get_secret_value() if chat.api_key is not None else _PLACEHOLDER_KEY
    return (chat.base_url, key, chat.timeout, chat.max_retries)


def _client(chat: ChatNVLM) -> OpenAI:
    """The sync client for this endpoint, shared by every ChatNVLM with the same settings (one connection pool)."""
    key = _client_key(chat)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = _openai().OpenAI(**_client_options(key))
        return client


def _aclient(chat: ChatNVLM) -> AsyncOpenAI:
    """The async client for this endpoint and event loop (pooled connections belong to the loop that opened them)."""
    key = _client_key(chat)
    loop = asyncio.get_running_loop()
    with _clients_lock:
        per_loop = _async_clients.setdefault(loop, {})
        client = per_loop.get(key)
        if client is None:
            client = per_loop[key] = _openai().AsyncOpenAI(**_client_options(key))
        return client


def _client_options(key: _ClientKey) -> dict[str, Any]:
    base_url, api_key, timeout, max_retries = key
    options: dict[str, Any] = {"base_url": base_url, "api_key": api_key, "max_retries": max_retries}
    if timeout is not None:
        options["timeout"] = timeout
    return options


# --- errors --------------------------------------------------------------------------------

_HINTS = {
    401: "check api_key (or NVLM_API_KEY)",
    403: "check api_key (or NVLM_API_KEY)",
    404: "check that base_url ends in /v1 and that model is a name the server serves (GET {base_url}/models)",
    413: "send fewer or smaller images",
    429: "the server's queue is full: retry later, or send fewer requests at once (max_concurrency)",
}


def _translate(error: Exception, chat: ChatNVLM) -> RemoteError:
    """An openai client error -> ServerError / ServerConnectionError, with the server's own message."""
    openai = _openai()
    where = chat.base_url
    if isinstance(error, openai.APITimeoutError):
        limit = f"{chat.timeout} s" if chat.timeout is not None else "the openai client's default"
        return ServerConnectionError(f"{where} did not answer within the timeout ({limit}, after {chat.max_retries} "
                                     "retries): raise timeout, or lower max_tokens")
    if isinstance(error, openai.APIConnectionError):
        cause = error.__cause__ or error
        return ServerConnectionError(f"cannot reach {where} (after {chat.max_retries} retries): {cause}; "
                                     "check base_url and that the server is running (GET /health on nvlm-serve)")
    if isinstance(error, openai.APIError):
        status = getattr(error, "status_code", None)
        body = error.body
        message = body.get("message") if isinstance(body, Mapping) else None
        message = str(message or body or error.message)
        head = f"{where} refused the request ({status}" if status else f"{where} reported an error mid-stream ("
        head += f", {error.code})" if error.code else ")"
        hint = _HINTS.get(status or 0, "").format(base_url=where)
        return ServerError(f"{head}: {message}" + (f"; {hint}" if hint else ""), status_code=status,
                           code=error.code, param=error.param, server_message=message)
    return RemoteError(f"the openai client failed talking to {where}: {error}")
