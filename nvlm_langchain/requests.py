"""One LangChain call -> one prepared engine request.

`plan_call` merges the chat model's fields with the call's keyword arguments, converts the
messages, writes the system turn (the user's system text or the dialect's default, then the
tools block and any answer-format instruction), picks the grammar (a forced or required tool
call, calls-or-JSON for agents, a JSON schema, a JSON object), and has the engine read the
images and tokenize the prompt. Everything that can be wrong with a request fails here,
before any model compute.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from langchain_core.messages import BaseMessage

from nvlm_engine import NVLMEngine, PreparedRequest, load_image
from nvlm_engine.fetch import FetchPolicy
from nvlm_engine.prompts import DEFAULT_SYSTEM_PROMPT

from .engines import LoadedEngine, get_engine
from .messages import to_engine_messages
from .tool_calls import ToolSpec, tools_system_text

if TYPE_CHECKING:
    from nvlm_engine.sampling import TokenConstraint

    from .chat_models import ChatNVLM

__all__ = ["CallPlan", "Composed", "ResponseFormat", "ToolBinding", "compose_call", "normalize_tool_choice", "plan_call"]

# The system text each dialect uses when the conversation has none: the model card's for the
# reference dialect, the Qwen2.5 chat template's for vLLM's.
DIALECT_SYSTEM = {"reference": DEFAULT_SYSTEM_PROMPT, "vllm": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."}

SAMPLING_OPTIONS = ("temperature", "top_p", "top_k", "max_tokens", "seed", "repetition_penalty", "max_tiles")
CALL_OPTIONS = (*SAMPLING_OPTIONS, "model", "tools", "tool_choice", "parallel_tool_calls", "response_format")
# Passed along by LangChain itself, or meaningless for a local model with a grammar (`strict`).
IGNORED_OPTIONS = ("stream", "ls_structured_output_format", "structured_output_format", "strict")


@dataclass(frozen=True)
class ResponseFormat:
    """An answer-format request: JSON matching `schema`, or any JSON object (`schema` None)."""

    schema: dict[str, Any] | None

    @classmethod
    def parse(cls, value: Any) -> ResponseFormat | None:
        """Reads OpenAI's shapes: {"type": "json_object"} and {"type": "json_schema", "json_schema": {"schema": ...}}."""
        if value is None or isinstance(value, ResponseFormat):
            return value
        kind = value.get("type") if isinstance(value, Mapping) else None
        if kind == "json_object":
            return cls(schema=None)
        if kind == "json_schema":
            inner = value.get("json_schema") or {}
            schema = inner.get("schema") if isinstance(inner, Mapping) else None
            schema = schema if schema is not None else value.get("schema")
            if isinstance(schema, Mapping):
                return cls(schema=dict(schema))
        raise ValueError(
            f"response_format {value!r:.120} is not understood; use {{'type': 'json_object'}} or "
            "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}"
        )

    def instruction(self, *, with_tools: bool = False) -> str:
        """The sentence added to the system turn (the grammar enforces it; this tells the model what to write)."""
        lead = "When you answer without calling a function, respond" if with_tools else "Respond"
        if self.schema is None:
            return f"{lead} with a JSON object only."
        return f"{lead} with JSON only, matching this JSON schema:\n" + json.dumps(self.schema, ensure_ascii=False)


@dataclass(frozen=True)
class ToolBinding:
    """Bound tools and how they may be used: choice is "auto", "none", "required" or a tool name."""

    tools: tuple[ToolSpec, ...]
    choice: str = "auto"
    parallel: bool = True

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"


def normalize_tool_choice(choice: Any, names: Sequence[str]) -> str:
    """LangChain / OpenAI / Anthropic tool_choice spellings -> "auto", "none", "required" or a name."""
    if choice is None or choice == "auto" or choice is False:
        return "auto"
    if choice in ("any", "required") or choice is True:
        return "required"
    if choice == "none":
        return "none"
    if isinstance(choice, Mapping):
        kind = choice.get("type")
        if kind in ("any", "required", "auto", "none"):
            return normalize_tool_choice(kind, names)
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else choice.get("name")
    else:
        name = choice
    if isinstance(name, str) and name in names:
        return name
    raise ValueError(f"tool_choice {choice!r} names no bound tool; bound: {list(names)} (or use 'auto', 'any', 'none')")


@dataclass
class Composed:
    """A call's engine, engine-form messages (system turn written) and resolved options."""

    loaded: LoadedEngine
    engine: NVLMEngine
    model_name: str
    messages: list[dict[str, Any]]
    tools: ToolBinding
    answer: ResponseFormat | None
    options: dict[str, Any]

    @property
    def max_tiles(self) -> int | None:
        """Tiles per image: the tile budget shared by the request's images (None: the engine's rule)."""
        budget, images = self.options["max_tiles"], _image_count(self.messages)
        return max(1, budget // images) if budget and images else None


@dataclass
class CallPlan:
    """A prepared request and what reading its answer needs."""

    loaded: LoadedEngine
    engine: NVLMEngine
    model_name: str
    request: PreparedRequest
    parse_tools: bool


def compose_call(chat: ChatNVLM, messages: Sequence[BaseMessage], kwargs: Mapping[str, Any]) -> Composed:
    """Resolves options and engine, converts the messages and writes the system turn.

    Raises:
        ValueError: unknown keyword arguments, unreadable content blocks, a bad tool_choice.
    """
    unknown = sorted(set(kwargs) - set(CALL_OPTIONS) - set(IGNORED_OPTIONS))
    if unknown:
        raise ValueError(f"ChatNVLM got unknown call option(s) {unknown}; known: {sorted(CALL_OPTIONS)}")
    options = {name: kwargs.get(name, getattr(chat, name)) for name in SAMPLING_OPTIONS}
    model_name = str(kwargs.get("model") or chat.model)
    tools = _tool_binding(kwargs)
    answer = ResponseFormat.parse(kwargs.get("response_format"))
    conversation = to_engine_messages(messages, chat.content_options())
    loaded = get_engine(chat.engine_spec(model_name))

    # The user's system text (or the dialect's default), the tools block, the answer format.
    system = conversation.system
    if tools.active or answer is not None:
        system = DIALECT_SYSTEM[chat.dialect] if system is None else system
        if tools.active:
            system = tools_system_text(system, tools.tools)
        if answer is not None:
            system = f"{system}\n\n{answer.instruction(with_tools=tools.active)}"
    engine_messages = conversation.messages(system)
    if chat.allow_url_fetch:
        engine_messages = _fetch_urls(engine_messages, FetchPolicy(allow_private_addresses=chat.allow_private_image_hosts))
    return Composed(loaded, loaded.engine(chat.dialect), model_name, engine_messages, tools, answer, options)


def plan_call(chat: ChatNVLM, messages: Sequence[BaseMessage], stop: list[str] | None, kwargs: Mapping[str, Any]) -> CallPlan:
    """Builds the engine request for one call of `chat` (see the module docstring).

    Raises:
        ValueError: as `compose_call`.
        nvlm_engine.NVLMError: what the engine refuses (images, options, context length).
    """
    call = compose_call(chat, messages, kwargs)
    options = call.options
    request = call.engine.prepare(
        call.messages,
        max_new_tokens=options["max_tokens"] or chat.default_max_tokens(),
        temperature=options["temperature"],
        top_p=options["top_p"],
        top_k=options["top_k"],
        repetition_penalty=options["repetition_penalty"],
        seed=options["seed"],
        stop=stop if stop is not None else chat.stop,
        max_tiles=call.max_tiles,
        constraint=_constraint(call.loaded, call.tools, call.answer),
    )
    return CallPlan(call.loaded, call.engine, call.model_name, request, parse_tools=call.tools.active)


def _tool_binding(kwargs: Mapping[str, Any]) -> ToolBinding:
    tools = tuple(t if isinstance(t, ToolSpec) else ToolSpec.from_openai(t) for t in kwargs.get("tools") or ())
    choice = normalize_tool_choice(kwargs.get("tool_choice"), [t.name for t in tools]) if tools else "none"
    parallel = kwargs.get("parallel_tool_calls")
    return ToolBinding(tools, choice, True if parallel is None else bool(parallel))


def _constraint(loaded: LoadedEngine, tools: ToolBinding, answer: ResponseFormat | None) -> TokenConstraint | None:
    if not tools.active and answer is None:
        return None
    grammars = loaded.grammars
    answer_schema = None if answer is None else (answer.schema if answer.schema is not None else {"type": "object"})
    if not tools.active:
        assert answer_schema is not None
        return grammars.constraint(grammars.json_schema(answer_schema))
    if tools.choice in ("auto", "required"):
        mode = "auto" if tools.choice == "auto" else "required"
        compiled = grammars.tool_calls(tools.tools, mode, parallel=tools.parallel, answer_schema=answer_schema)
    else:
        (tool,) = [t for t in tools.tools if t.name == tools.choice]
        compiled = grammars.tool_calls([tool], "forced")
    return grammars.constraint(compiled)


def _image_count(messages: list[dict[str, Any]]) -> int:
    return sum(
        1 for m in messages if isinstance(m["content"], list) for p in m["content"] if p.get("type") == "image"
    )


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
