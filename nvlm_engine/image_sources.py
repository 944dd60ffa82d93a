"""Where an image's bytes come from: a path or `file://` URL, bytes, base64, a data URL, or (only
when allowed, under a `FetchPolicy`) an http(s) URL; each bounded by `max_bytes` before or while
reading. Knows nothing of decoding (see `images.py`).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import urllib.parse
import urllib.request
from pathlib import Path

from nvlm_engine.errors import ImageDecodeError, ImageSourceError, ImageTooLargeError
from nvlm_engine.fetch import FetchPolicy, fetch_url

__all__ = ["read_source"]

_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def read_source(
    source: object,
    *,
    allow_url_fetch: bool,
    max_bytes: int,
    fetch_timeout_s: float,
    fetch_policy: FetchPolicy | None = None,
) -> tuple[bytes, str]:
    """The encoded bytes of an image source (path, bytes, base64, data or http(s) URL) and a label naming it.

    The same source rules, limits and URL policy as `load_image`, without decoding: for callers
    that must look at the bytes first (a PDF, say).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = f"bytes ({len(data)} bytes)"
        _check_byte_count(len(data), max_bytes, label)
        return data, label
    if isinstance(source, os.PathLike):
        return _read_file(Path(os.fsdecode(os.fspath(source))), max_bytes)
    if not isinstance(source, str):
        raise ImageSourceError(
            f"cannot read an image from a {type(source).__name__}: expected a path, bytes, "
            "base64 text, a data: URL, an http(s) URL or a PIL image"
        )

    head = source[:64].lstrip()[:16].lower()  # a base64 source can be megabytes long
    if head.startswith(("http://", "https://")):
        url = source.strip()
        if not allow_url_fetch:
            raise ImageSourceError(
                f"refusing to fetch {url!r}: URL fetching is off; pass allow_url_fetch=True "
                "if the URL comes from a trusted source, or download the image and pass the bytes"
            )
        data = fetch_url(url, fetch_policy or FetchPolicy(), max_bytes=max_bytes, timeout_s=fetch_timeout_s)
        # No Content-Type or other response text in the label: it reaches error messages.
        return data, f"URL {url!r}"
    if head.startswith("data:"):
        return _read_data_url(source.strip(), max_bytes)
    if head.startswith("file:"):
        return _read_file(_file_url_to_path(source.strip()), max_bytes)
    if _URL_SCHEME.match(head):
        raise ImageSourceError(
            f"unsupported URL scheme in {_shorten(source)}: expected http://, https://, file:// or data:"
        )
    if os.path.exists(source):
        return _read_file(Path(source), max_bytes)
    return _read_base64(source, max_bytes)


def _read_file(path: Path, max_bytes: int) -> tuple[bytes, str]:
    label = f"file {str(path)!r}"
    try:
        if not path.is_file():
            what = "not a regular file" if path.exists() else "not found"
            raise ImageSourceError(f"image {label} is {what} (working directory {os.getcwd()!r})")
        # Checked before reading so that a huge file is refused without touching its bytes.
        _check_byte_count(path.stat().st_size, max_bytes, label)
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise ImageSourceError(f"cannot read image {label}: {e.strerror or e}") from e
    _check_byte_count(len(data), max_bytes, label)  # the file may have grown meanwhile
    return data, label


def _file_url_to_path(url: str) -> Path:
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ImageSourceError(
            f"file URL {url!r} names host {parsed.netloc!r}: only local files (file:///path) are supported"
        )
    return Path(urllib.request.url2pathname(parsed.path))


def _read_data_url(url: str, max_bytes: int) -> tuple[bytes, str]:
    header, comma, payload = url.partition(",")
    label = f"data URL ({header[:60]}, {len(payload)} chars)"
    if not comma:
        raise ImageSourceError(f"malformed {label}: expected 'data:image/<type>;base64,<data>'")
    if header.lower().endswith(";base64"):
        data = _strict_b64decode(payload)
        if data is None:
            raise ImageDecodeError(f"{label} does not hold valid base64 after the comma; re-encode the image")
    else:
        # RFC 2397 also allows percent-encoded payloads; rare for images but cheap to accept.
        data = urllib.parse.unquote_to_bytes(payload)
    _check_byte_count(len(data), max_bytes, label)
    return data, label


def _read_base64(text: str, max_bytes: int) -> tuple[bytes, str]:
    label = f"base64 text ({len(text)} chars)"
    data = _strict_b64decode(text)
    if data is None:
        raise ImageSourceError(
            f"{_shorten(text)} is neither an existing file nor base64; pass the path of an existing "
            "file, base64 of the image file, a data: URL or the bytes"
        )
    _check_byte_count(len(data), max_bytes, label)
    # Valid base64 can still be a mistyped path ("/data/images" is valid base64): say both.
    return data, f"{label}, not an existing file"


def _strict_b64decode(text: str) -> bytes | None:
    """Decode base64 strictly; None when it is not base64 (or decodes to nothing)."""
    # MIME-style base64 wraps lines: whitespace is dropped, any other stray character fails.
    compact = "".join(text.split())
    try:
        return base64.b64decode(compact, validate=True) or None
    except (binascii.Error, ValueError):
        return None


def _check_byte_count(n: int, max_bytes: int, label: str) -> None:
    if n > max_bytes:
        raise ImageTooLargeError(
            f"{label} has {n:,} bytes or more, above max_bytes={max_bytes} ({max_bytes / 2**20:.1f} MiB); "
            "downscale or recompress the image, or raise max_bytes if you trust it"
        )


def _shorten(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
