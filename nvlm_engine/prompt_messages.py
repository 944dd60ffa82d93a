"""Chat turns as the prompt builder takes them: text parts and image slots, and their checks.

Pure data and validation: knows the roles and the order rules of a conversation NVLM-D
accepts, nothing of tokenizers or layouts (those are `prompts.py`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from nvlm_engine.errors import PromptError
from nvlm_engine.tokenizer import VISION_PAD

__all__ = [
    "ImageSlot",
    "Prompt",
    "PromptDialect",
    "PromptMessage",
    "check_text",
    "parse_chat_messages",
    "validate_conversation",
]

_ROLES = ("system", "user", "assistant")

@dataclass(frozen=True)
class ImageSlot:
    """Where one image goes in a message, and how many feature tiles it has.

    Attributes:
        num_tiles: tiles of the image including the thumbnail; 1 means a one-tile image,
            which has no thumbnail (so 7 = a 6-tile grid plus its thumbnail).
    """

    num_tiles: int

    def __post_init__(self) -> None:
        if isinstance(self.num_tiles, bool) or not isinstance(self.num_tiles, int) or self.num_tiles < 1:
            raise PromptError(f"ImageSlot.num_tiles must be an int >= 1, got {self.num_tiles!r}")


@dataclass(frozen=True)
class PromptMessage:
    """One chat turn.

    Attributes:
        role: "system", "user" or "assistant".
        parts: text and images in order. Only user messages may hold images.
    """

    role: Literal["system", "user", "assistant"]
    parts: tuple[str | ImageSlot, ...]


class PromptDialect(str, enum.Enum):
    """Which published prompt layout to reproduce."""

    REFERENCE = "reference"
    """The HF model card's `chat()`: ChatML with MPT separators, no newline after `<|im_end|>`."""
    VLLM = "vllm"
    """vLLM's OpenAI server: the tokenizer's Qwen2.5 `chat_template`, newline after `<|im_end|>`."""


@dataclass(frozen=True)
class Prompt:
    """A tokenized prompt.

    Attributes:
        token_ids: prompt ids, no BOS; ends with `<|im_start|>assistant\\n` when a generation
            prompt was asked for.
        image_token_count: number of `<|vision_pad|>` ids, which must equal the number of
            image feature rows merged into the embeddings (sum of num_tiles x tokens per tile).
        num_images: number of image slots.
    """

    token_ids: list[int]
    image_token_count: int
    num_images: int


def validate_conversation(
    messages: Sequence[PromptMessage], add_generation_prompt: bool, continue_final_message: bool = False
) -> tuple[PromptMessage | None, list[PromptMessage]]:
    """Checks the conversation; returns the leading system message (or None) and the other turns.

    `continue_final_message` (the prompt ends inside the final assistant turn, which the model
    continues) needs a final assistant message and no generation prompt.
    """
    if isinstance(messages, (str, PromptMessage)) or not isinstance(messages, Sequence):
        raise PromptError(f"messages must be a sequence of PromptMessage, got {type(messages).__name__}")
    if not messages:
        raise PromptError("the conversation is empty: pass at least one user message")
    for i, message in enumerate(messages):
        if not isinstance(message, PromptMessage):
            raise PromptError(f"message {i} must be a PromptMessage, got {type(message).__name__}")
        if message.role not in _ROLES:
            raise PromptError(f"message {i} has role {message.role!r}; expected one of {list(_ROLES)}")
        if isinstance(message.parts, str) or not isinstance(message.parts, Sequence):
            raise PromptError(
                f"message {i}: parts must be a tuple of str and ImageSlot, got {type(message.parts).__name__}; "
                "wrap a single text as parts=(text,)"
            )
        for j, part in enumerate(message.parts):
            if isinstance(part, str):
                check_text(part, f"message {i} part {j}")
            elif not isinstance(part, ImageSlot):
                raise PromptError(f"message {i} part {j} must be a str or an ImageSlot, got {type(part).__name__}")
            elif message.role != "user":
                raise PromptError(
                    f"message {i} is a {message.role} message with an image; only user messages take images"
                )
        if message.role == "system" and i > 0:
            raise PromptError(f"message {i} is a system message; a system message may only come first")
        if message.role == "user" and not message.parts:
            raise PromptError(f"message {i} is a user message without parts")

    turns = list(messages)
    system = turns.pop(0) if turns[0].role == "system" else None
    if not turns:
        raise PromptError("the conversation has only a system message: add a user message")
    if continue_final_message:
        if add_generation_prompt:
            raise PromptError(
                "continue_final_message=True and add_generation_prompt=True contradict each other: "
                "the first continues the final assistant turn, the second opens a new one; pass one"
            )
        if turns[-1].role != "assistant":
            raise PromptError(
                f"continue_final_message=True needs the conversation to end with an assistant message "
                f"(the text to continue); it ends with a {turns[-1].role} message"
            )
    elif add_generation_prompt and turns[-1].role == "assistant":
        raise PromptError(
            "the conversation ends with an assistant message while add_generation_prompt=True; "
            "end with a user message, pass add_generation_prompt=False, or continue_final_message=True "
            "to have the model continue that message"
        )
    return system, turns


def check_text(text: str, where: str) -> None:
    # A typed "<|vision_pad|>" would tokenize to the pad id and shift every image feature
    # after it; the reference would accept it and fail (or misalign) in the embedding merge.
    if VISION_PAD in text:
        raise PromptError(f"{where} contains {VISION_PAD!r}, which is reserved for image features; remove it")


def parse_chat_messages(messages: Sequence[Mapping[str, Any]]) -> tuple[list[tuple[str, list[str | None]]], list[Any]]:
    """Engine messages (`{"role", "content": str | parts}`) -> (role, parts with None where an image
    goes) per turn, and the image sources in order; a malformed message is a `PromptError`."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise PromptError("messages must be a list of {'role': ..., 'content': ...} dicts.")
    turns: list[tuple[str, list[str | None]]] = []
    sources: list[Any] = []
    for number, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise PromptError(f"message {number} must be a dict with 'role' and 'content', got {message!r:.80}.")
        content = message["content"]
        parts: list[str | None] = []
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, Sequence):
            for part in content:
                kind = part.get("type") if isinstance(part, Mapping) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append(part["text"])
                elif kind == "image" and part.get("image") is not None:
                    parts.append(None)
                    sources.append(part["image"])
                elif kind == "image_url" and isinstance(part.get("image_url"), (Mapping, str)):
                    url = part["image_url"]
                    parts.append(None)
                    sources.append(url.get("url") if isinstance(url, Mapping) else url)
                else:
                    raise PromptError(
                        f"message {number} has an unsupported content part {part!r:.80}; use "
                        "{'type': 'text', 'text': ...} or {'type': 'image', 'image': <source>}."
                    )
        else:
            raise PromptError(f"message {number} content must be a string or a list of parts.")
        turns.append((str(message["role"]), parts))
    return turns, sources
