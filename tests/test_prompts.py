"""Prompt layouts and token splicing, against the real NVLM-D-72B tokenizer when ../shared has it.

Expected prompts are written out by hand from SPEC section 6 (reference) and from the chat
template (vLLM); the builder must render them and its spliced ids must equal the
tokenization of the whole expanded string.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from shared_paths import REAL_72B

from nvlm_engine.errors import CheckpointError, PromptError
from nvlm_engine.prompts import (
    DEFAULT_SYSTEM_PROMPT,
    ImageSlot,
    PromptBuilder,
    PromptDialect,
    PromptMessage,
)
from nvlm_engine.testing import write_tiny_tokenizer
from nvlm_engine.tokenizer import load_tokenizer

SKIP_REAL = f"the real NVLM-D-72B tokenizer files are not at {REAL_72B} (they sit beside the project in CI)"

PAD = "<|vision_pad|>"
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
REF_SYS = f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>"
USER = "<|im_start|>user\n"
ASSISTANT = "<|im_start|>assistant\n"
END = "<|im_end|>"


def image(num_tiles: int, tokens_per_tile: int = 256) -> str:
    """SPEC 6: <Image><tile_1>P...<tile_N>P<tile_global_thumbnail>P</Image>, N = num_tiles - 1."""
    pads = PAD * tokens_per_tile
    tags = [f"<tile_{k}>" for k in range(1, num_tiles)] + ["<tile_global_thumbnail>"]
    return "<Image>" + "".join(tag + pads for tag in tags) + "</Image>"


def user(*parts: str | ImageSlot) -> PromptMessage:
    return PromptMessage("user", tuple(parts))


def assistant(text: str) -> PromptMessage:
    return PromptMessage("assistant", (text,))


def system(text: str) -> PromptMessage:
    return PromptMessage("system", (text,))


def pad_runs(ids: list[int], pad_id: int) -> list[int]:
    """Lengths of the runs of consecutive pad ids."""
    runs: list[int] = []
    for i, token in enumerate(ids):
        if token == pad_id:
            if i > 0 and ids[i - 1] == pad_id:
                runs[-1] += 1
            else:
                runs.append(1)
    return runs


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


# --- reference dialect: layout and splicing ------------------------------------------------

# (name, builder system_prompt, messages, expected text, images, image tokens)
REFERENCE_CASES = [
    ("text-only", None, [user("Hello there.")], f"{REF_SYS}{USER}Hello there.{END}{ASSISTANT}", 0, 0),
    (
        "one-image",
        None,
        [user(ImageSlot(7), "What is this?")],
        f"{REF_SYS}{USER}{image(7)}\nWhat is this?{END}{ASSISTANT}",
        1,
        7 * 256,
    ),
    (
        "one-tile-image",
        None,
        [user(ImageSlot(1), "Describe.")],
        f"{REF_SYS}{USER}{image(1)}\nDescribe.{END}{ASSISTANT}",
        1,
        256,
    ),
    (
        "two-images-one-message",
        None,
        [user(ImageSlot(3), ImageSlot(2), "Compare them.")],
        f"{REF_SYS}{USER}Image-1: {image(3)}\nImage-2: {image(2)}\nCompare them.{END}{ASSISTANT}",
        2,
        5 * 256,
    ),
    (
        "text-between-images",
        None,
        [user("Look:", ImageSlot(2), "and", ImageSlot(1), ">> which?")],
        f"{REF_SYS}{USER}Look:Image-1: {image(2)}\nandImage-2: {image(1)}\n>> which?{END}{ASSISTANT}",
        2,
        3 * 256,
    ),
    (
        "images-across-turns",
        None,
        [user(ImageSlot(3), "A?"), assistant("a."), user(ImageSlot(5), "B?")],
        f"{REF_SYS}{USER}{image(3)}\nA?{END}{ASSISTANT}a.{END}{USER}{image(5)}\nB?{END}{ASSISTANT}",
        2,
        8 * 256,
    ),
    (
        "multi-turn-answers",
        None,
        [user("Hi"), assistant("Hello! How can I help?"), user("2+2?"), assistant("4"), user("Thanks.")],
        f"{REF_SYS}{USER}Hi{END}{ASSISTANT}Hello! How can I help?{END}{USER}2+2?{END}{ASSISTANT}4{END}"
        f"{USER}Thanks.{END}{ASSISTANT}",
        0,
        0,
    ),
    (
        "system-message",
        None,
        [system("Be brief."), user(ImageSlot(2), "Caption?")],
        f"<|im_start|>system\nBe brief.{END}{USER}{image(2)}\nCaption?{END}{ASSISTANT}",
        1,
        512,
    ),
    (
        "builder-system-prompt",
        "Follow the user's instruction and answer questions.",
        [user("Q")],
        f"<|im_start|>system\nFollow the user's instruction and answer questions.{END}{USER}Q{END}{ASSISTANT}",
        0,
        0,
    ),
    (
        "system-message-beats-builder",
        "ignored",
        [system("Used."), user("Q")],
        f"<|im_start|>system\nUsed.{END}{USER}Q{END}{ASSISTANT}",
        0,
        0,
    ),
    ("empty-system-prompt", "", [user(ImageSlot(1), "Q")], f"{USER}{image(1)}\nQ{END}{ASSISTANT}", 1, 256),
    ("empty-system-message", None, [system(""), user("Q")], f"{USER}Q{END}{ASSISTANT}", 0, 0),
    (
        "unicode-and-newlines",
        None,
        [user("\n  ¿Qué es esto? 你好 🤖\n\n", ImageSlot(2), "\n\nend  ")],
        f"{REF_SYS}{USER}\n  ¿Qué es esto? 你好 🤖\n\n{image(2)}\n\n\nend  {END}{ASSISTANT}",
        1,
        512,
    ),
]


@pytest.mark.parametrize(
    ("system_prompt", "messages", "expected", "num_images", "image_tokens"),
    [case[1:] for case in REFERENCE_CASES],
    ids=[case[0] for case in REFERENCE_CASES],
)
def test_reference_layout_and_spliced_ids(tokenizer, system_prompt, messages, expected, num_images, image_tokens):
    builder = PromptBuilder(tokenizer, system_prompt=system_prompt)
    assert builder.render(messages) == expected
    prompt = builder.build(messages)
    # Splicing pads in must give exactly the ids of the whole string with literal pad tokens.
    assert prompt.token_ids == encode(tokenizer, expected)
    assert prompt.num_images == num_images
    assert prompt.image_token_count == image_tokens
    assert prompt.token_ids.count(builder.special.vision_pad) == image_tokens


def test_reference_prefix_ids(real_tokenizer) -> None:
    prompt = PromptBuilder(real_tokenizer).build([user("Hi")])
    assert prompt.token_ids[:11] == [151644, 8948, 198, 16141, 279, 4755, 13, 151645, 151644, 872, 198]
    assert 151645 in prompt.token_ids and prompt.token_ids[0] == 151644  # no BOS


def test_text_only_prompt_equals_the_tokenized_reference_string(real_tokenizer) -> None:
    text = (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\nWhat is NVLM?<|im_end|>"
        "<|im_start|>assistant\n"
    )
    assert PromptBuilder(real_tokenizer).build([user("What is NVLM?")]).token_ids == encode(real_tokenizer, text)


def test_one_tile_image_has_only_the_thumbnail_tag(real_tokenizer) -> None:
    prompt = PromptBuilder(real_tokenizer).build([user(ImageSlot(1), "Q")])
    assert pad_runs(prompt.token_ids, 151654) == [256]
    text = real_tokenizer.decode(prompt.token_ids)
    assert "<Image><tile_global_thumbnail><|vision_pad|>" in text
    assert "<|vision_pad|></Image>\nQ" in text
    assert "<tile_1>" not in text


def test_seven_tile_image_has_six_tile_tags_and_the_thumbnail(real_tokenizer) -> None:
    prompt = PromptBuilder(real_tokenizer).build([user(ImageSlot(7), "Q")])
    assert pad_runs(prompt.token_ids, 151654) == [256] * 7
    assert prompt.image_token_count == 7 * 256
    tags = re.findall(r"<tile_[^>]+>", real_tokenizer.decode(prompt.token_ids))
    assert tags == [f"<tile_{k}>" for k in range(1, 7)] + ["<tile_global_thumbnail>"]


def test_tile_tags_are_plain_text(real_tokenizer) -> None:
    # SPEC 6: "<tile_1> is 5 tokens; <Image><tile_1> tokenizes with a merged ><". Both hold.
    assert real_tokenizer.tokenize("<tile_1>") == ["<", "tile", "_", "1", ">"]
    assert real_tokenizer.tokenize("<Image><tile_1>") == ["<Image", "><", "tile", "_", "1", ">"]
    merged = real_tokenizer.convert_tokens_to_ids("><")
    prompt = PromptBuilder(real_tokenizer).build([user(ImageSlot(2), "Q")])
    assert merged in prompt.token_ids[: prompt.token_ids.index(151654)]
    # "</Image>" and the "\n" after it share one token (">\n"), so the text after the last pad
    # must be tokenized with what follows it, never alone.
    assert real_tokenizer.tokenize("</Image>\nQ") == ["</", "Image", ">Ċ", "Q"]  # Ċ is byte-level "\n"


def test_pad_token_cuts_pre_tokenization(tokenizer) -> None:
    # The property splicing relies on: text around an added token tokenizes independently.
    for left, right in [("<tile_1>", "<tile_2>"), ("user\n<Image><tile_1>", "</Image>\nWhat?"), ("a b", " c")]:
        assert encode(tokenizer, left + PAD + right) == (
            encode(tokenizer, left) + [tokenizer.convert_tokens_to_ids(PAD)] + encode(tokenizer, right)
        )


def test_literal_image_placeholder_in_user_text_stays_text(tokenizer) -> None:
    builder = PromptBuilder(tokenizer)
    text = "What does <image> mean in <image>\nthis template?"
    prompt = builder.build([user(text)])
    assert prompt.image_token_count == 0 and prompt.num_images == 0
    assert prompt.token_ids == encode(tokenizer, f"{REF_SYS}{USER}{text}{END}{ASSISTANT}")
    with_image = builder.build([user(ImageSlot(2), text)])
    assert with_image.num_images == 1 and with_image.image_token_count == 512
    assert builder.render([user(ImageSlot(2), text)]) == f"{REF_SYS}{USER}{image(2)}\n{text}{END}{ASSISTANT}"


def test_no_generation_prompt(tokenizer) -> None:
    builder = PromptBuilder(tokenizer)
    messages = [user("Q"), assistant("A")]
    expected = f"{REF_SYS}{USER}Q{END}{ASSISTANT}A{END}"
    assert builder.render(messages, add_generation_prompt=False) == expected
    assert builder.build(messages, add_generation_prompt=False).token_ids == encode(tokenizer, expected)
    assert builder.render([user("Q")], add_generation_prompt=False) == f"{REF_SYS}{USER}Q{END}"


def test_tokens_per_tile_is_configurable(tokenizer) -> None:
    builder = PromptBuilder(tokenizer, tokens_per_tile=4)
    messages = [user(ImageSlot(3), "Q")]
    expected = f"{REF_SYS}{USER}{image(3, tokens_per_tile=4)}\nQ{END}{ASSISTANT}"
    assert builder.render(messages) == expected
    prompt = builder.build(messages)
    assert prompt.token_ids == encode(tokenizer, expected)
    assert prompt.image_token_count == 12


def test_repeated_builds_are_identical(tokenizer) -> None:
    builder = PromptBuilder(tokenizer)
    messages = [user(ImageSlot(4), "Q"), assistant("A"), user(ImageSlot(4), ImageSlot(4), "R")]
    assert builder.build(messages) == builder.build(messages)


# --- vLLM dialect ------------------------------------------------------------------------


def vllm_expected(tokenizer, conversation: list[dict[str, str]], tiles: list[int]) -> str:
    """What vLLM's server feeds the model: the chat template, then "<image>" expanded in order."""
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    pieces = text.split("<image>")
    assert len(pieces) == len(tiles) + 1
    return pieces[0] + "".join(image(n) + piece for n, piece in zip(tiles, pieces[1:]))


# (name, builder system_prompt, messages, equivalent vLLM conversation, tiles per image)
VLLM_CASES = [
    ("text-only", None, [user("Hi")], [{"role": "user", "content": "Hi"}], []),
    (
        "one-image",
        None,
        [user(ImageSlot(7), "What is this?")],
        [{"role": "user", "content": "<image>\nWhat is this?"}],
        [7],
    ),
    (
        "text-first-image-still-first",
        None,
        [user("What is this?", ImageSlot(1))],
        [{"role": "user", "content": "<image>\nWhat is this?"}],
        [1],
    ),
    (
        "two-images-two-texts",
        None,
        [user(ImageSlot(3), "First.", ImageSlot(2), "Second.")],
        [{"role": "user", "content": "<image>\n<image>\nFirst.\nSecond."}],
        [3, 2],
    ),
    ("image-only", None, [user(ImageSlot(2))], [{"role": "user", "content": "<image>\n"}], [2]),
    (
        "multi-turn",
        None,
        [user(ImageSlot(5), "A?"), assistant("a."), user(ImageSlot(1), "B?")],
        [
            {"role": "user", "content": "<image>\nA?"},
            {"role": "assistant", "content": "a."},
            {"role": "user", "content": "<image>\nB?"},
        ],
        [5, 1],
    ),
    (
        "system-message",
        None,
        [system("Answer the questions."), user("Q")],
        [{"role": "system", "content": "Answer the questions."}, {"role": "user", "content": "Q"}],
        [],
    ),
    (
        "builder-system-prompt",
        "Be brief.",
        [user("Q")],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"}],
        [],
    ),
]


@pytest.mark.parametrize(
    ("system_prompt", "messages", "conversation", "tiles"),
    [case[1:] for case in VLLM_CASES],
    ids=[case[0] for case in VLLM_CASES],
)
def test_vllm_equals_the_chat_template(tokenizer, system_prompt, messages, conversation, tiles) -> None:
    builder = PromptBuilder(tokenizer, dialect=PromptDialect.VLLM, system_prompt=system_prompt)
    expected = vllm_expected(tokenizer, conversation, tiles)
    assert builder.render(messages) == expected
    prompt = builder.build(messages)
    assert prompt.token_ids == encode(tokenizer, expected)
    assert prompt.num_images == len(tiles)
    assert prompt.image_token_count == 256 * sum(tiles)


def test_vllm_default_system_prompt_and_newlines(real_tokenizer) -> None:
    builder = PromptBuilder(real_tokenizer, dialect=PromptDialect("vllm"))
    text = builder.render([user(ImageSlot(1), "Q"), assistant("A"), user("R")])
    assert text == (
        f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n{USER}{image(1)}\nQ<|im_end|>\n"
        f"{ASSISTANT}A<|im_end|>\n{USER}R<|im_end|>\n{ASSISTANT}"
    )
    newline = real_tokenizer.convert_tokens_to_ids("Ċ")
    ids = builder.build([user("Q")]).token_ids
    assert all(ids[i + 1] == newline for i, t in enumerate(ids) if t == 151645)


def test_vllm_literal_image_placeholder_stays_text(tokenizer) -> None:
    builder = PromptBuilder(tokenizer, dialect=PromptDialect.VLLM)
    messages = [user(ImageSlot(2), "Is <image> a tag?")]
    prompt = builder.build(messages)
    assert prompt.num_images == 1 and prompt.image_token_count == 512
    assert "\nIs <image> a tag?<|im_end|>" in builder.render(messages)


def test_vllm_needs_a_chat_template(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    tokenizer.chat_template = None
    with pytest.raises(CheckpointError, match="chat_template"):
        PromptBuilder(tokenizer, dialect=PromptDialect.VLLM)
    PromptBuilder(tokenizer)  # the reference dialect does not use it


# --- errors ------------------------------------------------------------------------------

ERROR_CASES = [
    ("empty", [], "empty"),
    ("system-only", [system("S")], "only a system message"),
    ("system-not-first", [user("Q"), system("S")], "may only come first"),
    ("image-in-system", [PromptMessage("system", (ImageSlot(1),)), user("Q")], "only user messages take images"),
    ("image-in-assistant", [user("Q"), PromptMessage("assistant", (ImageSlot(1),)), user("R")], "only user"),
    ("unknown-role", [PromptMessage("tool", ("x",)), user("Q")], "role 'tool'"),  # type: ignore[arg-type]
    ("ends-with-assistant", [user("Q"), assistant("A")], "add_generation_prompt"),
    ("parts-is-a-string", [PromptMessage("user", "Q")], "parts=\\(text,\\)"),  # type: ignore[arg-type]
    ("bad-part", [PromptMessage("user", (3,))], "str or an ImageSlot"),  # type: ignore[arg-type]
    ("no-parts", [PromptMessage("user", ())], "without parts"),
    ("pad-in-text", [user(f"sneaky {PAD}")], "reserved for image features"),
    ("pad-in-answer", [user("Q"), assistant(PAD), user("R")], "reserved"),
    ("not-a-message", [{"role": "user", "content": "Q"}], "PromptMessage"),
]


@pytest.mark.parametrize("dialect", list(PromptDialect))
@pytest.mark.parametrize(("messages", "match"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_bad_conversations_raise_prompt_error(tiny_tokenizer, dialect, messages, match) -> None:
    builder = PromptBuilder(tiny_tokenizer, dialect=dialect)
    with pytest.raises(PromptError, match=match):
        builder.build(messages)
    with pytest.raises(PromptError, match=match):
        builder.render(messages)


def test_bad_options_raise_prompt_error(tiny_tokenizer) -> None:
    for num_tiles in (0, -1, True, 2.0):
        with pytest.raises(PromptError, match="num_tiles"):
            ImageSlot(num_tiles)  # type: ignore[arg-type]
    with pytest.raises(PromptError, match="tokens_per_tile"):
        PromptBuilder(tiny_tokenizer, tokens_per_tile=0)
    with pytest.raises(PromptError, match="system_prompt"):
        PromptBuilder(tiny_tokenizer, system_prompt=PAD)
    with pytest.raises(PromptError, match="reference"):
        PromptBuilder(tiny_tokenizer, dialect="chatml")  # type: ignore[arg-type]


def test_ending_with_an_assistant_message_is_fine_without_generation_prompt(tiny_tokenizer) -> None:
    for dialect in PromptDialect:
        prompt = PromptBuilder(tiny_tokenizer, dialect=dialect).build(
            [user("Q"), assistant("A")], add_generation_prompt=False
        )
        assert prompt.num_images == 0
