"""OpenAI chat messages -> engine messages, under the server's image policy.

The policy is the server's security boundary for images: data URLs always; http(s) URLs only
when the operator allows fetching, only from allow-listed hosts and public addresses, checked
on every redirect by the engine's `FetchPolicy`, with size and time limits; local paths and
`file://` URLs never (a client must not make the server read its own disk). Where the fetches
run (their own pool, one deadline per request) is `fetching.py`'s business.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from nvlm_engine import NVLMError, load_image
from nvlm_engine.chat import render_tool_calls
from nvlm_engine.errors import ImageDecodeError, ImageOptionsError, ImageURLRefusedError
from nvlm_engine.fetch import FetchPolicy, fetch_url

from .schemas import ImagePart, Message


class RequestRejected(NVLMError):
    """A request the server refuses, with the HTTP status and OpenAI error code to answer with."""

    def __init__(self, message: str, *, status: int = 400, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


@dataclass(frozen=True)
class ServerImagePolicy:
    """What image sources the server accepts.

    Attributes:
        allow_url_fetch: fetch http(s) image URLs at all.
        allowed_hosts: host names or IP literals (exact, or a suffix starting with "." for
            subdomains) that may be fetched, on every redirect too; empty with
            allow_url_fetch means any host.
        max_image_bytes: largest encoded image accepted, inline or fetched.
        fetch_timeout_s: time limit of all of one request's image fetches together, waiting
            for a fetch worker included.
        max_images: images per request at most.
        allow_private_addresses: let URLs and their redirects reach loopback, private,
            link-local and other non-public addresses (an IP literal listed in
            allowed_hosts is allowed without it).
        max_redirects: redirects followed per image URL at most.
        fetch_workers: threads that fetch image URLs, shared by all requests; a request that
            finds them busy for most of its deadline is answered 503.
    """

    allow_url_fetch: bool = False
    allowed_hosts: tuple[str, ...] = ()
    max_image_bytes: int = 20 * 2**20
    fetch_timeout_s: float = 10.0
    max_images: int = 8
    allow_private_addresses: bool = False
    max_redirects: int = 3
    fetch_workers: int = 8

    def __post_init__(self) -> None:
        if self.fetch_workers < 1 or not self.fetch_timeout_s > 0:
            raise ImageOptionsError(
                f"ServerImagePolicy needs fetch_workers >= 1 and fetch_timeout_s > 0; got fetch_workers={self.fetch_workers}, "
                f"fetch_timeout_s={self.fetch_timeout_s}"
            )
        self.fetch_policy  # noqa: B018 - validates allowed_hosts and max_redirects now, not at the first fetch

    @property
    def fetch_policy(self) -> FetchPolicy:
        """The engine's per-hop URL policy for these settings."""
        return FetchPolicy(allowed_hosts=self.allowed_hosts, allow_private_addresses=self.allow_private_addresses,
                           max_redirects=self.max_redirects)


def image_urls(messages: list[Message], policy: ServerImagePolicy) -> list[str]:
    """The request's http(s) image URLs, each once, after the checks that need no network.

    Raises:
        RequestRejected: too many images, URL fetching off, or a URL the policy refuses as written.
    """
    urls: list[str] = []
    images = 0
    for number, message in enumerate(messages):
        for part in message.content if isinstance(message.content, list) else []:
            if not isinstance(part, ImagePart):
                continue
            images += 1
            if images > policy.max_images:
                raise RequestRejected(f"at most {policy.max_images} images per request", param=f"messages[{number}]",
                                      code="too_many_images")
            url = part.image_url.url
            if urlsplit(url).scheme.lower() in ("http", "https"):
                _check_fetchable(url, policy)
                if url not in urls:
                    urls.append(url)
    return urls


def openai_to_engine_messages(messages: list[Message], policy: ServerImagePolicy,
                       fetched: Mapping[str, bytes] | None = None) -> list[dict[str, Any]]:
    """Convert and check; tool turns are rendered the Qwen2.5 (Hermes) way.

    Args:
        messages: the request's messages.
        policy: the image policy.
        fetched: bodies of the request's image URLs, already fetched (see `fetching.py`);
            a URL missing here is fetched now, in the calling thread.
    """
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
                    parts.append({"type": "image", "image": resolve_image(part.image_url.url, policy, fetched)})
                else:
                    parts.append({"type": "text", "text": part.text})
        if role == "assistant" and message.tool_calls:
            content = "".join(p["text"] for p in parts if p["type"] == "text")
            calls = [{"name": c.function.name, "args": _arguments(c.function.arguments)} for c in message.tool_calls]
            parts = [{"type": "text", "text": render_tool_calls(content, calls)}]
        if not parts:
            parts.append({"type": "text", "text": ""})
        out.append({"role": role, "content": parts})
    for message in out:
        message.pop("_tool", None)
    return out


def resolve_image(url: str, policy: ServerImagePolicy, fetched: Mapping[str, bytes] | None = None) -> bytes | Any:
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
        _check_fetchable(url, policy)
        data = fetched.get(url) if fetched else None
        if data is None:
            data = fetch_image(url, policy)
        try:
            return load_image(data, max_bytes=policy.max_image_bytes)
        except ImageDecodeError as e:
            # The engine's message would name "bytes"; this one names the URL, and never the bytes.
            raise ImageDecodeError(f"the image at {url!r} cannot be decoded: it is not an image Pillow can read, "
                                   "or it is corrupt; check the URL or send the image inline") from e
    raise RequestRejected("image_url must be a data URL (or an http(s) URL where the operator allows it); "
                          "local paths and other schemes are refused", code="invalid_image_url")


def fetch_image(url: str, policy: ServerImagePolicy, deadline: float | None = None) -> bytes:
    """The body behind an image URL, under the policy on every hop; a refusal is a `RequestRejected`."""
    try:
        return fetch_url(url, policy.fetch_policy, max_bytes=policy.max_image_bytes, timeout_s=policy.fetch_timeout_s,
                         deadline=deadline)
    except ImageURLRefusedError as e:
        raise RequestRejected(str(e), code="image_url_not_allowed") from e


def _check_fetchable(url: str, policy: ServerImagePolicy) -> None:
    """The checks of the URL as written; the fetcher repeats them, and checks addresses, on every hop."""
    if not policy.allow_url_fetch:
        raise RequestRejected("this server does not fetch image URLs; send the image inline as a data URL",
                              code="image_url_not_allowed")
    try:
        host = urlsplit(url).hostname or ""
    except ValueError as e:
        raise RequestRejected(f"malformed image URL {url!r}", code="invalid_image_url") from e
    if not policy.fetch_policy.host_allowed(host):
        raise RequestRejected(f"image host {host!r} is not in this server's allowlist", code="image_url_not_allowed")


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
