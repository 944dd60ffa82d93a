"""Chat events -> OpenAI chat-completion output, whole or streamed: the one translator.

`nvlm_engine.chat` turns the engine's deltas into typed events; `OpenAIOutput` turns those
into OpenAI `delta`s (content, tool_calls with OpenAI's own indices, logprobs), and a whole
answer's message is the merge of the same deltas, so streamed and whole answers agree.
A call whose name is known but whose JSON is broken (cut off, say) stays a tool call with its
raw text as arguments, so clients see an invalid call; a nameless broken one is text.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from nvlm_engine.chat import (
    ChatEvent,
    Finished,
    TextDelta,
    ToolCallArgumentsDelta,
    ToolCallDone,
    ToolCallStarted,
)
from nvlm_engine.chat.logprobs import logprob_entry

__all__ = ["OpenAIOutput", "openai_finish_reason"]

Delta = dict[str, Any]


class OpenAIOutput:
    """One answer's events -> OpenAI deltas and logprobs entries.

    Args:
        tokenizer: the engine's tokenizer (for logprobs' `token` and exact `bytes`).
        logprobs: the request asked for logprobs.
    """

    def __init__(self, tokenizer: Any, *, logprobs: bool = False) -> None:
        self._tokenizer = tokenizer
        self._logprobs = logprobs
        self._slots: dict[int, int] = {}  # chat-layer call index -> OpenAI tool_calls index
        self._announced: set[int] = set()
        self._held: dict[int, str] = {}
        self.finished: Finished | None = None
        self._content: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}
        self._all_logprobs: list[dict[str, Any]] = []

    def push(self, events: Iterable[ChatEvent]) -> list[tuple[Delta, list[dict[str, Any]] | None]]:
        """(delta, logprobs entries or None) pairs for a stream's chunks; also kept for `message()`."""
        out: list[tuple[Delta, list[dict[str, Any]] | None]] = []
        for event in events:
            if isinstance(event, TextDelta):
                entries = [self._entry(lp) for lp in event.logprobs] if self._logprobs else None
                if event.text or entries:
                    out.append(({"content": event.text} if event.text else {}, entries))
            elif isinstance(event, ToolCallStarted):
                self._announced.add(event.index)
                out.append((self._call(event.index, id=event.id, name=event.name, arguments=""), None))
            elif isinstance(event, ToolCallArgumentsDelta):
                if event.index in self._announced:
                    out.append((self._call(event.index, arguments=event.text), None))
                else:
                    self._held[event.index] = self._held.get(event.index, "") + event.text
            elif isinstance(event, ToolCallDone) and event.name and event.index not in self._announced:
                arguments = self._held.pop(event.index, "")
                out.append((self._call(event.index, id=event.id, name=event.name, arguments=arguments), None))
            elif isinstance(event, ToolCallDone) and not event.name:
                out.append(({"content": event.raw}, None))  # a nameless broken call stays visible as text
            elif isinstance(event, Finished):
                self.finished = event
        for delta, entries in out:
            self._keep(delta, entries)
        return [(d, e if self._logprobs else None) for d, e in out]

    @property
    def finish_reason(self) -> str:
        assert self.finished is not None
        return openai_finish_reason(self.finished.finish_reason, bool(self._calls))

    def message(self) -> dict[str, Any]:
        """The whole assistant message: the merge of every delta pushed."""
        content = "".join(self._content)
        if not self._calls:
            return {"role": "assistant", "content": content}
        return {"role": "assistant", "content": content.strip() or None,
                "tool_calls": [self._calls[i] for i in sorted(self._calls)]}

    @property
    def logprobs(self) -> list[dict[str, Any]] | None:
        """Every generated token's logprobs entry (None unless asked)."""
        return self._all_logprobs if self._logprobs else None

    def _call(self, index: int, *, arguments: str, id: str | None = None, name: str | None = None) -> Delta:
        slot = self._slots.setdefault(index, len(self._slots))
        call: dict[str, Any] = {"index": slot, "function": {"arguments": arguments}}
        if id is not None:
            call.update(id=id, type="function", function={"name": name, "arguments": arguments})
        return {"tool_calls": [call]}

    def _keep(self, delta: Delta, entries: list[dict[str, Any]] | None) -> None:
        self._content.append(delta.get("content") or "")
        for call in delta.get("tool_calls", []):
            kept = self._calls.setdefault(call["index"], {"id": None, "type": "function",
                                                          "function": {"name": None, "arguments": ""}})
            if "id" in call:
                kept["id"] = call["id"]
                kept["function"]["name"] = call["function"]["name"]
            kept["function"]["arguments"] += call["function"]["arguments"]
        if entries:
            self._all_logprobs.extend(entries)

    def _entry(self, lp: Any) -> dict[str, Any]:
        return logprob_entry(self._tokenizer, lp)


def openai_finish_reason(reason: str, calls: bool) -> str:
    # An answer with calls (a cut-off one too, which clients see as invalid) ends "tool_calls", so
    # clients look at them; OpenAI has no "cancelled": a cancelled request ended early like a length cut.
    if calls:
        return "tool_calls"
    return {"stop": "stop", "length": "length", "tool_calls": "tool_calls"}.get(reason, "length")
