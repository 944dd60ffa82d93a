"""One chat request, in engine terms: messages, sampling, tools, answer format.

`ChatRequest` is what both front ends (LangChain's ChatNVLM, the OpenAI-compatible server)
build from their own inputs; the rules they used to repeat live here once: tool_choice
spellings (`normalize_tool_choice`), the system turn (`compose_system`: the user's system
text or the dialect's default, then the tools block, then the answer-format sentence) and
the tile budget shared by a request's images (`tiles_per_image`). Knows nothing of LangChain
or HTTP.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nvlm_engine.prompts import DEFAULT_SYSTEM_PROMPT, QWEN_DEFAULT_SYSTEM_PROMPT
from nvlm_engine.tiling import share_tile_budget

from .tool_calls import ToolSpec, tools_system_text

__all__ = [
    "DIALECT_SYSTEM",
    "ChatRequest",
    "ResponseFormat",
    "Sampling",
    "ToolBinding",
    "compose_system",
    "image_count",
    "normalize_tool_choice",
    "tiles_per_image",
]

# The system text each dialect uses when the conversation has none: the model card's for the
# reference dialect, the Qwen2.5 chat template's (what vLLM sends) for vLLM's.
DIALECT_SYSTEM = {"reference": DEFAULT_SYSTEM_PROMPT, "vllm": QWEN_DEFAULT_SYSTEM_PROMPT}


@dataclass(frozen=True)
class ResponseFormat:
    """An answer-format request: JSON matching `schema`, or any JSON object (`schema` None)."""

    schema: dict[str, Any] | None

    @classmethod
    def parse(cls, value: Any) -> ResponseFormat | None:
        """Reads OpenAI's shapes: {"type": "json_object"} and {"type": "json_schema", "json_schema": {"schema": ...}};
        {"type": "text"} and None mean no format."""
        if value is None or isinstance(value, ResponseFormat):
            return value
        kind = value.get("type") if isinstance(value, Mapping) else None
        if kind == "text":
            return None
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

    @property
    def json_schema(self) -> dict[str, Any]:
        """The schema the grammar enforces (any object when none was given)."""
        return self.schema if self.schema is not None else {"type": "object"}

    def instruction(self, *, with_tools: bool = False) -> str:
        """The sentence added to the system turn (the grammar enforces it; this tells the model what to write)."""
        lead = "When you answer without calling a function, respond" if with_tools else "Respond"
        if self.schema is None:
            return f"{lead} with a JSON object only."
        return f"{lead} with JSON only, matching this JSON schema:\n" + json.dumps(self.schema, ensure_ascii=False)


@dataclass(frozen=True)
class ToolBinding:
    """Bound tools and how they may be used: choice is "auto", "none", "required" or a tool name.

    With "none" the tools stay in the prompt (OpenAI's meaning) and the grammar forbids a call.
    """

    tools: tuple[ToolSpec, ...] = ()
    choice: str = "auto"
    parallel: bool = True

    @property
    def active(self) -> bool:
        """Calls may be made (and the answer is parsed for them)."""
        return bool(self.tools) and self.choice != "none"

    @classmethod
    def build(cls, tools: Sequence[ToolSpec | Mapping[str, Any]] | None, choice: Any = None,
              parallel: bool | None = None, *, strict: bool = False) -> ToolBinding:
        """From OpenAI tool dicts (or `ToolSpec`s) and any tool_choice spelling.

        Args:
            strict: a tool_choice other than "none" without tools is an error (OpenAI's rule);
                otherwise it is ignored (LangChain binds choices and tools separately).

        Raises:
            ValueError: duplicate tool names, a tool_choice naming no tool, a choice without tools (strict).
        """
        specs = tuple(t if isinstance(t, ToolSpec) else ToolSpec.from_openai(t) for t in tools or ())
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be unique, got {names}")
        if not specs:
            if strict and choice not in (None, "none"):
                raise ValueError(f"tool_choice {choice!r} needs tools")
            return cls((), "none", True if parallel is None else bool(parallel))
        return cls(specs, normalize_tool_choice(choice, names), True if parallel is None else bool(parallel))


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


@dataclass(frozen=True)
class Sampling:
    """Decoding options of one request (None: the engine's default)."""

    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(frozen=True)
class ChatRequest:
    """One chat request in engine terms.

    Attributes:
        messages: engine-format messages (`NVLMEngine.prepare`'s), without the system turn.
        system: the conversation's system text (None: the dialect's default, written only
            when tools or an answer format need a system turn).
        sampling: decoding options.
        tools: the bound tools, tool_choice and parallel_tool_calls.
        response_format: JSON answer format, if any.
        max_tiles: the tile budget shared by the request's images (None: the engine's rule).
        continue_final: continue the final assistant message instead of answering in a new
            turn (None: the engine's rule, which continues when the last message is the
            assistant's; see `NVLMEngine.prepare`).
    """

    messages: tuple[Mapping[str, Any], ...]
    system: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    tools: ToolBinding = field(default_factory=ToolBinding)
    response_format: ResponseFormat | None = None
    max_tiles: int | None = None
    continue_final: bool | None = None

    def engine_messages(self, dialect: str) -> list[dict[str, Any]]:
        """The messages with the system turn written (see `compose_system`)."""
        system = compose_system(self.system, dialect, self.tools, self.response_format)
        rest = [dict(m) for m in self.messages]
        return rest if system is None else [{"role": "system", "content": system}, *rest]


def compose_system(system: str | None, dialect: str, tools: ToolBinding, answer: ResponseFormat | None) -> str | None:
    """The system turn: the user's text (or the dialect's default), the tools block, the answer format.

    Tools are shown whenever bound, tool_choice "none" included (the model sees them, the
    grammar forbids calling them). Without tools or format the user's text is kept as is.
    """
    if not tools.tools and answer is None:
        return system
    text = DIALECT_SYSTEM[dialect] if system is None else system
    if tools.tools:
        text = tools_system_text(text, tools.tools)
    if answer is not None:
        text = f"{text}\n\n{answer.instruction(with_tools=tools.active)}"
    return text


def image_count(messages: Sequence[Mapping[str, Any]]) -> int:
    return sum(1 for m in messages if isinstance(m.get("content"), list)
               for p in m["content"] if isinstance(p, Mapping) and p.get("type") == "image")


def tiles_per_image(budget: int | None, images: int) -> int | None:
    """The request's tile budget shared by its images (6 // n, as Megatron's evaluation did);
    None (no budget or no image): the engine's own rule."""
    if not budget or not images:
        return None
    return share_tile_budget(budget, images)
