"""Tokenizer loading (real NVLM-D-72B files when ../shared is present) and the tiny tokenizer."""

from __future__ import annotations

import json
import random
import shutil
import time
import unicodedata
from pathlib import Path

import pytest
from shared_paths import REAL_72B

from nvlm_engine.errors import CheckpointError
from nvlm_engine.testing import write_tiny_tokenizer
from nvlm_engine.tokenizer import (
    QWEN2_ADDED_TOKENS,
    QWEN2_CHAT_TEMPLATE,
    SpecialTokens,
    load_tokenizer,
)

SKIP_REAL = f"the real NVLM-D-72B tokenizer files are not at {REAL_72B} (they sit beside the project in CI)"

# Whitespace runs, digits, contractions, special tokens inside text, non-Latin scripts, emoji.
SAMPLES = [
    "Hello, world!",
    "Answer the questions.",
    "  leading and trailing spaces   ",
    "tabs\tand\nnew\n\nlines\r\n  indented",
    "12345 + 0.5 = 12345.5; 2024-11-28",
    "I'm sure they'll say it's OK, don't you think? WE'LL SEE",
    "before<|im_end|>after<|im_start|>user\n<|vision_pad|><|vision_pad|>x",
    "<tool_call>{\"name\": \"f\"}</tool_call>",
    "<Image><tile_1></Image>\n<tile_global_thumbnail>",
    "Ünïcödé: café naïve, 你好世界, こんにちは, Привет, مرحبا, 🤖🚀👩‍👩‍👧",
    "",
]


def real_config() -> dict:
    return json.loads((REAL_72B / "tokenizer_config.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def real_tokenizer():
    if not (REAL_72B / "vocab.json").is_file():
        pytest.skip(SKIP_REAL)
    return load_tokenizer(REAL_72B)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    write_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_folder: Path):
    return load_tokenizer(tiny_folder)


def copy_tiny(tiny_folder: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copyfile(tiny_folder / name, dest / name)
    return dest


def edit_config(folder: Path, edit) -> None:
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    edit(config)
    path.write_text(json.dumps(config), encoding="utf-8")


# --- the real tokenizer ------------------------------------------------------------------


def test_real_ids_of_the_tokens_the_engine_uses(real_tokenizer) -> None:
    assert real_tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    assert real_tokenizer.convert_tokens_to_ids("<|vision_pad|>") == 151654
    assert SpecialTokens.from_tokenizer(real_tokenizer) == SpecialTokens(
        im_start=151644, im_end=151645, endoftext=151643, vision_pad=151654
    )
    assert (real_tokenizer.eos_token, real_tokenizer.eos_token_id) == ("<|im_end|>", 151645)
    assert (real_tokenizer.pad_token, real_tokenizer.pad_token_id) == ("<|endoftext|>", 151643)
    assert real_tokenizer.bos_token is None
    assert real_tokenizer.vocab_size == 151643  # base tokens, as HF reports it
    assert len(real_tokenizer) == 151665


def test_real_added_tokens_keep_id_and_flags(real_tokenizer) -> None:
    declared = real_config()["added_tokens_decoder"]
    loaded = real_tokenizer.added_tokens_decoder
    assert sorted(loaded) == sorted(int(i) for i in declared)
    for token_id, spec in declared.items():
        token = loaded[int(token_id)]
        got = {k: getattr(token, k) for k in ("content", "lstrip", "rstrip", "normalized", "single_word", "special")}
        assert got == {k: spec[k] for k in got}, token_id
    assert [(c, s) for c, s in QWEN2_ADDED_TOKENS] == [(v["content"], v["special"]) for v in declared.values()]


def test_real_reference_prefix_and_no_bos(real_tokenizer) -> None:
    prefix = "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n"
    expected = [151644, 8948, 198, 16141, 279, 4755, 13, 151645, 151644, 872, 198]
    assert real_tokenizer.encode(prefix, add_special_tokens=False) == expected
    assert real_tokenizer.encode(prefix) == expected  # add_special_tokens=True adds no BOS/EOS


def test_real_matches_transformers_qwen2_tokenizer(real_tokenizer) -> None:
    # transformers' own class for tokenizer_class "Qwen2Tokenizer" is the reference here.
    from transformers import Qwen2Tokenizer

    hf = Qwen2Tokenizer.from_pretrained(str(REAL_72B))
    for text in SAMPLES:
        assert real_tokenizer.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False), text
    assert real_tokenizer.get_vocab() == hf.get_vocab()


def test_real_chat_template_is_kept_and_equals_the_embedded_one(real_tokenizer) -> None:
    assert real_config()["chat_template"] == QWEN2_CHAT_TEMPLATE
    assert real_tokenizer.chat_template == QWEN2_CHAT_TEMPLATE
    text = real_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_real_decoding(real_tokenizer) -> None:
    for text in SAMPLES:
        assert real_tokenizer.decode(real_tokenizer.encode(text)) == text
    ids = real_tokenizer.encode("Yes.<|im_end|><tool_call>")
    # SPEC 7 drops special tokens on output; <tool_call> is an added but not special token.
    assert real_tokenizer.decode(ids, skip_special_tokens=True) == "Yes.<tool_call>"


def test_real_digits_are_split_one_by_one(real_tokenizer) -> None:
    assert real_tokenizer.tokenize("2048") == ["2", "0", "4", "8"]


# --- loading errors and safety ------------------------------------------------------------


def test_missing_config_lists_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        load_tokenizer(tmp_path)
    message = str(info.value)
    for name in ("tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt"):
        assert name in message


def test_missing_vocab_files_are_named(tiny_folder: Path, tmp_path: Path) -> None:
    shutil.copyfile(tiny_folder / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    shutil.copyfile(tiny_folder / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(CheckpointError, match="merges.txt"):
        load_tokenizer(tmp_path)


def test_corrupt_files_raise_checkpoint_error(tiny_folder: Path, tmp_path: Path) -> None:
    folder = copy_tiny(tiny_folder, tmp_path / "bad-merges")
    (folder / "merges.txt").write_text("a b c\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match="merges.txt"):
        load_tokenizer(folder)
    folder = copy_tiny(tiny_folder, tmp_path / "bad-config")
    (folder / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        load_tokenizer(folder)


def test_never_runs_code_from_the_folder(tiny_folder: Path, tmp_path: Path) -> None:
    folder = copy_tiny(tiny_folder, tmp_path / "remote-code")
    marker = tmp_path / "executed"
    (folder / "tokenization_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('pwned')\n", encoding="utf-8"
    )
    edit_config(folder, lambda c: c.update(auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}))
    tokenizer = load_tokenizer(folder)
    assert not marker.exists()
    assert tokenizer.encode("hello") == load_tokenizer(tiny_folder).encode("hello")


def test_added_token_with_a_gap_in_ids_is_refused(tiny_folder: Path, tmp_path: Path) -> None:
    folder = copy_tiny(tiny_folder, tmp_path / "gap")

    def shift(config: dict) -> None:
        config["added_tokens_decoder"] = {str(int(k) + 5): v for k, v in config["added_tokens_decoder"].items()}

    edit_config(folder, shift)
    with pytest.raises(CheckpointError, match="declares '<\\|endoftext\\|>' as id"):
        load_tokenizer(folder)


def test_special_token_outside_the_vocabulary_is_refused(tiny_folder: Path, tmp_path: Path) -> None:
    folder = copy_tiny(tiny_folder, tmp_path / "eos")
    edit_config(folder, lambda c: c.update(eos_token="<|not_a_token|>"))
    with pytest.raises(CheckpointError, match="not_a_token"):
        load_tokenizer(folder)


def test_special_tokens_lookup_names_what_is_missing(tiny_folder: Path, tmp_path: Path) -> None:
    folder = copy_tiny(tiny_folder, tmp_path / "no-pad")

    def rename(config: dict) -> None:
        for spec in config["added_tokens_decoder"].values():
            if spec["content"] == "<|vision_pad|>":
                spec["content"] = "<|renamed_pad|>"
        config["additional_special_tokens"].remove("<|vision_pad|>")

    edit_config(folder, rename)
    tokenizer = load_tokenizer(folder)
    with pytest.raises(CheckpointError, match="vision_pad"):
        SpecialTokens.from_tokenizer(tokenizer)


def test_tokenizer_json_is_preferred(tiny_folder: Path, tiny_tokenizer, tmp_path: Path) -> None:
    folder = tmp_path / "fast"
    folder.mkdir()
    tiny_tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    shutil.copyfile(tiny_folder / "tokenizer_config.json", folder / "tokenizer_config.json")
    tokenizer = load_tokenizer(folder)  # no vocab.json / merges.txt here
    for text in SAMPLES:
        assert tokenizer.encode(text) == tiny_tokenizer.encode(text)
    assert SpecialTokens.from_tokenizer(tokenizer) == SpecialTokens.from_tokenizer(tiny_tokenizer)


def test_chat_template_jinja_file_is_used_when_the_config_has_none(tiny_folder: Path, tmp_path: Path) -> None:
    folder = copy_tiny(tiny_folder, tmp_path / "jinja")
    edit_config(folder, lambda c: c.pop("chat_template"))
    assert load_tokenizer(folder).chat_template is None
    (folder / "chat_template.jinja").write_text(QWEN2_CHAT_TEMPLATE, encoding="utf-8")
    assert load_tokenizer(folder).chat_template == QWEN2_CHAT_TEMPLATE


# --- the tiny tokenizer -------------------------------------------------------------------


def test_tiny_is_small_fast_and_deterministic(tmp_path: Path) -> None:
    start = time.perf_counter()
    write_tiny_tokenizer(tmp_path / "a")
    assert time.perf_counter() - start < 2.0
    write_tiny_tokenizer(tmp_path / "b")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    vocab = json.loads((tmp_path / "a" / "vocab.json").read_text(encoding="utf-8"))
    merges = (tmp_path / "a" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert 500 <= len(vocab) <= 1000
    assert len(merges) == len(vocab) - 256  # byte alphabet + one token per merge
    assert sorted(vocab.values()) == list(range(len(vocab)))


def test_tiny_added_tokens_follow_the_base_vocabulary(tiny_tokenizer) -> None:
    base = tiny_tokenizer.vocab_size
    assert [tiny_tokenizer.convert_tokens_to_ids(c) for c, _ in QWEN2_ADDED_TOKENS] == list(
        range(base, base + len(QWEN2_ADDED_TOKENS))
    )
    assert len(tiny_tokenizer) == base + 22
    for content, is_special in QWEN2_ADDED_TOKENS:
        assert tiny_tokenizer.added_tokens_decoder[tiny_tokenizer.convert_tokens_to_ids(content)].special is is_special
    special = SpecialTokens.from_tokenizer(tiny_tokenizer)
    # Same offsets as the real 151643 / 151644 / 151645 / 151654.
    assert (special.im_start - special.endoftext, special.im_end - special.endoftext) == (1, 2)
    assert special.vision_pad - special.endoftext == 11
    assert tiny_tokenizer.eos_token_id == special.im_end
    assert tiny_tokenizer.pad_token_id == special.endoftext
    assert tiny_tokenizer.bos_token is None
    assert tiny_tokenizer.encode("<|im_end|>") == [special.im_end]


def test_tiny_round_trips_any_unicode(tiny_tokenizer) -> None:
    for text in SAMPLES:
        assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text
    rng = random.Random(0)
    for _ in range(200):
        code_points = [rng.randrange(0x110000) for _ in range(rng.randrange(1, 40))]
        text = "".join(chr(c) for c in code_points if not 0xD800 <= c <= 0xDFFF)  # no lone surrogates
        # Byte-level BPE encodes every byte; the Qwen2 pipeline NFC-normalizes first (as the
        # real one does), so text comes back in NFC.
        assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == unicodedata.normalize("NFC", text)


def test_tiny_chat_template(tiny_tokenizer) -> None:
    assert tiny_tokenizer.chat_template == QWEN2_CHAT_TEMPLATE
    if not (REAL_72B / "tokenizer_config.json").is_file():
        pytest.skip(SKIP_REAL)
    assert QWEN2_CHAT_TEMPLATE == real_config()["chat_template"]


def test_tiny_has_the_schema_of_the_real_config(tiny_folder: Path) -> None:
    if not (REAL_72B / "tokenizer_config.json").is_file():
        pytest.skip(SKIP_REAL)
    real = real_config()
    tiny = json.loads((tiny_folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert sorted(tiny) == sorted(real)
    assert list(tiny["added_tokens_decoder"].values()) == list(real["added_tokens_decoder"].values())
    assert {k: v for k, v in tiny.items() if k != "added_tokens_decoder"} == {
        k: v for k, v in real.items() if k != "added_tokens_decoder"
    }
    # Same file formats: no "#version" header in merges.txt.
    assert not (tiny_folder / "merges.txt").read_text(encoding="utf-8").startswith("#")


def test_tiny_pre_tokenizes_like_the_real_one(tiny_tokenizer, real_tokenizer) -> None:
    for text in SAMPLES:
        tiny = tiny_tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
        real = real_tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
        assert tiny == real, text
