"""The Qwen2.5 byte-level BPE tokenizer that NVLM-D uses, loaded without running checkpoint code.

This module knows how a checkpoint folder stores its tokenizer (`tokenizer.json`, or
`vocab.json` + `merges.txt`, plus `tokenizer_config.json` with the added tokens, the special
token names and the chat template) and how to rebuild the same fast tokenizer from those files
alone. It never imports code from the folder: `auto_map` is ignored and `trust_remote_code`
is never passed. It knows nothing about prompts or images (see `prompts.py`).

The tiny tokenizer that tests load through this same path is written by
`nvlm_engine.testing.write_tiny_tokenizer`.
"""

from __future__ import annotations

import logging
import reprlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from nvlm_engine.config import MAX_VOCAB
from nvlm_engine.config_json import read_json_object
from nvlm_engine.errors import CheckpointError

__all__ = [
    "ENDOFTEXT",
    "IM_END",
    "IM_START",
    "QWEN2_ADDED_TOKENS",
    "QWEN2_CHAT_TEMPLATE",
    "VISION_PAD",
    "SpecialTokens",
    "load_tokenizer",
]

logger = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_PAD = "<|vision_pad|>"

# The 22 added tokens of Qwen2.5 as (content, special), in id order; in the 72B checkpoint they
# take ids 151643..151664, right after the 151,643 base tokens. Tool and FIM tokens are
# added but not special, so `decode(skip_special_tokens=True)` keeps them, as HF does.
QWEN2_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    (ENDOFTEXT, True),
    (IM_START, True),
    (IM_END, True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    (VISION_PAD, True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

# Qwen2's pre-tokenizer split: contractions, letters with one leading non-letter, single
# digits (numbers are tokenized digit by digit), punctuation runs swallowing trailing newlines,
# newline runs, then spaces. Applied before the byte-level mapping, as in Qwen2.5's tokenizer.json.
_QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The published Qwen2.5 chat template, byte for byte as in NVLM-D-72B's tokenizer_config.json.
# vLLM's OpenAI server renders NVLM-D prompts with it (the VLLM prompt dialect), and the tiny
# tokenizer (`nvlm_engine.testing`) ships it so that dialect is testable without the checkpoint.
QWEN2_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

_CONFIG_FILE = "tokenizer_config.json"
_TOKENIZER_JSON = "tokenizer.json"
_VOCAB_FILE = "vocab.json"
_MERGES_FILE = "merges.txt"
_CHAT_TEMPLATE_FILE = "chat_template.jinja"

# Bounds on the tokenizer files, checked before any of them is parsed, so that parsing time stays
# a small multiple of a real load whatever the files hold. The published NVLM-D-72B files use
# 18 (vocab.json), 11 (merges.txt) and 35-75 (tokenizer.json, compact or pretty) bytes per
# embedding row; the budgets below allow 2.5-6x that, plus 1 MiB for small vocabularies.
_CONFIG_MAX_BYTES = 16 << 20  # tokenizer_config.json: 7 KB published (22 added tokens + template)
_BYTES_PER_ROW = {_VOCAB_FILE: 64, _MERGES_FILE: 64, _TOKENIZER_JSON: 192}
_SLACK_BYTES = 1 << 20


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the added tokens the engine relies on, looked up by content.

    Attributes:
        im_start: `<|im_start|>` (151644 in NVLM-D-72B).
        im_end: `<|im_end|>` (151645), the only stop token of the reference.
        endoftext: `<|endoftext|>` (151643), the pad token of the config.
        vision_pad: `<|vision_pad|>` (151654), one per image feature row.
    """

    im_start: int
    im_end: int
    endoftext: int
    vision_pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> SpecialTokens:
        """Looks the ids up among the tokenizer's added tokens.

        They must be added tokens, not merely vocabulary entries: only added tokens are cut
        out of the text before pre-tokenization, which the prompt splicing relies on.

        Raises:
            CheckpointError: one or more of the tokens is not an added token.
        """
        added = tokenizer.get_added_vocab()
        wanted = {"im_start": IM_START, "im_end": IM_END, "endoftext": ENDOFTEXT, "vision_pad": VISION_PAD}
        missing = [content for content in wanted.values() if content not in added]
        if missing:
            raise CheckpointError(
                f"the tokenizer lacks the added tokens {missing}; NVLM-D needs "
                f"{list(wanted.values())} (declared in tokenizer_config.json's added_tokens_decoder). "
                "Check that the folder holds the NVLM-D-72B tokenizer files."
            )
        return cls(**{field: added[content] for field, content in wanted.items()})


def load_tokenizer(folder: str | Path, *, max_tokens: int | None = None) -> PreTrainedTokenizerBase:
    """Loads the fast tokenizer of a checkpoint folder without executing any of its code.

    Reads `tokenizer.json` when present, else builds the Qwen2 byte-level BPE from `vocab.json`
    and `merges.txt` (NFC normalizer, Qwen2 split regex, byte-level mapping and decoder).
    `tokenizer_config.json` is required either way: its `added_tokens_decoder` entries are
    registered with their exact ids and flags, and it names the eos/pad tokens and holds the
    chat template (else `chat_template.jinja` beside it is used).

    Every token id must index a row of the model's embedding: `max_tokens` bounds the token
    count (checked before any added token is added, all of them in one call), and the sizes of
    the vocabulary files (see `_BYTES_PER_ROW`), checked before they are parsed, so that a
    hostile vocabulary fails in milliseconds.

    Args:
        folder: the checkpoint folder.
        max_tokens: the model's embedding rows (`llm_config.vocab_size`, checked against the
            shard headers); None allows up to `config.MAX_VOCAB`.

    Returns:
        A `PreTrainedTokenizerFast` that adds no BOS token.

    Raises:
        CheckpointError: a file is missing, unreadable or too large, an added token cannot get its
            declared id, a named special token is not in the vocabulary, a field has the wrong
            type, or there would be more tokens than `max_tokens`.
    """
    start = time.perf_counter()
    folder = Path(folder)
    limit = MAX_VOCAB if max_tokens is None else max_tokens
    config = _read_config(folder)
    if config.get("split_special_tokens"):
        # With it, "<|im_start|>" in the prompt text stays text and every prompt would be wrong.
        raise CheckpointError(
            f"{folder / _CONFIG_FILE} sets split_special_tokens=true, which NVLM-D prompts cannot use: "
            "set it to false."
        )
    if (folder / _TOKENIZER_JSON).is_file():
        _check_file_size(folder / _TOKENIZER_JSON, limit)
        backend = _read_tokenizer_json(folder / _TOKENIZER_JSON)
    else:
        backend = _build_bpe(folder, add_prefix_space=bool(config.get("add_prefix_space", False)), limit=limit)
    _register_added_tokens(backend, config.get("added_tokens_decoder") or {}, folder, limit)

    named = {key: _token_content(config.get(key)) for key in ("bos_token", "eos_token", "pad_token", "unk_token")}
    unknown = {key: token for key, token in named.items() if token is not None and backend.token_to_id(token) is None}
    if unknown:
        # The wrapper would silently append them as new tokens with fresh ids.
        raise CheckpointError(
            f"{folder / _CONFIG_FILE} names special tokens that are not in the vocabulary: {unknown}. "
            "Fix the config or add them to added_tokens_decoder."
        )
    extra = config.get("additional_special_tokens")
    if extra is not None and (
        not isinstance(extra, list)
        or not all(isinstance(token, str) and backend.token_to_id(token) is not None for token in extra)
    ):
        # As above: unknown ones would become new tokens, past the ids the embedding was checked for.
        raise CheckpointError(
            f"{folder / _CONFIG_FILE}: additional_special_tokens must list tokens of the vocabulary, got "
            f"{reprlib.repr(extra)}. Fix the config or add them to added_tokens_decoder."
        )
    max_length = config.get("model_max_length", 131072)
    if isinstance(max_length, bool) or not isinstance(max_length, (int, float)) or not max_length >= 1:
        raise CheckpointError(
            f"{folder / _CONFIG_FILE}: model_max_length must be a positive number, got {reprlib.repr(max_length)}."
        )
    # The wrapper deep-copies the backend: about 0.5 s of the ~0.8 s load of the 151k vocabulary.
    # Nothing is cached on disk (no tokenizer.json is written into the user's folder).
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **named,
        additional_special_tokens=extra,
        chat_template=_chat_template(config, folder),
        # transformers saves "no limit" as int(1e30); a float infinity means the same
        model_max_length=int(min(max_length, 1e30)),
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        add_bos_token=False,  # the config says so and the reference prompt has no BOS
    )
    logger.debug(
        "loaded tokenizer from %s: %d tokens in %.2f s", folder, len(tokenizer), time.perf_counter() - start
    )
    return tokenizer


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / _CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"no tokenizer in {folder}: looked for {_CONFIG_FILE} together with {_TOKENIZER_JSON} "
            f"or {_VOCAB_FILE} + {_MERGES_FILE}, and {path} is missing. "
            "Point at the NVLM-D-72B checkpoint folder, or download its tokenizer files into it."
        )
    config = read_json_object(path, max_bytes=_CONFIG_MAX_BYTES)  # bounded size and nesting
    return config


def _read_tokenizer_json(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exception subclasses
        raise CheckpointError(f"cannot read {path}: {e}. Re-download the file, or delete it to use vocab.json.") from e


def _check_file_size(path: Path, limit: int) -> None:
    allowed = _SLACK_BYTES + limit * _BYTES_PER_ROW[path.name]
    size = path.stat().st_size
    if size > allowed:
        raise CheckpointError(
            f"{path} is {size:,} bytes, more than the {allowed:,} allowed for a tokenizer of at most "
            f"{limit:,} tokens (the rows of the model's embedding): it holds a far larger vocabulary "
            "than the model can embed. The tokenizer files and config.json do not belong together; "
            "re-download them."
        )


def _build_bpe(folder: Path, *, add_prefix_space: bool, limit: int = MAX_VOCAB) -> Tokenizer:
    missing = [name for name in (_VOCAB_FILE, _MERGES_FILE) if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(
            f"no tokenizer in {folder}: looked for {_TOKENIZER_JSON}, or {_VOCAB_FILE} + {_MERGES_FILE}; "
            f"missing {missing}. Download the tokenizer files of the checkpoint into {folder}."
        )
    for name in (_VOCAB_FILE, _MERGES_FILE):
        _check_file_size(folder / name, limit)
    try:
        # Parsed on the Rust side: about twice as fast as json + a Python merges list for the
        # 151k-token vocabulary. Accepts merges with or without a "#version" header.
        model = BPE.from_file(
            str(folder / _VOCAB_FILE),
            str(folder / _MERGES_FILE),
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,  # byte-level BPE never needs an unknown token
        )
    except Exception as e:  # the Rust side raises plain Exception for unreadable or malformed files
        raise CheckpointError(
            f"cannot build the BPE tokenizer from {folder / _VOCAB_FILE} and {folder / _MERGES_FILE}: {e}. "
            "Re-download both files."
        ) from e
    backend = Tokenizer(model)
    _set_qwen2_pipeline(backend, add_prefix_space=add_prefix_space)
    return backend


def _set_qwen2_pipeline(backend: Tokenizer, *, add_prefix_space: bool = False) -> None:
    # Same pipeline as Qwen2.5's tokenizer.json (and the slow Qwen2Tokenizer, which also NFC-
    # normalizes): text that is not NFC does not round-trip byte for byte.
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, trim_offsets=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()


def _register_added_tokens(backend: Tokenizer, declared: Any, folder: Path, limit: int) -> None:
    path = folder / _CONFIG_FILE
    if not isinstance(declared, dict):
        raise CheckpointError(
            f"{path}: added_tokens_decoder must be an object of id -> token, got {reprlib.repr(declared)}. "
            "Re-download the file."
        )
    try:
        entries = sorted(((int(token_id), spec) for token_id, spec in declared.items()), key=lambda item: item[0])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: added_tokens_decoder keys must be ids: {e}") from e
    # tokenizer.json already carries its added tokens; they are checked, not added again.
    already_added = {token.content for token in backend.get_added_tokens_decoder().values()}
    new: dict[str, AddedToken] = {}
    for token_id, spec in entries:
        content = _token_content(spec)
        if content is None:
            raise CheckpointError(f"{path}: added token {token_id} has no content")
        flags = spec if isinstance(spec, dict) else {}
        if content not in already_added and content not in new:
            # A new token takes the next free id; a token already in the base vocabulary keeps its
            # id and only becomes unsplittable.
            new[content] = AddedToken(
                content,
                single_word=bool(flags.get("single_word", False)),
                lstrip=bool(flags.get("lstrip", False)),
                rstrip=bool(flags.get("rstrip", False)),
                normalized=bool(flags.get("normalized", False)),
                special=bool(flags.get("special", False)),
            )
    # Every token id must index a row of the embedding (past the last row, generation fails, on
    # CUDA as a device-side assert), so the count is bounded before anything is added. Added ids
    # follow the vocabulary without gaps (checked below); the vocabulary's own ids are not scanned
    # for gaps, which costs ~0.4 s per load of 152k tokens (published files have none).
    fresh = sum(1 for content in new if backend.token_to_id(content) is None)
    present = backend.get_vocab_size(with_added_tokens=True)
    if present + fresh > limit:
        raise CheckpointError(
            f"the tokenizer in {folder} would have {present + fresh:,} tokens ({present:,} in its vocabulary "
            f"files, {fresh:,} more added by {_CONFIG_FILE}), more than the {limit:,} rows of the model's "
            "embedding (llm_config.vocab_size). The tokenizer files and config.json do not belong together; "
            "re-download them."
        )
    # One call: the backend rebuilds its matcher of added tokens on every call, so adding them one
    # at a time is quadratic (8,000 tokens: 15 s; a million: hours). New tokens take the next free
    # ids in order; sorting by id makes the contiguous block of the real checkpoint (151643..151664
    # after 151,643 base tokens) land exactly.
    backend.add_tokens(list(new.values()))
    for token_id, spec in entries:
        content = _token_content(spec)
        got = backend.token_to_id(content)
        if got != token_id:
            raise CheckpointError(
                f"{path} declares {content!r} as id {token_id}, but it gets id {got} "
                f"(base vocabulary of {backend.get_vocab_size(with_added_tokens=False)} tokens). "
                "Added token ids must follow the vocabulary without gaps; the files do not belong together."
            )


def _token_content(value: Any) -> str | None:
    # Special tokens are strings, or AddedToken dicts ({"content": ..., "__type": "AddedToken"}).
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(config: dict[str, Any], folder: Path) -> str | dict[str, str] | None:
    template = config.get("chat_template")
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        # Older multi-template form: [{"name": "default", "template": "..."}, ...].
        if not all(isinstance(item, dict) and isinstance(item.get("name"), str)
                   and isinstance(item.get("template"), str) for item in template):
            raise CheckpointError(
                f"{folder / _CONFIG_FILE}: chat_template must be a string or a list of "
                f'{{"name": ..., "template": ...}} objects, got {reprlib.repr(template)}. Fix or re-download the file.'
            )
        return {item["name"]: item["template"] for item in template}
    if template is not None:
        raise CheckpointError(
            f"{folder / _CONFIG_FILE}: chat_template must be a string or a list, got {reprlib.repr(template)}."
        )
    path = folder / _CHAT_TEMPLATE_FILE
    if path.is_file():  # transformers >= 4.43 saves it beside the config
        return path.read_text(encoding="utf-8")
    return None
