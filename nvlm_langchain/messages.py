"""LangChain messages -> the engine's chat messages (roles system / user / assistant; text and images).

Content is read through `BaseMessage.content_blocks`, LangChain's own normalisation, so every
dialect users write arrives here in one shape: standard image blocks (`url`, `base64` +
`mime_type`), OpenAI `image_url` parts (http or data URLs), the older `source_type` blocks and
Anthropic `source` blocks. Local files work as a path or a `file://` URL in `url`. PDFs
(standard `file` blocks, OpenAI `file` parts, Anthropic `document` blocks) become one image per
page, rendered by `pdf.py` (pypdfium2, the optional `pdf` extra) with the document tools'
limits on bytes, pages and pixels per page. Local paths are allowed here (messages are the
application's input, not a model's), but errors never quote a file's bytes. Audio, video and
other files are refused with a `ValueError` naming the block.

Tool traffic is written the Qwen2.5 way (see `nvlm_engine.chat.tool_calls`): an AIMessage's `tool_calls` as
`<tool_call>` blocks in its assistant turn, and a run of ToolMessages as one user turn of
`<tool_response>` blocks, their images included. System messages are merged into the leading
system turn, which is returned apart so the caller can add the tools block to it.

Knows nothing of the model or the engine's prompt layout.
"""

from __future__ import annotations

import base64
import binascii
import os
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from PIL import Image

from nvlm_engine.chat.tool_calls import TOOL_RESPONSE_END, TOOL_RESPONSE_START, render_tool_calls

from . import pdf
from .pdf import PDFError, PDFLimitError, PDFPageLimitError, check_byte_count, read_pdf_file, render_pdf

__all__ = ["ContentOptions", "Conversation", "UnsupportedContentError", "to_engine_messages"]

EngineMessage = dict[str, Any]
Part = dict[str, Any]

# Blocks an assistant turn may carry that are not part of what the model wrote as text:
# reasoning traces and provider-specific tool-use echoes (the calls come from `tool_calls`).
_SKIPPED_IN_ASSISTANT = {"reasoning", "tool_call", "tool_call_chunk", "invalid_tool_call", "server_tool_call",
                         "server_tool_call_chunk", "server_tool_result", "citation"}
_SKIPPED_NON_STANDARD = {"thinking", "redacted_thinking", "tool_use", "tool_result"}


class UnsupportedContentError(ValueError):
    """A content block NVLM-D cannot read (audio, video, a non-image non-PDF file, ...)."""


@dataclass(frozen=True)
class ContentOptions:
    """How content blocks become engine parts.

    Attributes:
        images_first: put a user message's images before its text: the layout NVLM-D was
            trained and evaluated with (`<image>\\n{question}`). A message with text between
            two images keeps its order, as does every message when this is False.
        pdf_dpi: resolution PDF pages are rendered at.
        pdf_max_pages: PDFs with more pages are refused (each page is an image of 1-7 tiles).
        pdf_max_bytes: larger PDFs are refused; a file is measured before it is read.
        pdf_max_page_pixels: a page that would render larger at `pdf_dpi` renders at the
            highest resolution within this budget.
        The PDF limits are the document tools' (see `nvlm_langchain.pdf`).
    """

    images_first: bool = True
    pdf_dpi: float = float(pdf.DEFAULT_DPI)
    pdf_max_pages: int = pdf.DEFAULT_MAX_PAGES
    pdf_max_bytes: int = pdf.DEFAULT_MAX_BYTES
    pdf_max_page_pixels: int = pdf.DEFAULT_MAX_PAGE_PIXELS


@dataclass(frozen=True)
class Conversation:
    """The system text (None: no system message given) and the other turns, in engine form."""

    system: str | None
    turns: list[EngineMessage]

    def messages(self, system: str | None) -> list[EngineMessage]:
        head = [] if system is None else [{"role": "system", "content": system}]
        return head + self.turns


def to_engine_messages(messages: Sequence[BaseMessage], options: ContentOptions = ContentOptions()) -> Conversation:
    """Converts a LangChain conversation.

    Raises:
        UnsupportedContentError: a block the model cannot read, or an image in an assistant turn.
        ValueError: an unknown message role.
    """
    systems: list[str] = []
    turns: list[EngineMessage] = []
    tool_run: list[BaseMessage] = []
    for number, message in enumerate(messages):
        role = _role(message, number)
        if role == "tool":
            tool_run.append(message)
            continue
        if tool_run:
            turns.append(_tool_turn(tool_run, options))
            tool_run = []
        if role == "system":
            systems.append(_text_only(message, number, "system"))
        elif role == "user":
            turns.append({"role": "user", "content": _user_parts(message, number, options)})
        else:
            turns.append({"role": "assistant", "content": _assistant_text(message, number)})
    if tool_run:
        turns.append(_tool_turn(tool_run, options))
    return Conversation(system="\n\n".join(systems) if systems else None, turns=turns)


# --- per role ------------------------------------------------------------------------------


def _role(message: BaseMessage, number: int) -> str:
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, HumanMessage):
        return "user"
    if isinstance(message, AIMessage):
        return "assistant"
    if isinstance(message, (ToolMessage, FunctionMessage)):
        return "tool"
    if isinstance(message, ChatMessage):
        role = {"human": "user", "ai": "assistant", "developer": "system"}.get(message.role, message.role)
        if role in ("system", "user", "assistant", "tool"):
            return role
    raise ValueError(
        f"message {number} is a {type(message).__name__} with role {getattr(message, 'role', message.type)!r}; "
        "ChatNVLM reads system, human, ai and tool messages"
    )


def _user_parts(message: BaseMessage, number: int, options: ContentOptions) -> list[Part]:
    parts = _parts(message, number, options)
    if options.images_first and not _interleaved(parts):
        parts = [p for p in parts if p["type"] == "image"] + [p for p in parts if p["type"] == "text"]
    return _merge_texts(parts) or [{"type": "text", "text": ""}]


def _interleaved(parts: list[Part]) -> bool:
    """Text between two images: the user laid the message out on purpose ("A: <img> B: <img>")."""
    kinds = "".join("i" if p["type"] == "image" else "t" for p in parts)
    return "i" in kinds and "t" in kinds[kinds.index("i") : kinds.rindex("i")]


def _assistant_text(message: BaseMessage, number: int) -> str:
    texts = []
    for block in message.content_blocks:
        kind = block.get("type")
        if kind == "text":
            texts.append(block["text"])
        elif kind in _SKIPPED_IN_ASSISTANT or _non_standard_kind(block) in _SKIPPED_NON_STANDARD:
            continue
        elif kind in ("image", "file"):
            raise UnsupportedContentError(
                f"message {number} (ai) holds an {kind} block; NVLM-D reads images in human and tool messages only"
            )
        else:
            raise UnsupportedContentError(f"message {number} (ai) holds a {_describe(block)} block NVLM-D cannot read")
    calls = message.tool_calls if isinstance(message, AIMessage) else []
    return render_tool_calls("".join(texts), calls)


def _tool_turn(run: list[BaseMessage], options: ContentOptions) -> EngineMessage:
    # One user turn of <tool_response> blocks, each holding its result's images, then its text.
    parts: list[Part] = []
    for i, message in enumerate(run):
        inner = _parts(message, -1, options)
        text = "\n".join(p["text"] for p in inner if p["type"] == "text")
        parts.append({"type": "text", "text": ("\n" if i else "") + TOOL_RESPONSE_START + "\n"})
        parts += [p for p in inner if p["type"] == "image"]
        parts.append({"type": "text", "text": f"{text}\n{TOOL_RESPONSE_END}"})
    return {"role": "user", "content": _merge_texts(parts, joiner="")}


def _text_only(message: BaseMessage, number: int, role: str) -> str:
    texts = []
    for block in message.content_blocks:
        if block.get("type") not in ("text", "text-plain"):
            raise UnsupportedContentError(f"message {number} ({role}) holds a {_describe(block)} block; it takes text only")
        texts.append(block.get("text", ""))
    return "".join(texts)


# --- blocks -> parts -------------------------------------------------------------------------


def _parts(message: BaseMessage, number: int, options: ContentOptions) -> list[Part]:
    parts: list[Part] = []
    for block in message.content_blocks:
        kind = block.get("type")
        if kind == "text" or kind == "text-plain" and isinstance(block.get("text"), str):
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image" or kind == "file" and str(block.get("mime_type", "")).startswith("image/"):
            parts.append({"type": "image", "image": _image_source(block, number)})
        elif kind == "file" and block.get("mime_type") == "application/pdf":
            parts += [{"type": "image", "image": page} for page in _pdf_pages(block, number, options)]
        elif kind == "non_standard" and _openai_image_url(block) is not None:
            parts.append({"type": "image", "image": _openai_image_url(block)})
        elif kind in _SKIPPED_IN_ASSISTANT or _non_standard_kind(block) in _SKIPPED_NON_STANDARD:
            continue  # e.g. a tool_use echo in a tool message
        else:
            where = f"message {number} ({message.type})" if number >= 0 else f"a {message.type} message"
            raise UnsupportedContentError(
                f"{where} holds a {_describe(block)} block; NVLM-D reads text, images (url, base64, "
                "data URL, path) and PDFs"
            )
    return parts


def _image_source(block: dict[str, Any], number: int) -> str:
    if block.get("base64"):
        mime = block.get("mime_type") or "image/png"
        return f"data:{mime};base64,{block['base64']}"
    if block.get("url"):
        return str(block["url"])  # http(s), data:, file:// or a local path: the engine reads them all
    if block.get("path"):
        return os.fspath(block["path"])
    raise UnsupportedContentError(
        f"message {number} has an image block without url or base64 ({_describe(block)}); files uploaded to a "
        "provider (file_id) cannot be read by a local model: pass the image itself"
    )


def _pdf_pages(block: dict[str, Any], number: int, options: ContentOptions) -> list[Image.Image]:
    # The document tools' renderer and limits (pdf.py); bytes are measured before they are read.
    try:
        data = _pdf_bytes(block, number, options.pdf_max_bytes)
        pages = render_pdf(
            data,
            dpi=options.pdf_dpi,
            max_pages=options.pdf_max_pages,
            max_page_pixels=options.pdf_max_page_pixels,
        )
    except ImportError as e:
        raise UnsupportedContentError(
            f"message {number} holds a PDF; reading PDFs needs pypdfium2: pip install 'nvlm-langchain[pdf]'"
        ) from e
    except PDFPageLimitError as e:
        raise UnsupportedContentError(
            f"message {number} holds a PDF of {e.page_count} pages; ChatNVLM reads at most "
            f"{e.max_pages} (pdf_max_pages): split it or raise the limit"
        ) from e
    except PDFLimitError as e:
        raise UnsupportedContentError(f"message {number} holds a PDF over a limit: {e}") from e
    except PDFError as e:
        raise UnsupportedContentError(f"message {number} holds a PDF that cannot be opened or rendered: {e}") from e
    return [page.image for page in pages]


def _pdf_bytes(block: dict[str, Any], number: int, max_bytes: int) -> bytes:
    # Inline data is already in the caller's memory: it is checked once decoded. A file is
    # measured with stat before a byte of it is read.
    if block.get("base64"):
        try:
            data = base64.b64decode(block["base64"], validate=True)
        except (binascii.Error, ValueError) as e:
            raise UnsupportedContentError(f"message {number} holds a PDF whose base64 is invalid") from e
        check_byte_count(len(data), max_bytes, "the base64 PDF", "pdf_max_bytes")
        return data
    url = str(block.get("url") or block.get("path") or "")
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        try:
            data = base64.b64decode(payload) if header.endswith(";base64") else urllib.parse.unquote_to_bytes(payload)
        except (binascii.Error, ValueError) as e:
            raise UnsupportedContentError(f"message {number} holds a PDF data URL whose base64 is invalid") from e
        check_byte_count(len(data), max_bytes, "the PDF data URL", "pdf_max_bytes")
        return data
    if url.startswith("file:"):
        url = urllib.request.url2pathname(urllib.parse.urlparse(url).path)
    if url and "://" not in url:
        return read_pdf_file(url, max_bytes, limit_name="pdf_max_bytes")
    raise UnsupportedContentError(
        f"message {number} holds a PDF at {url[:80]!r}; pass it as base64, a data URL or a local path"
    )


def _openai_image_url(block: dict[str, Any]) -> str | None:
    # {"type": "image_url", "image_url": "<url>"}: the string form LangChain leaves as non_standard.
    value = block.get("value")
    if isinstance(value, dict) and value.get("type") == "image_url" and isinstance(value.get("image_url"), str):
        return value["image_url"]
    return None


def _non_standard_kind(block: dict[str, Any]) -> str | None:
    value = block.get("value")
    return value.get("type") if block.get("type") == "non_standard" and isinstance(value, dict) else None


def _describe(block: dict[str, Any]) -> str:
    kind = _non_standard_kind(block) or block.get("type")
    mime = block.get("mime_type")
    return f"{kind!r} ({mime})" if mime else repr(kind)


def _merge_texts(parts: list[Part], joiner: str = "\n") -> list[Part]:
    merged: list[Part] = []
    for part in parts:
        if part["type"] == "text" and merged and merged[-1]["type"] == "text":
            merged[-1] = {"type": "text", "text": merged[-1]["text"] + joiner + part["text"]}
        else:
            merged.append(part)
    return merged

