"""Grammar-constrained decoding with xgrammar, behind nvlm_engine's `TokenConstraint` hook.

This module knows how to compile "the answer is a `<tool_call>` of one of these tools" and
"the answer is JSON matching this schema" into an xgrammar grammar for the checkpoint's
tokenizer, and how to drive a matcher one token at a time. It knows nothing of LangChain
messages or of the model: the engine asks `allowed()` before each token and calls `accept()`
after it (see `nvlm_engine.sampling.TokenConstraint`).

Why xgrammar (llguidance 1.9 works here too): its structural tags express the Qwen2.5 / Hermes
tool-call layout directly (`<tool_call>\\n{"name": ..., "arguments": <schema>}\\n</tool_call>`,
optionally triggered inside free text), the same construct vLLM, SGLang and TensorRT-LLM use
for Qwen tool calling; and its C++ matcher fills a 152k-token mask in ~5 us on this CPU
(llguidance: ~50 us), with masks applied on whatever device holds the logits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
import xgrammar as xgr
from xgrammar.structural_tag import (
    AnyTextFormat,
    JSONSchemaFormat,
    OrFormat,
    StructuralTag,
    TagFormat,
    TagsWithSeparatorFormat,
    TriggeredTagsFormat,
)

from .tool_calls import TOOL_CALL_END, TOOL_CALL_START, ToolSpec

__all__ = ["GrammarConstraint", "Grammars", "ToolChoiceMode"]

logger = logging.getLogger(__name__)

ToolChoiceMode = Literal["auto", "required", "forced"]

# Whitespace runs inside tool-call JSON: enough for `{"a": 1, "b": 2}` (Qwen2.5's template writes
# `tojson` output), and a bound so that a weak model cannot loop on spaces inside a valid call.
_MAX_WHITESPACE = 1
_SHIFTS = torch.arange(32, dtype=torch.int32)


class GrammarConstraint:
    """One request's grammar state: the engine's `TokenConstraint` over an xgrammar matcher.

    Where the grammar fixes the next characters (a tool call's `<tool_call>\\n{"name": "...",
    "arguments": ` prefix, a required key), only the first token of their canonical
    tokenization is allowed, when that token cannot merge with text still to be chosen: the
    model then writes fixed text the way its tokenizer does, one token per piece, instead of
    any spelling the grammar would accept (`<t` `ool` `_ca` ...), which costs tokens and is
    text the model never saw in training.

    A token the grammar rejects (the mask makes that impossible, short of an engine bug) is
    logged and lifts the constraint for the rest of the request instead of failing the batch
    the request shares with others; the output parser then reports whatever came out.
    """

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int, encode: Callable[[str], list[int]],
                 unmergeable: frozenset[int] = frozenset()) -> None:
        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # [1, ceil(V / 32)] int32
        self._vocab_size = vocab_size
        self._encode = encode
        self._unmergeable = unmergeable  # added tokens (<tool_call>, </tool_call>): never merged with neighbours
        self._broken = False
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (bitmask, bool mask) of the last step

    def allowed(self) -> torch.Tensor | None:
        if self._broken or not self._matcher.fill_next_token_bitmask(self._bitmask):
            return None  # every token is allowed: the engine skips masking
        forced = self._matcher.find_jump_forward_string()
        if forced:
            ids = self._encode(forced)
            # The first token is final if more of `forced` follows it, or if it is an added token.
            if (len(ids) > 1 or ids[0] in self._unmergeable) and self._bit(ids[0]):
                mask = torch.zeros(self._vocab_size, dtype=torch.bool)
                mask[ids[0]] = True
                return mask
        if self._last is not None and torch.equal(self._last[0], self._bitmask):
            return self._last[1]  # free text keeps the same mask step after step: unpack it once
        bits = (self._bitmask[0].unsqueeze(-1) >> _SHIFTS) & 1  # [ceil(V / 32), 32], bit i of word w = id 32w+i
        mask = bits.flatten()[: self._vocab_size].bool()
        self._last = (self._bitmask.clone(), mask)
        return mask

    def accept(self, token_id: int) -> None:
        if not self._broken and not self._matcher.accept_token(token_id):
            logger.warning("the grammar rejected token %d; decoding continues unconstrained", token_id)
            self._broken = True

    @property
    def done(self) -> bool:
        # The engine never feeds the end token to `accept`, so a finished grammar shows up as
        # a mask that allows only `<|im_end|>`, which the engine then picks and stops on.
        return self._matcher.is_terminated()

    def _bit(self, token_id: int) -> bool:
        return bool((int(self._bitmask[0, token_id // 32]) >> (token_id % 32)) & 1)


class Grammars:
    """Compiles grammars for one tokenizer; shared by every request on an engine.

    Args:
        tokenizer: the checkpoint's Hugging Face tokenizer.
        vocab_size: rows of the model's LM head (152,064 for NVLM-D: padded past the tokenizer).
        stop_token_ids: ids that end the answer (`<|im_end|>`); the grammar allows them once complete.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
        self.vocab_size = vocab_size
        self._tokenizer = tokenizer
        self._added = frozenset(int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}))
        self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=True)
        self._lock = threading.Lock()  # compile one grammar at a time; matchers are per request

    def constraint(self, compiled: xgr.CompiledGrammar) -> GrammarConstraint:
        return GrammarConstraint(compiled, self.vocab_size, self._encode, self._added)

    def _encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def json_schema(self, schema: dict[str, Any]) -> xgr.CompiledGrammar:
        """JSON matching `schema`, compact (`", "` and `": "` separators, no other whitespace).

        Raises:
            ValueError: xgrammar cannot compile the schema.
        """
        with self._lock, _compiling("the response format's JSON schema"):
            return self._compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def json_object(self) -> xgr.CompiledGrammar:
        """Any JSON object, compact."""
        return self.json_schema({"type": "object"})

    def tool_calls(
        self,
        tools: Sequence[ToolSpec],
        mode: ToolChoiceMode,
        *,
        parallel: bool = True,
        answer_schema: dict[str, Any] | None = None,
    ) -> xgr.CompiledGrammar:
        """The Qwen2.5 / Hermes tool-call layout for `tools`.

        Args:
            tools: the tools that may be called (for "forced", the one tool).
            mode: "auto": free text in which every `<tool_call>` the model opens must be a
                valid call; "required": only calls, at least one; "forced": exactly one call.
            parallel: allow several calls ("auto" and "required").
            answer_schema: with "auto", the answer is either calls or JSON matching this
                schema (a response format bound together with tools, as agents do).
        """
        if not tools:
            raise ValueError("a tool-call grammar needs at least one tool")
        tags = [_call_tag(tool) for tool in tools]
        # Calls are separated by one newline, as Qwen2.5 writes them, with no text around them.
        calls_only = TagsWithSeparatorFormat(tags=tags, separator="\n", at_least_one=True, stop_after_first=not parallel)
        if mode == "auto" and answer_schema is not None:
            fmt: Any = OrFormat(elements=[calls_only, _json(answer_schema)])
        elif mode == "auto":
            fmt = TriggeredTagsFormat(triggers=[TOOL_CALL_START], tags=tags, stop_after_first=not parallel)
        elif mode == "required":
            fmt = calls_only
        elif mode == "forced":
            fmt = tags[0]
        else:
            raise ValueError(f"unknown tool-call grammar mode {mode!r}")
        return self._structural(fmt)

    def _structural(self, fmt: Any) -> xgr.CompiledGrammar:
        with self._lock, _compiling("the tools' argument schemas"):
            return self._compiler.compile_structural_tag(StructuralTag(format=fmt).model_dump_json())

    def free_text(self) -> xgr.CompiledGrammar:
        """Any text (the identity constraint: tests and benchmarks measure its overhead)."""
        return self._structural(AnyTextFormat())


@contextlib.contextmanager
def _compiling(what: str) -> Iterator[None]:
    try:
        yield
    except (RuntimeError, ValueError) as e:  # xgrammar's errors on schemas it cannot express
        raise ValueError(f"cannot constrain decoding to {what}: {e}") from e


def _call_tag(tool: ToolSpec) -> TagFormat:
    # The name is part of the fixed prefix, so the model can only name a bound tool, and the
    # arguments follow that tool's schema. The layout is the one Qwen2.5's chat template writes.
    begin = f'{TOOL_CALL_START}\n{{"name": {json.dumps(tool.name, ensure_ascii=False)}, "arguments": '
    return TagFormat(begin=begin, content=_json(tool.parameters), end=f"}}\n{TOOL_CALL_END}")


def _json(schema: dict[str, Any]) -> JSONSchemaFormat:
    return JSONSchemaFormat(json_schema=schema, max_whitespace_cnt=_MAX_WHITESPACE)
