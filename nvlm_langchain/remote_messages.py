"""LangChain messages -> OpenAI chat-completions messages, for `ChatNVLM`'s remote backend.

Content blocks are read by `messages.py`, one message at a time, exactly as for the local
model (every image form LangChain has, PDFs rendered to page images, a message's images put
before its text); this module writes the result the OpenAI way:

- Images become data URLs, the one form both nvlm-serve (by default) and vLLM (without
  `--allowed-local-media-path`) accept. Files, `file://` URLs, base64 and data URLs are read
  here, on the client; http(s) URLs too, with the engine's size- and time-limited fetcher,
  and only with `allow_url_fetch=True`, the local model's rule: the server never opens a
  connection on a user's behalf, and a URL that works locally works remotely.
- System messages are merged into one leading system message (NVLM-D's prompt has one
  system turn, as locally); the caller's default system text is sent when there is none.
- An AIMessage's `tool_calls` become OpenAI `tool_calls` (arguments as a JSON string) and
  ToolMessages become `tool` messages. OpenAI tool messages carry text only, so images a tool
  returned follow the run of tool messages as one user message (locally they sit inside the
  `<tool_response>` block).

Knows nothing of HTTP, the server, or the answer.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, FunctionMessage, HumanMessage, ToolMessage
from PIL import Image

from nvlm_engine.errors import ImageDecodeError
from nvlm_engine.fetch import FetchPolicy
from nvlm_engine.images import DEFAULT_FETCH_TIMEOUT_S, DEFAULT_MAX_BYTES, read_source

from .messages import ContentOptions, Conversation, to_engine_messages

__all__ = ["image_data_url", "to_openai_messages"]

OpenAIMessage = dict[str, Any]
_BASE64_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


def to_openai_messages(
    messages: Sequence[BaseMessage],
    options: ContentOptions,
    *,
    allow_url_fetch: bool,
    default_system: str | None,
    fetch_policy: FetchPolicy | None = None,
) -> list[OpenAIMessage]:
    """Converts a LangChain conversation (see the module docstring).

    Args:
        messages: the conversation.
        options: how content blocks are read (the chat model's `content_options()`).
        allow_url_fetch: fetch http(s) image URLs here (else they are refused, as locally).
        default_system: the system text sent when the conversation has none (None: none).
        fetch_policy: which hosts and addresses a fetch may reach (default: public addresses only).

    Raises:
        UnsupportedContentError: a block NVLM-D cannot read (named with its message number).
        ValueError: an unknown message role.
        nvlm_engine.ImageError: an image that cannot be read, or a URL while fetching is off.
    """
    fetch = (fetch_policy or FetchPolicy()) if allow_url_fetch else None
    systems: list[str] = []
    out: list[OpenAIMessage] = []
    tool_images: list[dict[str, Any]] = []
    for number, message in enumerate(messages):
        if isinstance(message, (ToolMessage, FunctionMessage)):
            text, images = _tool_result(message, number, options, fetch)
            call_id = getattr(message, "tool_call_id", None) or getattr(message, "name", None) or ""
            out.append({"role": "tool", "tool_call_id": call_id, "content": text})
            tool_images += images
            continue
        if tool_images:
            out.append({"role": "user", "content": tool_images})
            tool_images = []
        if isinstance(message, AIMessage):
            out.append(_assistant(message, number, options))
            continue
        conversation = _read(message, number, options)
        if conversation.system is not None:
            systems.append(conversation.system)
        out += [_turn(turn, fetch) for turn in conversation.turns]
    if tool_images:
        out.append({"role": "user", "content": tool_images})
    system = "\n\n".join(systems) if systems else default_system
    return out if system is None else [{"role": "system", "content": system}, *out]


def image_data_url(source: str | Image.Image, *, allow_url_fetch: bool, fetch_policy: FetchPolicy | None = None) -> str:
    """An image source as `messages.py` gives it (path, URL, data URL, PIL page) -> a base64 data URL.

    The encoded bytes are sent as they are (no re-encoding, so the server decodes exactly the
    file the user gave); only the header is read here, for the MIME type and to refuse
    non-images before they are sent.
    """
    if isinstance(source, Image.Image):  # a rendered PDF page
        buffer = io.BytesIO()
        source.save(buffer, format="PNG")
        return _data_url(buffer.getvalue(), "image/png")
    if _BASE64_DATA_URL.match(source[:64].lstrip()):
        return source.strip()
    data, label = read_source(source, allow_url_fetch=allow_url_fetch, max_bytes=DEFAULT_MAX_BYTES,
                              fetch_timeout_s=DEFAULT_FETCH_TIMEOUT_S, fetch_policy=fetch_policy)
    return _data_url(data, _mime_type(data, label))


# --- per role ------------------------------------------------------------------------------


def _read(message: BaseMessage, number: int, options: ContentOptions) -> Conversation:
    """`messages.py`'s reading of one message; its errors say which message of the conversation."""
    try:
        return to_engine_messages([message], options)
    except ValueError as e:  # UnsupportedContentError included: it counted this message as "message 0"
        raise type(e)(re.sub(r"^message 0\b", f"message {number}", str(e))) from e


def _turn(turn: dict[str, Any], fetch: FetchPolicy | None) -> OpenAIMessage:
    content = turn["content"]
    if isinstance(content, str):
        return {"role": turn["role"], "content": content}
    if all(p["type"] == "text" for p in content):  # plain text: a string, which every server reads
        return {"role": turn["role"], "content": "".join(p["text"] for p in content)}
    return {"role": turn["role"], "content": [_part(p, fetch) for p in content]}


def _part(part: dict[str, Any], fetch: FetchPolicy | None) -> dict[str, Any]:
    if part["type"] == "text":
        return {"type": "text", "text": part["text"]}
    return {"type": "image_url", "image_url": {"url": image_data_url(part["image"], allow_url_fetch=fetch is not None, fetch_policy=fetch)}}


def _assistant(message: AIMessage, number: int, options: ContentOptions) -> OpenAIMessage:
    # The text as messages.py reads it, without the calls it would render into the text.
    text = _read(message.model_copy(update={"tool_calls": []}), number, options).turns[0]["content"]
    if not message.tool_calls:
        return {"role": "assistant", "content": text}
    calls = [
        {"id": call.get("id") or f"call_{number}_{i}", "type": "function",
         "function": {"name": call["name"], "arguments": json.dumps(call.get("args") or {}, ensure_ascii=False)}}
        for i, call in enumerate(message.tool_calls)
    ]
    return {"role": "assistant", "content": text or None, "tool_calls": calls}


def _tool_result(message: BaseMessage, number: int, options: ContentOptions,
                 fetch: FetchPolicy | None) -> tuple[str, list[dict[str, Any]]]:
    """A tool result's text (its text blocks, one per line, as locally) and its images as OpenAI parts."""
    try:
        (turn,) = to_engine_messages([HumanMessage(content=message.content)], options).turns
    except ValueError as e:
        raise type(e)(re.sub(r"^message 0 \(human\)", f"message {number} ({message.type})", str(e))) from e
    text = "\n".join(p["text"] for p in turn["content"] if p["type"] == "text")
    images = [_part(p, fetch) for p in turn["content"] if p["type"] == "image"]
    return text, images


# --- images --------------------------------------------------------------------------------


def _mime_type(data: bytes, label: str) -> str:
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            kind = image.format or ""
    except Exception as e:  # Pillow raises many kinds for unreadable data
        raise ImageDecodeError(f"{label} is not a readable image ({type(e).__name__}: {e}); "
                               "re-save it as PNG or JPEG") from e
    return Image.MIME.get(kind) or f"image/{kind.lower() or 'png'}"


def _data_url(data: bytes, mime_type: str) -> str:
    return f"data:{mime_type};base64,{base64.b64encode(data).decode('ascii')}"
