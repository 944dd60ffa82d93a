"""Grammar-constrained decoding with xgrammar, behind nvlm_engine's `TokenConstraint` hook.

This module knows how to compile "the answer is a `<tool_call>` of one of these tools" and
"the answer is JSON matching this schema" into an xgrammar grammar for the checkpoint's
tokenizer, how to drive a matcher one token at a time, and how to forbid calls altogether
(`tool_choice="none"`: `NoToolCalls` masks the `<tool_call>` token). It knows nothing of
LangChain, HTTP or the model: the engine asks `allowed()` before each token and calls `accept()`
after it (see `nvlm_engine.sampling.TokenConstraint`).

Why xgrammar (llguidance 1.9 works here too): its structural tags express the Qwen2.5 / Hermes
tool-call layout directly (`<tool_call>\\n{"name": ..., "arguments": <schema>}\\n</tool_call>`,
optionally triggered inside free text), the same construct vLLM, SGLang and TensorRT-LLM use
for Qwen tool calling; and its C++ matcher fills a 152k-token mask in ~5 us on this CPU
(llguidance: ~50 us), with masks applied on whatever device holds the logits.

What a schema may cost, and the compile budget and cache, are `grammar_budget.py`'s business.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
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

from .grammar_budget import (
    BudgetedCompiler,
    GrammarBusyError,
    GrammarError,
    GrammarLimits,
    GrammarStats,
    GrammarTooComplexError,
    check_schemas,
    compiling,
)
from .tool_calls import TOOL_CALL_END, TOOL_CALL_START, ToolSpec

__all__ = [
    "GrammarBusyError",
    "GrammarConstraint",
    "GrammarError",
    "GrammarLimits",
    "GrammarStats",
    "GrammarTooComplexError",
    "Grammars",
    "NoToolCalls",
    "ToolChoiceMode",
    "check_schemas",
]

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
        limits: the static bounds, time budget, workers and cache size (see `GrammarLimits`).

    Every method that compiles takes `timeout_s` (default `limits.timeout_s`) and raises
    `GrammarTooComplexError` (past a bound or the budget) or `GrammarBusyError` (no free worker),
    both ValueErrors, like a schema xgrammar cannot express. `stats` counts compiles and cache hits.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int],
                 limits: GrammarLimits | None = None) -> None:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
        self.vocab_size = vocab_size
        self.limits = limits or GrammarLimits()
        self._tokenizer = tokenizer
        self._added = frozenset(int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}))
        # xgrammar's own cache is unbounded: `BudgetedCompiler` keeps a bounded one instead. Compiles
        # run concurrently on its workers (xgrammar's compiler is thread-safe, as vLLM and SGLang use it).
        self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self._budget = BudgetedCompiler(self.limits)

    @property
    def stats(self) -> GrammarStats:
        """Live counters: compiles started, cache hits, refusals, busy answers."""
        return self._budget.stats

    def constraint(self, compiled: xgr.CompiledGrammar) -> GrammarConstraint:
        return GrammarConstraint(compiled, self.vocab_size, self._encode, self._added)

    def _encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def json_schema(self, schema: dict[str, Any], *, timeout_s: float | None = None) -> xgr.CompiledGrammar:
        """JSON matching `schema`, compact (`", "` and `": "` separators, no other whitespace).

        Raises:
            GrammarTooComplexError, GrammarBusyError: see the class.
            ValueError: xgrammar cannot compile the schema.
        """
        what = "the response format's JSON schema"
        self._check([(what, schema)])
        # Canonical JSON as the cache key, keys in their given order: xgrammar writes properties
        # in schema order, so two orders are two grammars.
        source = json.dumps(schema)
        return self._compile(f"json\0{source}", what,
                             lambda: self._compiler.compile_json_schema(source, any_whitespace=False), timeout_s)

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
        timeout_s: float | None = None,
    ) -> xgr.CompiledGrammar:
        """The Qwen2.5 / Hermes tool-call layout for `tools`.

        Args:
            tools: the tools that may be called (for "forced", the one tool).
            mode: "auto": free text in which every `<tool_call>` the model opens must be a
                valid call; "required": only calls, at least one; "forced": exactly one call.
            parallel: allow several calls ("auto" and "required").
            answer_schema: with "auto", the answer is either calls or JSON matching this
                schema (a response format bound together with tools, as agents do).
            timeout_s: the compile budget (default `limits.timeout_s`).
        """
        if not tools:
            raise ValueError("a tool-call grammar needs at least one tool")
        schemas = [(f"tool {tool.name!r}'s parameters", tool.parameters) for tool in tools]
        if mode == "auto" and answer_schema is not None:
            schemas.append(("the response format's JSON schema", answer_schema))
        self._check(schemas)
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
        return self._structural(fmt, "the tools' argument schemas", timeout_s)

    def _structural(self, fmt: Any, what: str, timeout_s: float | None = None) -> xgr.CompiledGrammar:
        source = StructuralTag(format=fmt).model_dump_json()
        return self._compile(f"tag\0{source}", what, lambda: self._compiler.compile_structural_tag(source), timeout_s)

    def _check(self, schemas: list[tuple[str, Any]]) -> None:
        try:
            check_schemas(schemas, self.limits)
        except GrammarTooComplexError:
            self._budget.count_refusal()
            raise

    def _compile(self, key: str, what: str, build: Callable[[], xgr.CompiledGrammar],
                 timeout_s: float | None) -> xgr.CompiledGrammar:
        def run() -> xgr.CompiledGrammar:
            with compiling(what):
                return build()

        return self._budget.compile(key, what, run, timeout_s)

    def free_text(self) -> xgr.CompiledGrammar:
        """Any text (the identity constraint: tests and benchmarks measure its overhead)."""
        return self._structural(AnyTextFormat(), "free text")


    def no_calls(self) -> NoToolCalls:
        """Free text that never opens a `<tool_call>` (tool_choice "none": tools shown, none called)."""
        ids = self._encode(TOOL_CALL_START)
        return NoToolCalls(self.vocab_size, ids[0] if len(ids) == 1 else None)


class NoToolCalls:
    """Any text but a call: masks the `<tool_call>` added token (151657 in NVLM-D's tokenizer).

    The model writes calls with that one token (Qwen2.5 was trained so); the parser is not run
    for tool_choice "none", so a spelled-out tag would be plain text anyway.
    """

    def __init__(self, vocab_size: int, call_token: int | None) -> None:
        self._mask = torch.ones(vocab_size, dtype=torch.bool)
        if call_token is not None:
            self._mask[call_token] = False

    def allowed(self) -> torch.Tensor | None:
        return self._mask

    def accept(self, token_id: int) -> None:
        pass

    @property
    def done(self) -> bool:
        return False


def _call_tag(tool: ToolSpec) -> TagFormat:
    # The name is part of the fixed prefix, so the model can only name a bound tool, and the
    # arguments follow that tool's schema. The layout is the one Qwen2.5's chat template writes.
    begin = f'{TOOL_CALL_START}\n{{"name": {json.dumps(tool.name, ensure_ascii=False)}, "arguments": '
    return TagFormat(begin=begin, content=_json(tool.parameters), end=f"}}\n{TOOL_CALL_END}")


def _json(schema: dict[str, Any]) -> JSONSchemaFormat:
    return JSONSchemaFormat(json_schema=schema, max_whitespace_cnt=_MAX_WHITESPACE)
