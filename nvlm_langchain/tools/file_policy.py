"""Which files a tool caller may name: the document tools' `FilePolicy`.

The `image` argument of a document tool is written by the calling model, and a model's
arguments are untrusted: an instruction hidden in any document it read is enough to make it
ask for `/etc/passwd` or `/proc/self/environ`. Like vLLM's `--allowed-local-media-path`, a
tool reads local files only under one folder the application names (`root_dir`, none by
default), checked after symlinks and `..` are resolved. http(s) URLs stay behind the tools'
`allow_url_fetch`; `data:` URLs and base64 carry their bytes in the argument and name no file.

A refusal quotes the argument as the model wrote it and says how the application allows
access; it never shows what a path resolves to, whether it exists, its size or its bytes, so
refusals cannot be used to explore the disk. Documents the application names itself (a tool's
`document=`, a direct `load_pages` call, ChatNVLM message blocks) do not go through here.

Knows nothing of models, PDFs or images.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import DocumentInputError

__all__ = ["FilePolicy"]

# The engine reader's notion of a URL: `scheme://`. Anything else ("notes:v2.png") is a path.
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_PATH_MAX = 4096  # Linux's PATH_MAX: longer text is not a path (and realpath on megabytes is slow)
_HOW_TO_ALLOW = (
    "the application can allow a folder with NVLMDocumentToolkit(root_dir=...) (or the tool's root_dir=), "
    "or bind one file with document=...; an inline document works as a data: URL or base64"
)


@dataclass(frozen=True)
class FilePolicy:
    """The local files an untrusted `image` argument may name.

    Attributes:
        root_dir: the folder whose files (and subfolders' files) may be read, or None to read
            no local file. Relative paths are taken from it, not from the working directory.
            Stored resolved (symlinks followed), so it compares with resolved paths.
    """

    root_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.root_dir is None:
            return
        root = Path(os.path.realpath(os.fspath(self.root_dir)))
        if not root.is_dir():
            raise ValueError(f"root_dir={os.fspath(self.root_dir)!r} is not an existing folder")
        object.__setattr__(self, "root_dir", root)

    def admit(self, source: str) -> str | Path | bytes:
        """What to read for `source`, checked before any file is opened.

        Returns:
            the resolved `Path` of a file under `root_dir`, the bytes of base64 text (decoded
            here so that no reader looks the text up as a file name), or the URL unchanged
            (`data:`, http(s): the reader applies its own URL rules).

        Raises:
            DocumentInputError: a local file while no root is set, a path outside the root, a
                missing file under the root, a `file:` URL naming another host.
        """
        text = source.strip()
        head = text[:16].lower()
        if head.startswith(("http://", "https://", "data:")):
            return text
        if head.startswith("file:"):
            return self._local(_file_url_path(text, source), source)
        if _URL_SCHEME.match(head):
            return text  # the reader refuses schemes it does not know, opening nothing
        # A path or base64 text: a file under the root wins, as the reader prefers a file.
        path = self._resolve(text)
        if path is not None and path.is_file():
            return path
        data = _strict_b64decode(text)
        if data is not None:
            return data
        return self._local(text, source)

    def _resolve(self, path_text: str) -> Path | None:
        """The real path of `path_text` if it lies within the root, else None (nothing is opened)."""
        if self.root_dir is None or not path_text or "\0" in path_text or len(path_text) > _PATH_MAX:
            return None
        resolved = Path(os.path.realpath(os.path.join(self.root_dir, path_text)))
        return resolved if resolved == self.root_dir or self.root_dir in resolved.parents else None

    def _local(self, path_text: str, source: str) -> Path:
        shown = _shorten(source)
        if self.root_dir is None:
            raise DocumentInputError(f"cannot read {shown}: this tool reads no local files; {_HOW_TO_ALLOW}")
        path = self._resolve(path_text)
        if path is None:
            raise DocumentInputError(
                f"cannot read {shown}: it is outside the folder this tool may read ({str(self.root_dir)!r}); "
                f"name a file under it, relative to it or absolute (set by the application's root_dir=)"
            )
        if not path.is_file():
            raise DocumentInputError(
                f"cannot read {shown}: no such file under {str(self.root_dir)!r} (the folder this tool may "
                "read, set by root_dir=); check the name"
            )
        return path


def _file_url_path(url: str, source: str) -> str:
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise DocumentInputError(f"cannot read {_shorten(source)}: file URLs must name a local file (file:///path)")
    return urllib.request.url2pathname(parsed.path)


def _strict_b64decode(text: str) -> bytes | None:
    """Base64 decoded strictly (line breaks allowed); None when it is not base64."""
    try:
        return base64.b64decode("".join(text.split()), validate=True) or None
    except (binascii.Error, ValueError):
        return None


def _shorten(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
