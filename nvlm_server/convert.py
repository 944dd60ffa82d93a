"""OpenAI chat messages -> engine messages, under the server's image policy.

The policy is the server's security boundary for images: data URLs always; http(s) URLs only
when the operator allows fetching, only from allow-listed hosts, with size and time limits;
local paths and `file://` URLs never (a client must not make the server read its own disk).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from nvlm_engine import NVLMError, load_image

from .schemas import ImagePart, Message


class RequestRejected(NVLMError):
    """A request the server refuses, with the HTTP status and OpenAI error code to answer with."""

    def __init__(self, message: str, *, status: int = 400, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


@dataclass(frozen=True)
class ImagePolicy:
    """What image sources the server accepts.

    Attributes:
        allow_url_fetch: fetch http(s) image URLs at all.
        allowed_hosts: host names (exact, or a suffix starting with "." for subdomains) that
            may be fetched; empty with allow_url_fetch means any host.
        max_image_bytes: largest encoded image accepted, inline or fetched.
        fetch_timeout_s: time limit of one fetch.
        max_images: images per request at most.
    """

    allow_url_fetch: bool = False
    allowed_hosts: tuple[str, ...] = ()
    max_image_bytes: int = 20 * 2**20
    fetch_timeout_s: float = 10.0
    max_images: int = 8


def to_engine_messages(messages: list[Message], policy: ImagePolicy) -> list[dict[str, Any]]:
    """Convert and check; tool turns are rendered the Qwen2.5 (Hermes) way."""
    out: list[dict[str, Any]] = []
    images = 0
    for number, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if role == "tool":
            text = f"<tool_response>\n{_text_of(message)}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("_tool"):
                out[-1]["content"].append({"type": "text", "text": "\n" + text})
            else:
                out.append({"role": "user", "content": [{"type": "text", "text": text}], "_tool": True})
            continue
        parts: list[dict[str, Any]] = []
        if isinstance(message.content, str):
            parts.append({"type": "text", "text": message.content})
        elif message.content:
            for part in message.content:
                if isinstance(part, ImagePart):
                    images += 1
                    if images > policy.max_images:
                        raise RequestRejected(f"at most {policy.max_images} images per request", param=f"messages[{number}]",
                                              code="too_many_images")
                    parts.append({"type": "image", "image": resolve_image(part.image_url.url, policy)})
                else:
                    parts.append({"type": "text", "text": part.text})
        if role == "assistant" and message.tool_calls:
            from nvlm_langchain.tool_calls import render_tool_calls

            content = "".join(p["text"] for p in parts if p["type"] == "text")
            calls = [{"name": c.function.name, "args": _arguments(c.function.arguments)} for c in message.tool_calls]
            parts = [{"type": "text", "text": render_tool_calls(content, calls)}]
        if not parts:
            parts.append({"type": "text", "text": ""})
        out.append({"role": role, "content": parts})
    for message in out:
        message.pop("_tool", None)
    return out


def resolve_image(url: str, policy: ImagePolicy) -> bytes | Any:
    """Bytes of a data URL, or a fetched PIL image for an allowed http(s) URL; anything else is refused."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header or not header[5:].startswith("image/"):
            raise RequestRejected("image data URLs must look like data:image/<type>;base64,<data>", code="invalid_image_url")
        if len(payload) * 3 // 4 > policy.max_image_bytes:
            raise RequestRejected(f"inline image larger than {policy.max_image_bytes} bytes", status=413,
                                  code="image_too_large")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestRejected("image data URL is not valid base64", code="invalid_image_url") from e
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        if not policy.allow_url_fetch:
            raise RequestRejected("this server does not fetch image URLs; send the image inline as a data URL",
                                  code="image_url_not_allowed")
        host = (urlsplit(url).hostname or "").lower()
        if policy.allowed_hosts and not any(host == h or (h.startswith(".") and host.endswith(h)) for h in policy.allowed_hosts):
            raise RequestRejected(f"image host {host!r} is not in this server's allowlist", code="image_url_not_allowed")
        return load_image(url, allow_url_fetch=True, max_bytes=policy.max_image_bytes, fetch_timeout_s=policy.fetch_timeout_s)
    raise RequestRejected("image_url must be a data URL (or an http(s) URL where the operator allows it); "
                          "local paths and other schemes are refused", code="invalid_image_url")


def _arguments(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise RequestRejected(f"a tool call's arguments are not JSON: {e}", param="messages") from e
    if not isinstance(value, dict):
        raise RequestRejected("a tool call's arguments must be a JSON object", param="messages")
    return value


def _text_of(message: Message) -> str:
    if isinstance(message.content, str):
        return message.content
    return "".join(p.text for p in message.content or [] if not isinstance(p, ImagePart))
