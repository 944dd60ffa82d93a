"""One LangChain call -> one `nvlm_engine.chat.ChatRequest`, and for a local model its prepared request.

`call_options` merges the chat model's fields with the call's keyword arguments (the remote
backend reads the same), `compose_call` converts the messages into a `ChatRequest`, and
`plan_call` has the engine's `ChatService` write the system turn, pick the grammar, read the
images and tokenize. Everything that can be wrong with a request fails here, before any
model compute. Not HTTP: a remote call is `remote.py`'s.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from langchain_core.messages import BaseMessage

from nvlm_engine import NVLMEngine, PreparedRequest, load_image
from nvlm_engine.chat import ChatRequest, ChatService, ResponseFormat, Sampling, ToolBinding
from nvlm_engine.fetch import FetchPolicy
from nvlm_engine.sampling import DEFAULT_MAX_NEW_TOKENS

from .engines import LoadedEngine, get_engine
from .messages import to_engine_messages

if TYPE_CHECKING:
    from .chat_models import ChatNVLM

__all__ = ["CallOptions", "CallPlan", "Composed", "call_options", "compose_call", "plan_call",
           "unknown_argument_error"]

SAMPLING_OPTIONS = ("temperature", "top_p", "top_k", "max_tokens", "seed", "repetition_penalty", "max_tiles",
                    "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs")
CALL_OPTIONS = (*SAMPLING_OPTIONS, "model", "tools", "tool_choice", "parallel_tool_calls", "response_format")
# Passed along by LangChain itself, or meaningless for a local model with a grammar (`strict`).
IGNORED_OPTIONS = ("stream", "ls_structured_output_format", "structured_output_format", "strict")
# ChatOpenAI's spellings, taken at call time as by the constructor.
CALL_ALIASES = {"max_completion_tokens": "max_tokens", "stop_sequences": "stop"}


@dataclass(frozen=True)
class CallOptions:
    """A call's options: the chat model's fields overridden by the call's keyword arguments."""

    sampling: dict[str, Any]
    model_name: str
    tools: ToolBinding
    answer: ResponseFormat | None
    stop: list[str] | None


def call_options(chat: ChatNVLM, stop: list[str] | None, kwargs: Mapping[str, Any]) -> CallOptions:
    """Merges fields and keyword arguments (local and remote calls alike).

    Raises:
        ValueError: unknown keyword arguments, max_tokens < 1, a bad tool_choice or response_format.
    """
    kwargs, stop = _resolve_aliases(kwargs, stop)
    unknown = sorted(set(kwargs) - set(CALL_OPTIONS) - set(IGNORED_OPTIONS))
    if unknown:
        raise ValueError(f"ChatNVLM got unknown call option(s) {unknown}; known: {sorted(CALL_OPTIONS)}")
    max_tokens = kwargs.get("max_tokens")
    if max_tokens is not None and max_tokens < 1:  # as the field: 0 must not silently mean the default
        raise ValueError(f"max_tokens must be >= 1 (None is the model card's {DEFAULT_MAX_NEW_TOKENS}), got {max_tokens}")
    sampling = {name: kwargs.get(name, getattr(chat, name, None)) for name in SAMPLING_OPTIONS}
    tools = ToolBinding.build(kwargs.get("tools"), kwargs.get("tool_choice"), kwargs.get("parallel_tool_calls"))
    stops = stop if stop is not None else chat.stop
    return CallOptions(sampling, str(kwargs.get("model") or chat.model), tools,
                       ResponseFormat.parse(kwargs.get("response_format")), list(stops) if stops else None)


def _resolve_aliases(kwargs: Mapping[str, Any], stop: list[str] | None) -> tuple[dict[str, Any], list[str] | None]:
    """`max_completion_tokens` -> `max_tokens`, `stop_sequences` -> `stop` (one string or a list)."""
    out = dict(kwargs)
    for alias, name in CALL_ALIASES.items():
        if alias not in out:
            continue
        value = out.pop(alias)
        if name == "stop":
            if stop is not None:
                raise ValueError("give stop or stop_sequences, not both")
            stop = [value] if isinstance(value, str) else value
        elif name in out:
            raise ValueError(f"give {name} or {alias}, not both")
        else:
            out[name] = value
    return out, stop


def unknown_argument_error(unknown: Sequence[str], known: Iterable[str]) -> ValueError | None:
    """The constructor's refusal of arguments no field reads, naming the nearest field; None if all are known."""
    if not unknown:
        return None
    problems = []
    for name in unknown:
        if name == "model_kwargs":
            problems.append("model_kwargs (no pass-through: a local engine has nowhere to send it, and "
                            "every option ChatNVLM sends to a server is a field of its own)")
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1)
        problems.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ValueError(f"ChatNVLM got unknown argument(s): {', '.join(problems)}")


@dataclass
class Composed:
    """A call's engine, its `ChatRequest` and the service that prepares it."""

    loaded: LoadedEngine
    service: ChatService
    model_name: str
    request: ChatRequest

    @property
    def engine(self) -> NVLMEngine:
        return self.service.engine

    @property
    def messages(self) -> list[dict[str, Any]]:
        """Engine-form messages, system turn written."""
        return self.service.messages(self.request)

    @property
    def max_tiles(self) -> int | None:
        """Tiles per image: the tile budget shared by the request's images (None: the engine's rule)."""
        return self.service.max_tiles(self.request)


@dataclass
class CallPlan:
    """A prepared request and what reading its answer needs."""

    loaded: LoadedEngine
    engine: NVLMEngine
    model_name: str
    request: PreparedRequest
    parse_tools: bool


def compose_call(chat: ChatNVLM, messages: Sequence[BaseMessage], kwargs: Mapping[str, Any],
                 stop: list[str] | None = None) -> Composed:
    """Resolves options and engine and converts the messages into a `ChatRequest`.

    Raises:
        ValueError: unknown keyword arguments, unreadable content blocks, a bad tool_choice.
    """
    options = call_options(chat, stop, kwargs)
    conversation = to_engine_messages(messages, chat.content_options())
    turns = conversation.turns
    if chat.allow_url_fetch:
        turns = _fetch_urls(turns, FetchPolicy(allow_private_addresses=chat.allow_private_image_hosts))
    s = options.sampling
    request = ChatRequest(
        messages=tuple(turns),
        system=conversation.system,
        sampling=Sampling(max_tokens=s["max_tokens"] or chat.default_max_tokens(), temperature=s["temperature"],
                          top_p=s["top_p"], top_k=s["top_k"], repetition_penalty=s["repetition_penalty"],
                          presence_penalty=s["presence_penalty"], frequency_penalty=s["frequency_penalty"],
                          seed=s["seed"], stop=tuple(options.stop) if options.stop else None,
                          logprobs=bool(s["logprobs"]), top_logprobs=s["top_logprobs"] or 0),
        tools=options.tools,
        response_format=options.answer,
        max_tiles=s["max_tiles"],
    )
    loaded = get_engine(chat.engine_spec(options.model_name))
    return Composed(loaded, loaded.chat(chat.dialect), options.model_name, request)


def plan_call(chat: ChatNVLM, messages: Sequence[BaseMessage], stop: list[str] | None, kwargs: Mapping[str, Any]) -> CallPlan:
    """Builds the engine request for one call of `chat` (see the module docstring).

    Raises:
        ValueError: as `compose_call`.
        nvlm_engine.NVLMError: what the engine refuses (images, options, context length).
    """
    call = compose_call(chat, messages, kwargs, stop)
    prepared = call.service.prepare(call.request)
    return CallPlan(call.loaded, call.engine, call.model_name, prepared.request, parse_tools=prepared.parse_tools)


def _fetch_urls(messages: list[dict[str, Any]], policy: FetchPolicy) -> list[dict[str, Any]]:
    # URL fetching is a per-model choice, so the shared engine never fetches: allowed URLs are
    # read here with the engine's own size- and time-limited fetcher, and passed on as images.
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [
                {"type": "image", "image": load_image(p["image"], allow_url_fetch=True, fetch_policy=policy)}
                if p.get("type") == "image" and isinstance(p["image"], str) and p["image"][:8].lower().startswith(("http://", "https://"))
                else p
                for p in content
            ]
        out.append({**message, "content": content})
    return out
