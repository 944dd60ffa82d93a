"""The xgrammar constraints on the checkpoint's real tokenizer, driven token by token as the engine does."""

from __future__ import annotations

import logging
import threading
import time
import uuid

import pytest
import torch

from nvlm_engine.chat import ToolSpec
from nvlm_engine.chat.grammar import (
    GrammarBusyError,
    GrammarConstraint,
    GrammarLimits,
    Grammars,
    GrammarTooComplexError,
    check_schemas,
)
from nvlm_langchain.engines import get_engine

ADD = ToolSpec("add", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]})
NOW = ToolSpec("now", {"type": "object", "properties": {}})


@pytest.fixture(scope="module")
def grammars(chat) -> Grammars:
    return get_engine(chat.engine_spec()).grammars


@pytest.fixture(scope="module")
def tokenizer(chat):
    return chat.engine.tokenizer


def drive(constraint: GrammarConstraint, tokenizer, text: str) -> None:
    """Accept `text` token by token, checking each token was allowed."""
    for token in tokenizer.encode(text, add_special_tokens=False):
        mask = constraint.allowed()
        assert mask is None or mask[token], tokenizer.decode([token])
        constraint.accept(token)


def allowed_ids(constraint: GrammarConstraint) -> list[int]:
    mask = constraint.allowed()
    assert mask is not None
    return mask.nonzero().flatten().tolist()


def test_a_forced_call_starts_with_the_canonical_tokens_and_ends_with_im_end(grammars, tokenizer) -> None:
    constraint = grammars.constraint(grammars.tool_calls([ADD], "forced"))
    assert allowed_ids(constraint) == tokenizer.encode("<tool_call>", add_special_tokens=False)  # one added token
    drive(constraint, tokenizer, '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 22}}\n</tool_call>')
    assert [tokenizer.decode([i]) for i in allowed_ids(constraint)] == ["<|im_end|>"]


def test_required_calls_name_only_bound_tools_and_follow_their_schemas(grammars, tokenizer) -> None:
    constraint = grammars.constraint(grammars.tool_calls([ADD, NOW], "required"))
    drive(constraint, tokenizer, '<tool_call>\n{"name": "')
    names = {tokenizer.decode([i]) for i in allowed_ids(constraint)}
    assert names <= {"a", "ad", "add", "n", "no", "now"}, names
    drive(constraint, tokenizer, 'now", "arguments": ')
    drive(constraint, tokenizer, "{}}\n</tool_call>")  # a tool without parameters takes exactly {}
    follow = {tokenizer.decode([i]) for i in allowed_ids(constraint)}
    assert "<|im_end|>" in follow and "\n" in follow  # end, or another call


def free_text_allowed(mask: torch.Tensor, tokenizer) -> bool:
    """Every ordinary token is allowed (special tokens and the LM head's padding rows are not)."""
    ordinary = [tokenizer.encode(t, add_special_tokens=False)[0] for t in ("Hello", " world", "<tool_call>", "{")]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return bool(mask[ordinary].all() and mask[end] and not mask[len(tokenizer):].any())


def test_auto_mode_is_free_text_until_a_call_opens(grammars, tokenizer) -> None:
    constraint = grammars.constraint(grammars.tool_calls([ADD], "auto"))
    assert free_text_allowed(constraint.allowed(), tokenizer)
    drive(constraint, tokenizer, "I will add them.\n")
    assert free_text_allowed(constraint.allowed(), tokenizer)
    drive(constraint, tokenizer, "<tool_call>")
    drive(constraint, tokenizer, '\n{"name": "add", "arguments": {"a": ')
    digits = {tokenizer.decode([i]) for i in allowed_ids(constraint)}
    assert digits and all(d.strip().lstrip("-")[:1].isdigit() or d.strip() in ("", "-") for d in digits), digits


def test_json_schema_allows_only_the_enum(grammars, tokenizer) -> None:
    schema = {"type": "object", "properties": {"p": {"enum": ["low", "high"]}}, "required": ["p"]}
    constraint = grammars.constraint(grammars.json_schema(schema))
    drive(constraint, tokenizer, '{"p": "')
    assert {tokenizer.decode([i]) for i in allowed_ids(constraint)} <= {"l", "lo", "low", "h", "hi", "high", "low\"", "high\"", 'low"}', 'high"}'}


def test_a_rejected_token_lifts_the_constraint_and_is_logged(grammars, tokenizer, caplog) -> None:
    constraint = grammars.constraint(grammars.json_object())
    with caplog.at_level(logging.WARNING, logger="nvlm_engine.chat.grammar"):
        constraint.accept(tokenizer.encode("x", add_special_tokens=False)[0])
    assert "rejected token" in caplog.text and constraint.allowed() is None and not constraint.done


def test_the_mask_covers_the_padded_vocabulary_and_is_reused_while_unchanged(grammars, chat, tokenizer) -> None:
    constraint = grammars.constraint(grammars.free_text())
    mask = constraint.allowed()
    assert mask.dtype == torch.bool and mask.shape[0] == chat.engine.config.llm.vocab_size == grammars.vocab_size
    assert free_text_allowed(mask, tokenizer)
    drive(constraint, tokenizer, "Some text")
    assert constraint.allowed() is mask


# --- the compile budget: static limits, time budget, cache (issue 10) -------------------------

HOSTILE = {"type": "object", "properties": {"s": {"type": "string", "pattern": "^a{1,30000}$"}}, "required": ["s"]}


def slow_schema() -> dict:
    """Within every static limit, yet ~0.7 s to compile for a 152k vocabulary."""
    pattern = "^{0}{{1,1000}}{1}{{1,1000}}{2}{{1,1000}}$"
    props = {f"p{i}": {"type": "string", "pattern": pattern.format(*abc)}
             for i, abc in enumerate(("abc", "def", "ghi"))}
    return {"type": "object", "properties": props, "required": list(props)}


def fresh_schema() -> dict:
    name = f"k{uuid.uuid4().hex[:8]}"  # compiled by no other test
    return {"type": "object", "properties": {name: {"type": "integer"}}, "required": [name]}


def nested(levels: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"email": {"type": "string", "pattern": r"^[\w.+-]+@[\w-]+\.[\w.]+$"},
                                      "day": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
                                      "id": {"type": "string",
                                             "pattern": "^[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}$"}}},
    {"type": "object", "properties": {"text": {"type": "string", "maxLength": 30000}, "tags": {
        "type": "array", "items": {"type": "string", "maxLength": 50}, "minItems": 1, "maxItems": 1000}}},
    {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(200)}},
    {"enum": [f"label {i}" for i in range(1000)]},
    nested(30),
    slow_schema(),
])
def test_sane_schemas_pass_the_static_limits(schema) -> None:
    check_schemas([("schema", schema)])


@pytest.mark.parametrize(("schema", "bound"), [
    (HOSTILE, "max_repeat"),
    ({"type": "string", "pattern": "^(ab{1,100}){1,200}$"}, "max_regex_size"),
    ({"type": "object", "patternProperties": {"^x{5000}$": {}}}, "max_repeat"),
    ({"type": "string", "minLength": 10**6}, "max_count"),
    ({"type": "array", "maxItems": 10**7}, "max_count"),
    ({"type": "object", "properties": {f"p{i}": {} for i in range(2000)}}, "max_properties"),
    (nested(800), "max_depth"),
    ({"enum": ["x" * 300_000]}, "max_schema_chars"),
])
def test_hostile_schemas_are_refused_naming_the_bound(schema, bound) -> None:
    started = time.monotonic()
    with pytest.raises(GrammarTooComplexError, match=f"GrammarLimits.{bound}"):
        check_schemas([("schema", schema)])
    assert time.monotonic() - started < 0.5


def test_keywords_inside_json_values_are_data_not_limits() -> None:
    check_schemas([("schema", {"const": {"pattern": "a{1,99999}"}, "default": {"maxLength": 10**9}})])


def test_chat_nvlm_refuses_a_hostile_schema_at_once(chat) -> None:
    started = time.monotonic()
    with pytest.raises(GrammarTooComplexError, match="30000"):
        chat.with_structured_output({**HOSTILE, "title": "spell"})  # LangChain names a dict schema by its title
    with pytest.raises(GrammarTooComplexError, match="30000"):
        chat.with_structured_output({**HOSTILE, "title": "spell"}, method="function_calling")
    response_format = {"type": "json_schema", "json_schema": {"name": "s", "schema": HOSTILE}}
    with pytest.raises(GrammarTooComplexError, match="30000"):
        chat.bind(response_format=response_format).invoke("hi")  # the engine's grammars check it too
    tool = {"type": "function", "function": {"name": "spell", "parameters": HOSTILE}}
    with pytest.raises(GrammarTooComplexError, match="30000"):
        chat.bind_tools([tool], tool_choice="required").invoke("hi")
    assert time.monotonic() - started < 2


def test_a_schema_is_compiled_once_for_all_callers(grammars) -> None:
    schema = fresh_schema()
    compiles, hits = grammars.stats.compiles, grammars.stats.hits
    results = []
    threads = [threading.Thread(target=lambda: results.append(grammars.json_schema(schema))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    again = grammars.json_schema(schema)
    assert grammars.stats.compiles == compiles + 1  # concurrent callers share the compile, later ones hit the cache
    assert len(results) == 4 and all(r is again for r in results) and grammars.stats.hits >= hits + 1


def test_a_compile_past_the_budget_is_refused_and_remembered(grammars, tokenizer) -> None:
    schema = slow_schema()
    compiles, refused = grammars.stats.compiles, grammars.stats.refused
    started = time.monotonic()
    with pytest.raises(GrammarTooComplexError, match="budget"):
        grammars.json_schema(schema, timeout_s=0.001)  # no real compile fits in 1 ms
    assert time.monotonic() - started < 1
    with pytest.raises(GrammarTooComplexError, match="budget"):
        grammars.json_schema(schema, timeout_s=0.001)
    assert grammars.stats.compiles == compiles + 1 and grammars.stats.refused == refused + 2
    compiled = grammars.json_schema(schema, timeout_s=60)  # a larger budget than the one it ran past
    constraint = grammars.constraint(compiled)
    drive(constraint, tokenizer, '{"p0": "aabbbc", "p1": "def", "p2": "ghi"}')
    assert constraint.done or allowed_ids(constraint) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_a_full_compile_pool_answers_busy_at_once(grammars, tokenizer, chat) -> None:
    engine = chat.engine
    limits = GrammarLimits(timeout_s=0.001, workers=1, max_pending=1)
    small = Grammars(tokenizer, engine.config.llm.vocab_size, [engine.token_ids.end], limits=limits)
    with pytest.raises(GrammarTooComplexError):
        small.json_schema(slow_schema())  # runs on past its budget, holding the one worker
    started = time.monotonic()
    with pytest.raises(GrammarBusyError):
        small.json_schema(fresh_schema())
    assert time.monotonic() - started < 0.5 and small.stats.busy == 1
