"""Prompt building: chat messages with image slots -> token ids with `<|vision_pad|>` runs.

This module knows the prompt layouts NVLM-D is run with (the reference `chat()` of the model
card, and vLLM's OpenAI server) and how an image becomes tile tags plus pad tokens. It does
not know pixels: how many tiles an image gets is decided by the image preprocessing, and
the caller passes it in as `ImageSlot(num_tiles)`. It knows nothing about the model either.

Images and control tokens are structural: the prompt is built as a sequence of text pieces,
control tokens the layout itself writes (`<|im_start|>`, `<|im_end|>`) and image slots, never by
searching message text. A user who types `<image>` or `<|im_end|>` gets those characters as
text: message text is tokenized with special tokens not matched, so no one can forge a turn
boundary (the reference would turn a typed `<|im_end|>` into the control token).
Token ids are produced by splicing: only the text between control tokens and pad runs is
tokenized, and their ids are inserted directly. Added tokens cut the text before
pre-tokenization, so tokenizing the pieces separately gives exactly the ids of the whole
string whenever the text holds no special-token strings, without running BPE over 256 pad
tokens per tile.
"""

from __future__ import annotations

import functools
import logging
import re
import secrets
import threading
import weakref
from collections.abc import Sequence

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from nvlm_engine.errors import CheckpointError, PromptError
from nvlm_engine.prompt_messages import (
    ImageSlot,
    Prompt,
    PromptDialect,
    PromptMessage,
    check_text,
    validate_conversation,
)
from nvlm_engine.tokenizer import ENDOFTEXT, IM_END, IM_START, VISION_PAD, SpecialTokens

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "QWEN_DEFAULT_SYSTEM_PROMPT",
    "ImageSlot",
    "Prompt",
    "PromptBuilder",
    "PromptDialect",
    "PromptMessage",
]

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = "Answer the questions."
# The Qwen2.5 chat template's own default, what vLLM's server sends when a request has no system message.
QWEN_DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# `min_text_tokens` tokenizes long text in pieces of this many characters (~10 MB of token data
# each), allowing each cut between pieces to have saved this many tokens (a cut changes the count
# by a token or two: the word or space run it splits, a combining mark it separates).
_COUNT_CHUNK_CHARS = 1 << 16
_TOKENS_PER_CUT = 8


class _Control(str):
    """A control token that the layout itself writes: spliced in by id, never searched for in text."""


class PromptBuilder:
    """Renders messages in one dialect and tokenizes them with images spliced in.

    Args:
        tokenizer: the checkpoint's tokenizer (see `load_tokenizer`).
        dialect: the layout to reproduce.
        system_prompt: system text used when the messages do not start with a system
            message. None means the dialect's default: `DEFAULT_SYSTEM_PROMPT` for REFERENCE,
            the chat template's own ("You are Qwen, ...") for VLLM. An empty string means no
            system turn at all in REFERENCE (the reference's `chat_without_sys_prompt` instead
            leaves a garbage prefix); in VLLM it gives the template's empty system turn.
        tokens_per_tile: `<|vision_pad|>` tokens per tile (256 after the 2x2 pixel shuffle).

    Raises:
        CheckpointError: the tokenizer lacks the NVLM-D added tokens, or has no chat template
            while the VLLM dialect is asked for.
        PromptError: bad options.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        dialect: PromptDialect = PromptDialect.REFERENCE,
        system_prompt: str | None = None,
        tokens_per_tile: int = 256,
    ) -> None:
        self.tokenizer = tokenizer
        try:
            self.dialect = PromptDialect(dialect)
        except ValueError as e:
            known = [d.value for d in PromptDialect]
            raise PromptError(f"unknown prompt dialect {dialect!r}; expected one of {known}") from e
        self.special = SpecialTokens.from_tokenizer(tokenizer)
        if isinstance(tokens_per_tile, bool) or not isinstance(tokens_per_tile, int) or tokens_per_tile < 1:
            raise PromptError(f"tokens_per_tile must be an int >= 1, got {tokens_per_tile!r}")
        if system_prompt is not None:
            check_text(system_prompt, "the builder's system_prompt")
        if self.dialect is PromptDialect.VLLM and not tokenizer.chat_template:
            raise CheckpointError(
                "the VLLM prompt dialect renders with the tokenizer's chat_template, and this tokenizer has "
                "none: add the Qwen2.5 chat_template to tokenizer_config.json, or use PromptDialect.REFERENCE."
            )
        self.system_prompt = system_prompt
        self.tokens_per_tile = tokens_per_tile
        # Ids from an image's first pad to its last pad depend on num_tiles only: cached.
        self._body_ids: dict[int, tuple[int, ...]] = {}
        self._control_ids = _control_ids(tokenizer, self.special)
        # Longest first, so that no control token is cut at a shorter one it starts with.
        self._controls = re.compile("|".join(map(re.escape, sorted(self._control_ids, key=len, reverse=True))))
        self._literal = _literal_backend(tokenizer)

    def build(self, messages: Sequence[PromptMessage], *, add_generation_prompt: bool = True,
              continue_final_message: bool = False) -> Prompt:
        """Tokenizes a conversation.

        Args:
            messages: the conversation; an optional system message first, then user and
                assistant messages.
            add_generation_prompt: end with `<|im_start|>assistant\\n` so the model answers.
            continue_final_message: end with the final assistant message's text, its turn left
                open (no `<|im_end|>`), so the model continues it (vLLM's and transformers'
                `continue_final_message`; needs add_generation_prompt=False).

        Returns:
            The token ids and image token counts.

        Raises:
            PromptError: an empty conversation, an unknown role, a system message after the
                first, an image outside a user message, a text holding `<|vision_pad|>`, a
                final assistant message while `add_generation_prompt` is true (or none while
                `continue_final_message` is); in the VLLM
                dialect, a chat template that does not copy message contents verbatim.
        """
        segments = self._segments(messages, add_generation_prompt, continue_final_message)
        ids: list[int] = []
        pending: list[str] = []  # text since the last control token or pad, tokenized as one string
        num_images = 0
        for segment in segments:
            if isinstance(segment, _Control):
                ids += self._encode("".join(pending))
                ids.append(self._control_ids[segment])
                pending = []
                continue
            if isinstance(segment, str):
                pending.append(segment)
                continue
            num_images += 1
            head, tail = _image_head_tail(segment.num_tiles)
            ids += self._encode("".join(pending) + head)
            ids += self._image_body_ids(segment.num_tiles)
            pending = [tail]  # "</Image>" merges with what follows (">\n" is one token), so it waits
        ids += self._encode("".join(pending))

        image_token_count = sum(s.num_tiles for s in segments if isinstance(s, ImageSlot)) * self.tokens_per_tile
        found = ids.count(self.special.vision_pad)
        if found != image_token_count:
            # Texts were checked for the pad token, so only a chat template could have put one in.
            raise PromptError(
                f"the prompt holds {found} {VISION_PAD} tokens but its {num_images} images need "
                f"{image_token_count}; does the chat template write {VISION_PAD}?"
            )
        logger.debug(
            "built %s prompt: %d tokens, %d images, %d image tokens",
            self.dialect.value,
            len(ids),
            num_images,
            image_token_count,
        )
        return Prompt(token_ids=ids, image_token_count=image_token_count, num_images=num_images)

    def render(self, messages: Sequence[PromptMessage], *, add_generation_prompt: bool = True,
               continue_final_message: bool = False) -> str:
        """Returns the prompt as text, images expanded to tile tags and literal pad tokens.

        Tokenizing this string gives `build(...).token_ids` when the message texts hold no
        special-token strings (`build` keeps a typed `<|im_end|>` as text; this string cannot
        show the difference); it is meant for logs and tests (one image adds 256 to 1,792
        `<|vision_pad|>` strings).

        Raises:
            PromptError: as `build`.
        """
        out: list[str] = []
        for segment in self._segments(messages, add_generation_prompt, continue_final_message):
            if isinstance(segment, str):
                out.append(segment)
                continue
            head, tail = _image_head_tail(segment.num_tiles)
            pads = VISION_PAD * self.tokens_per_tile
            body = pads + "".join(tag + pads for tag in _tile_tags(segment.num_tiles)[1:])
            out.append(head + body + tail)
        return "".join(out)

    def min_text_tokens(self, texts: Sequence[str], limit: int) -> int:
        """At least how many tokens `texts` take, tokenizing no more than needed to compare with `limit`.

        For deciding whether a request can fit its context before building it, at a cost that
        grows with `limit`, not with the texts (30 MB of text is refused at once, where
        tokenizing it whole takes seconds and gigabytes).

        1. No token holds more characters than `max_token_chars`, so `ceil(chars / max_token_chars)`
           is a bound, returned without tokenizing when it already passes `limit`.
        2. Otherwise the texts are tokenized in pieces of 65,536 characters, stopping as soon as
           the count passes `limit`; 8 tokens are allowed per cut between pieces.

        A text counted alone may differ by a token at its edges from its count inside a prompt,
        which the layout's own tokens (at least 2 per message) make up for.

        Args:
            texts: the message texts.
            limit: the most tokens the caller can accept.

        Returns:
            A count that is more than `limit` only if the texts take more than `limit` tokens.
        """
        chars = sum(len(text) for text in texts)
        bound = -(-chars // self.max_token_chars)
        if bound > limit:
            return bound
        count = 0
        for text in texts:
            for start in range(0, len(text), _COUNT_CHUNK_CHARS):
                count += len(self._encode(text[start : start + _COUNT_CHUNK_CHARS]))
                if start + _COUNT_CHUNK_CHARS < len(text):
                    count -= _TOKENS_PER_CUT
                if count > limit:
                    return count
        return max(count, bound)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token can hold: the longest vocabulary entry (128 for Qwen2.5, spaces).

        Byte-level vocabulary entries are one character per byte, and every character of a text
        is at least one byte of its tokens.
        """
        return max(max(map(len, self.tokenizer.get_vocab()), default=1), 1)

    # --- 1. validate, 2. lay out in the dialect ------------------------------------------

    def _segments(self, messages: Sequence[PromptMessage], add_generation_prompt: bool,
                  continue_final: bool = False) -> list[str | ImageSlot]:
        system_message, turns = validate_conversation(messages, add_generation_prompt, continue_final)
        # A leading system message wins over the builder's system prompt. Its text parts are
        # joined the way each dialect joins text parts: verbatim (reference), "\n" (vLLM).
        joiner = "" if self.dialect is PromptDialect.REFERENCE else "\n"
        system = self.system_prompt if system_message is None else joiner.join(_texts(system_message))
        if self.dialect is PromptDialect.REFERENCE:
            segments = _reference_segments(system, turns, add_generation_prompt)
            # Continuing: the final assistant turn stays open, without its "<|im_end|>".
            return segments[:-1] if continue_final else segments
        return self._vllm_segments(system, turns, add_generation_prompt, continue_final)

    def _vllm_segments(
        self, system: str | None, turns: list[PromptMessage], add_generation_prompt: bool, continue_final: bool
    ) -> list[str | ImageSlot]:
        # vLLM writes a literal "<image>" per image and the template copies message contents
        # verbatim. Random markers no user can guess stand in for the images and the message
        # texts, so the rendered prompt can be cut into the template's own text (searched for
        # control tokens), message texts (never searched) and image slots. vLLM itself would
        # take a typed "<image>" for a placeholder and a typed "<|im_end|>" for the control token.
        nonce = secrets.token_hex(16)
        image_marker = f"<image-{nonce}>"
        texts: list[str] = []
        conversation: list[dict[str, str]] = []  # as vLLM renders it
        marked: list[dict[str, str]] = []  # the same with markers for the texts

        def add(role: str, placeholders: list[str], text: str) -> None:
            marked.append({"role": role, "content": "\n".join([*placeholders, f"<text{len(texts)}-{nonce}>"])})
            conversation.append({"role": role, "content": "\n".join([*placeholders, text])})
            texts.append(text)

        if system is not None:  # None: the template writes its own default system turn
            add("system", [], system)
        slots: list[ImageSlot] = []
        for message in turns:
            images = [part for part in message.parts if isinstance(part, ImageSlot)]
            slots += images
            # vLLM joins a message's text parts with "\n" and puts the placeholders of its
            # images first, "\n"-joined before the text: "<image>\n<image>\nText".
            add(message.role, [image_marker] * len(images), "\n".join(_texts(message)))
        pieces = re.split(f"<(image|text\\d+)-{nonce}>", self._apply_template(marked, add_generation_prompt))
        segments: list[str | ImageSlot] = []
        kept = 0  # image placeholders found
        final_text_end = 0  # where the last message text ends among the segments
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                segments += self._template_text(piece)
            elif piece == "image":
                segments += slots[kept : kept + 1]
                kept += 1
            else:
                segments.append(texts[int(piece[len("text") :])])
                final_text_end = len(segments)
        if kept != len(slots):
            raise PromptError(
                f"the chat template kept {kept} of {len(slots)} image placeholders; "
                "it must copy message contents verbatim. Use PromptDialect.REFERENCE or fix the template."
            )
        rendered = "".join(image_marker if isinstance(seg, ImageSlot) else seg for seg in segments)
        if rendered != self._apply_template(conversation, add_generation_prompt):
            raise PromptError(
                "the chat template changes message texts (trims or escapes them, say); it must copy "
                "message contents verbatim. Use PromptDialect.REFERENCE or fix the template."
            )
        # Continuing: cut after the final message's text, as transformers' continue_final_message
        # does for a template that keeps contents verbatim (also right for an empty final text).
        return segments[:final_text_end] if continue_final else segments

    def _apply_template(self, conversation: list[dict[str, str]], add_generation_prompt: bool) -> str:
        rendered = self.tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert isinstance(rendered, str)  # tokenize=False returns the text
        return rendered

    def _template_text(self, text: str) -> list[str]:
        """The template's own text, with the control tokens it writes marked as such."""
        out: list[str] = []
        position = 0
        for match in self._controls.finditer(text):
            out += [text[position : match.start()], _Control(match.group())]
            position = match.end()
        out.append(text[position:])
        return out

    # --- 3. tokenize ---------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        # Text, never control tokens: special tokens are not matched (non-special added tokens
        # such as <tool_call> still are, as in the reference).
        if not text:
            return []
        if self._literal is None:
            return list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
        return self._literal.encode(text, add_special_tokens=False).ids

    def _image_body_ids(self, num_tiles: int) -> tuple[int, ...]:
        # P <tile_2> P ... <tile_global_thumbnail> P: the tags sit between pads, so they are
        # tokenized alone, which is what the whole string gives too.
        body = self._body_ids.get(num_tiles)
        if body is None:
            pads = [self.special.vision_pad] * self.tokens_per_tile
            ids = list(pads)
            for tag in _tile_tags(num_tiles)[1:]:
                ids += self._encode(tag) + pads
            body = self._body_ids[num_tiles] = tuple(ids)
        return body


def _control_ids(tokenizer: PreTrainedTokenizerBase, special: SpecialTokens) -> dict[str, int]:
    """Control tokens by content: every special added token (a chat template may write any) and
    the four the engine relies on, whatever their flag."""
    ids = {token.content: token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special}
    ids.update(
        {IM_START: special.im_start, IM_END: special.im_end, ENDOFTEXT: special.endoftext, VISION_PAD: special.vision_pad}
    )
    return ids


# One literal copy per tokenizer, shared by its builders (weak: it goes with the tokenizer).
_LITERAL_BACKENDS: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, Tokenizer] = weakref.WeakKeyDictionary()
_LITERAL_LOCK = threading.Lock()


def _literal_backend(tokenizer: PreTrainedTokenizerBase) -> Tokenizer | None:
    """A copy of the fast tokenizer's backend that never matches special tokens; None for a slow tokenizer.

    transformers' `encode(..., split_special_tokens=True)` sets a flag on the shared Rust backend
    and leaves it set, so callers in other threads would flip each other's tokenization. A
    private copy with the flag set for good is safe to share (0.6 s and ~20 MB for Qwen2.5, once).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        return None  # a slow tokenizer reads split_special_tokens per call
    with _LITERAL_LOCK:
        literal = _LITERAL_BACKENDS.get(tokenizer)
        if literal is None:
            literal = Tokenizer.from_str(backend.to_str())
            literal.encode_special_tokens = True
            literal.no_truncation()  # whatever a caller of the wrapper had left set
            literal.no_padding()
            _LITERAL_BACKENDS[tokenizer] = literal
    return literal


def _tile_tags(num_tiles: int) -> list[str]:
    # Reference: <tile_1>..<tile_{N-1}> for the grid tiles, then the thumbnail; a one-tile
    # image has no grid tags and its single tile is tagged as the thumbnail.
    return [f"<tile_{k}>" for k in range(1, num_tiles)] + ["<tile_global_thumbnail>"]


def _image_head_tail(num_tiles: int) -> tuple[str, str]:
    # The text before an image's first pad and after its last one. BPE merges across their
    # edges ("Image-1: <Image>" has " <", "<Image><tile_1>" has "><", "</Image>\nQ" has ">\n"),
    # so each is tokenized together with the text beside it, never alone.
    return "<Image>" + _tile_tags(num_tiles)[0], "</Image>"


def _reference_segments(
    system: str | None, turns: list[PromptMessage], add_generation_prompt: bool
) -> list[str | ImageSlot]:
    # The card's chat(): FastChat-style "chatml" template, MPT separator style, so each turn
    # is role + message + "<|im_end|>" with no newline after it.
    if system is None:
        system = DEFAULT_SYSTEM_PROMPT
    segments: list[str | ImageSlot] = []
    if system:  # "" means no system turn at all
        segments += [_Control(IM_START), f"system\n{system}", _Control(IM_END)]
    for message in turns:
        segments += [_Control(IM_START), f"{message.role}\n"]
        num_images = sum(isinstance(part, ImageSlot) for part in message.parts)
        k = 0
        for part in message.parts:
            if isinstance(part, str):
                segments.append(part)
                continue
            # "<image>\n" for one image, as chat() prepends it; "Image-k: <image>\n" for several,
            # the card's multi-image layout, numbered within the message.
            k += 1
            segments += ["" if num_images == 1 else f"Image-{k}: ", part, "\n"]
        segments.append(_Control(IM_END))
    if add_generation_prompt:
        segments += [_Control(IM_START), "assistant\n"]
    return segments


def _texts(message: PromptMessage) -> list[str]:
    return [part for part in message.parts if isinstance(part, str)]
