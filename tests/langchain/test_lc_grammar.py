"""The xgrammar constraints on the checkpoint's real tokenizer, driven token by token as the engine does."""

from __future__ import annotations

import logging

import pytest
import torch

from nvlm_langchain.engines import get_engine
from nvlm_langchain.grammar import GrammarConstraint, Grammars
from nvlm_langchain.tool_calls import ToolSpec

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
    with caplog.at_level(logging.WARNING, logger="nvlm_langchain.grammar"):
        constraint.accept(tokenizer.encode("x", add_special_tokens=False)[0])
    assert "rejected token" in caplog.text and constraint.allowed() is None and not constraint.done


def test_the_mask_covers_the_padded_vocabulary_and_is_reused_while_unchanged(grammars, chat, tokenizer) -> None:
    constraint = grammars.constraint(grammars.free_text())
    mask = constraint.allowed()
    assert mask.dtype == torch.bool and mask.shape[0] == chat.engine.config.llm.vocab_size == grammars.vocab_size
    assert free_text_allowed(mask, tokenizer)
    drive(constraint, tokenizer, "Some text")
    assert constraint.allowed() is mask
