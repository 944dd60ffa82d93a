"""Continuing a final assistant message: the prompt ends inside that turn, the model goes on from it.

This is what lm-eval's chat-completions model sends for HumanEval (`gen_prefix`: a trailing
assistant message, no flag) and what vLLM calls `continue_final_message`. Checked at each
layer: the prompt builder (both dialects), the text stream (a continuation keeps its leading
whitespace: a function body's indentation), and the engine (its automatic rule, and an answer
that is exactly the rest of the answer it would have given).
"""

from __future__ import annotations

import pytest

from nvlm_engine.errors import PromptError
from nvlm_engine.prompts import DEFAULT_SYSTEM_PROMPT, PromptBuilder, PromptDialect, PromptMessage
from nvlm_engine.textstream import TextStream

REF = f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|><|im_start|>user\nQ<|im_end|><|im_start|>assistant\n"
PREFIX = "Here is the code:\n```python\ndef f(x):\n"


def _turns(*pairs: tuple[str, str]) -> list[PromptMessage]:
    return [PromptMessage(role, (text,)) for role, text in pairs]  # type: ignore[arg-type]


def test_reference_prompt_ends_with_the_partial_answer_and_no_end_token(tokenizer) -> None:
    builder = PromptBuilder(tokenizer)
    messages = _turns(("user", "Q"), ("assistant", PREFIX))
    rendered = builder.render(messages, add_generation_prompt=False, continue_final_message=True)
    assert rendered == REF + PREFIX
    ids = builder.build(messages, add_generation_prompt=False, continue_final_message=True).token_ids
    assert ids == tokenizer.encode(REF + PREFIX, add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") not in ids[-8:]


def test_vllm_prompt_ends_with_the_partial_answer_like_transformers(tokenizer) -> None:
    if not tokenizer.chat_template:
        pytest.skip("this tokenizer has no chat template (the vLLM dialect needs one)")
    builder = PromptBuilder(tokenizer, dialect=PromptDialect.VLLM)
    messages = _turns(("user", "Q"), ("assistant", PREFIX))
    conversation = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": PREFIX}]
    expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False,
                                             continue_final_message=True)
    assert expected.endswith(PREFIX)  # transformers keeps the template's verbatim text, cut after the message
    assert builder.render(messages, add_generation_prompt=False, continue_final_message=True) == expected
    ids = builder.build(messages, add_generation_prompt=False, continue_final_message=True).token_ids
    assert ids == tokenizer.encode(expected, add_special_tokens=False)


@pytest.mark.parametrize("dialect", list(PromptDialect))
def test_continuing_an_empty_answer_is_the_generation_prompt(tiny_tokenizer, dialect) -> None:
    builder = PromptBuilder(tiny_tokenizer, dialect=dialect)
    opened = builder.render(_turns(("user", "Q")))
    continued = builder.render(_turns(("user", "Q"), ("assistant", "")), add_generation_prompt=False,
                               continue_final_message=True)
    assert continued == opened


@pytest.mark.parametrize(("messages", "generation", "match"), [
    ([("user", "Q")], False, "needs the conversation to end with an assistant message"),
    ([("user", "Q"), ("assistant", "A")], True, "contradict"),
])
def test_bad_continuations_are_prompt_errors(tiny_tokenizer, messages, generation, match) -> None:
    with pytest.raises(PromptError, match=match):
        PromptBuilder(tiny_tokenizer).build(_turns(*messages), add_generation_prompt=generation,
                                            continue_final_message=True)


class _Bytes:
    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_keeps_a_continuations_leading_whitespace() -> None:
    answer, continuation = TextStream(_Bytes()), TextStream(_Bytes(), strip_leading=False)
    for b in b"    return x\n":
        answer.push(b)
        continuation.push(b)
    answer.finish()
    continuation.finish()
    assert answer.text == "return x"
    assert continuation.text == "    return x"


def test_engine_continues_a_final_assistant_message_by_default(tiny_engine) -> None:
    base = [{"role": "user", "content": "Write a function."}]
    answer = tiny_engine.generate(base, max_new_tokens=12)
    base_ids = tiny_engine.prepare(base).prompt_ids
    decode = tiny_engine.tokenizer.decode
    # Cut the answer where its text re-tokenizes to the same ids, preferring a cut whose rest
    # starts with whitespace (what the reference's strip() would lose).
    cuts = []
    for k in range(1, len(answer.token_ids)):
        prefix = decode(answer.token_ids[:k], skip_special_tokens=True)
        ids = tiny_engine.prepare([*base, {"role": "assistant", "content": prefix}]).prompt_ids
        if ids == base_ids + answer.token_ids[:k]:  # the prompt ends with the partial answer, turn open
            cuts.append((k, prefix))
    assert cuts, "no cut of the answer re-tokenizes to its own ids"
    k, prefix = next(((k, p) for k, p in cuts if decode(answer.token_ids[k:])[:1].isspace()), cuts[0])
    rest = tiny_engine.generate([*base, {"role": "assistant", "content": prefix}],
                                max_new_tokens=len(answer.token_ids) - k)
    assert rest.token_ids == answer.token_ids[k:]
    assert rest.text == decode(answer.token_ids[k:], skip_special_tokens=True).rstrip()
    with pytest.raises(PromptError, match="add_generation_prompt"):
        tiny_engine.prepare([*base, {"role": "assistant", "content": prefix}], continue_final_message=False)
