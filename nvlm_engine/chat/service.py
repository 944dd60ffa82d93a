"""The chat service: a `ChatRequest` in, a prepared engine request out; engine deltas in, chat events out.

One `ChatService` per engine (`ChatService(engine)`; views of the same weights share one
grammar compiler, see `grammars_for`). `prepare()` picks the grammar (a forced or required
call, calls-or-JSON, a JSON schema, no call at all for tool_choice "none"), writes the system
turn and has the engine read images and tokenize; everything wrong with a request fails
there, before any model compute. `EventReader` turns the engine's `Delta`s into typed events
(`events.py`), the one place where answer text becomes tool calls.

Compiling a grammar can take seconds: servers call `prepare` off their event loop.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .events import (
    ChatEvent,
    Finished,
    TextDelta,
    ToolCallArgumentsDelta,
    ToolCallDone,
    finish_reason,
)
from .request import ChatRequest, image_count, tiles_per_image
from .tool_calls import ToolCallParser

if TYPE_CHECKING:
    from nvlm_engine import NVLMEngine
    from nvlm_engine.generation import Delta, GenerationResult, PreparedRequest
    from nvlm_engine.sampling import TokenConstraint

    from .grammar import Grammars

__all__ = ["ChatService", "EventReader", "PreparedChat", "grammars_for"]

DEFAULT_MAX_TOKENS = 1024

_grammars_lock = threading.Lock()
_grammars: weakref.WeakKeyDictionary[Any, Grammars] = weakref.WeakKeyDictionary()


def grammars_for(engine: NVLMEngine) -> Grammars:
    """The xgrammar compiler of the engine's tokenizer, built once (about a second for 152k tokens).

    Keyed by the tokenizer, so every dialect view of the same weights shares it (and its cache).
    """
    from .grammar import Grammars  # xgrammar loads only when a grammar is needed

    with _grammars_lock:
        grammars = _grammars.get(engine.tokenizer)
        if grammars is None:
            grammars = Grammars(engine.tokenizer, engine.config.llm.vocab_size, [engine.token_ids.end])
            _grammars[engine.tokenizer] = grammars
        return grammars


@dataclass(frozen=True)
class PreparedChat:
    """A prepared engine request and how to read its output."""

    request: PreparedRequest
    parse_tools: bool  # tools may be called: split `<tool_call>` blocks out of the text
    logprobs: bool = False

    def reader(self) -> EventReader:
        return EventReader(parse_tools=self.parse_tools, logprobs=self.logprobs)

    def events(self, deltas: Iterable[Delta]) -> Iterator[ChatEvent]:
        """All events of a finished stream of deltas (a failed request's error is raised)."""
        reader = self.reader()
        for delta in deltas:
            yield from reader.feed(delta)


class ChatService:
    """Prepares `ChatRequest`s on one engine (see the module docstring)."""

    def __init__(self, engine: NVLMEngine) -> None:
        self.engine = engine

    @property
    def dialect(self) -> str:
        return self.engine.prompts.dialect.value

    @property
    def grammars(self) -> Grammars:
        return grammars_for(self.engine)

    def messages(self, request: ChatRequest) -> list[dict[str, Any]]:
        """The engine messages, system turn written."""
        return request.engine_messages(self.dialect)

    def max_tiles(self, request: ChatRequest) -> int | None:
        return tiles_per_image(request.max_tiles, image_count(request.messages))

    def count_tokens(self, request: ChatRequest) -> int:
        """Prompt tokens, image tokens and the tools block included."""
        return self.engine.count_tokens(self.messages(request), max_tiles=self.max_tiles(request))

    def constraint(self, request: ChatRequest, *, timeout_s: float | None = None) -> TokenConstraint | None:
        """The grammar the answer must follow, compiled (or from the cache), or None for free text.

        Raises:
            GrammarTooComplexError, GrammarBusyError, ValueError: see `Grammars`.
        """
        tools, answer = request.tools, request.response_format
        if not tools.tools and answer is None:
            return None
        grammars = self.grammars
        if tools.tools and tools.choice == "none":
            if answer is not None:
                return grammars.constraint(grammars.json_schema(answer.json_schema, timeout_s=timeout_s))
            return grammars.no_calls()
        if not tools.tools:
            assert answer is not None
            return grammars.constraint(grammars.json_schema(answer.json_schema, timeout_s=timeout_s))
        if tools.choice in ("auto", "required"):
            schema = answer.json_schema if answer is not None and tools.choice == "auto" else None
            compiled = grammars.tool_calls(tools.tools, tools.choice, parallel=tools.parallel,  # type: ignore[arg-type]
                                           answer_schema=schema, timeout_s=timeout_s)
        else:
            (tool,) = [t for t in tools.tools if t.name == tools.choice]
            compiled = grammars.tool_calls([tool], "forced", timeout_s=timeout_s)
        return grammars.constraint(compiled)

    def prepare(self, request: ChatRequest, *, grammar_timeout_s: float | None = None) -> PreparedChat:
        """The engine request and its reader.

        Raises:
            GrammarTooComplexError, GrammarBusyError, ValueError: the grammar (see `constraint`).
            nvlm_engine.NVLMError: what the engine refuses (images, options, context length).
        """
        constraint = self.constraint(request, timeout_s=grammar_timeout_s)
        s = request.sampling
        extra: dict[str, Any] = {}
        # Passed only when set, so a request without them prepares exactly as before.
        if s.presence_penalty:
            extra["presence_penalty"] = s.presence_penalty
        if s.frequency_penalty:
            extra["frequency_penalty"] = s.frequency_penalty
        if s.logprobs:
            extra.update(logprobs=True, top_logprobs=s.top_logprobs)
        if request.continue_final is not None:
            extra["continue_final_message"] = request.continue_final
        prepared = self.engine.prepare(
            self.messages(request),
            max_new_tokens=s.max_tokens or min(DEFAULT_MAX_TOKENS, self.engine.context_length // 4),
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            repetition_penalty=s.repetition_penalty,
            seed=s.seed,
            stop=list(s.stop) if s.stop else None,
            max_tiles=self.max_tiles(request),
            constraint=constraint,
            **extra,
        )
        return PreparedChat(prepared, parse_tools=request.tools.active, logprobs=s.logprobs)


class EventReader:
    """One request's engine deltas -> chat events, in order, ending with `Finished`.

    Args:
        parse_tools: split `<tool_call>` blocks out of the text (tools may be called).
        logprobs: attach each delta's token logprobs to its `TextDelta`, and all to `Finished`.
    """

    def __init__(self, *, parse_tools: bool, logprobs: bool = False) -> None:
        self._parser = ToolCallParser() if parse_tools else None
        self._logprobs = logprobs
        self._valid_calls = 0

    def feed(self, delta: Delta) -> list[ChatEvent]:
        """The events of one delta; the last delta (its `result` set) adds the held-back ones and
        `Finished`. A failed request's error is raised."""
        if delta.error is not None:
            raise delta.error
        logprobs = tuple(getattr(delta, "logprobs", None) or ()) if self._logprobs else ()
        events = self.text(delta.text, logprobs)
        if delta.result is not None:
            events += self.finish(delta.result)
        return events

    def text(self, text: str, logprobs: tuple[Any, ...] = ()) -> list[ChatEvent]:
        """The events of answer text (a remote client feeds wire text here)."""
        if self._parser is None:
            return [TextDelta(text, logprobs)] if text or logprobs else []
        events = self._expand(self._parser.feed(text))
        if logprobs:  # on the delta's text; tokens inside a call have none: an empty one carries them
            texts = [i for i, e in enumerate(events) if isinstance(e, TextDelta)]
            if texts:
                events[texts[-1]] = TextDelta(events[texts[-1]].text, logprobs)  # type: ignore[union-attr]
            else:
                events.append(TextDelta("", logprobs))
        return events

    def finish(self, result: GenerationResult | None, engine_reason: str | None = None) -> list[ChatEvent]:
        """Held-back text, an unclosed call, then `Finished`."""
        events = self._expand(self._parser.finish()) if self._parser is not None else []
        reason = result.finish_reason if result is not None else (engine_reason or "stop")
        logprobs = getattr(result, "logprobs", None) if self._logprobs else None
        events.append(Finished(finish_reason(reason, self._valid_calls), None if result is None else result.usage,
                               logprobs, result))
        return events

    def _expand(self, events: list[Any]) -> list[ChatEvent]:
        out: list[ChatEvent] = []
        for event in events:
            if isinstance(event, ToolCallDone):
                self._valid_calls += event.valid
                if event.name:
                    text = event.arguments if isinstance(event.arguments, str) else _dumps(event.arguments)
                    out.append(ToolCallArgumentsDelta(event.index, text))
            out.append(event)
        return out


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
