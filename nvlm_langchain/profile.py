"""What a `ChatNVLM` can do, as LangChain's `ModelProfile`: known here for local weights, asked
of the server for a remote model.

Locally the profile is exact: the checkpoint's context length, PDFs when pypdfium2 is
installed, image URLs when fetching is allowed. Remotely it depends on the server, so
`ServerProfile` reads the model's entry of `GET {base_url}/models` on first use (never at
construction: building a ChatNVLM stays free), once per base URL and model per process:
`max_model_len` (vLLM's field, and nvlm-serve's) becomes `max_input_tokens`, and structured
output and PDFs (several images per prompt) are claimed only for nvlm-serve (`owned_by
"nvlm"`), which constrains JSON with its grammar and takes any number of images. Any other
server, or one that cannot be asked, gets the conservative profile: vLLM answers
`response_format` only with guided decoding enabled, and takes one image per prompt unless
started with `--limit-mm-per-prompt`.

Knows HTTP (httpx) and LangChain's profile keys; knows nothing of engines or chat models.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from langchain_core.language_models.model_profile import ModelProfile

__all__ = ["NVLM_SERVE_OWNER", "ServerProfile", "checkpoint_context_length", "local_profile", "server_model_entry"]

logger = logging.getLogger(__name__)

NVLM_SERVE_OWNER = "nvlm"
"""`owned_by` of nvlm-serve's /v1/models entries: the server known to do all NVLM-D can."""

PROFILE_TIMEOUT_S = 5.0
"""Seconds to wait for /models: a profile is read at run time (e.g. by create_agent), and an
unreachable server must not stall it for the openai client's 10 minutes."""


def _base(*, image_urls: bool, pdf: bool, structured: bool) -> ModelProfile:
    return ModelProfile(
        name="NVLM-D", open_weights=True, text_inputs=True, image_inputs=True,
        image_url_inputs=image_urls, pdf_inputs=pdf, audio_inputs=False, video_inputs=False,
        image_tool_message=True, pdf_tool_message=pdf, text_outputs=True, image_outputs=False,
        audio_outputs=False, video_outputs=False, reasoning_output=False, tool_calling=True, tool_choice=True,
        tool_call_streaming=True, structured_output=structured, temperature=True,
        mid_conversation_system_messages=False,
    )


def _pdf_reader() -> bool:
    return importlib.util.find_spec("pypdfium2") is not None


def local_profile(folder: str, *, context_length: int | None, allow_url_fetch: bool) -> ModelProfile:
    """The profile of weights run in this process (grammar-constrained tools and JSON, PDFs as page images)."""
    profile = _base(image_urls=allow_url_fetch, pdf=_pdf_reader(), structured=True)
    context = context_length or checkpoint_context_length(folder)
    if context:
        profile["max_input_tokens"] = context
    return profile


def checkpoint_context_length(folder: str) -> int | None:
    """`max_position_embeddings` from config.json, without loading anything else."""
    try:
        config = json.loads((Path(folder).expanduser() / "config.json").read_text())
        llm = config.get("llm_config") or config.get("text_config") or config
        return int(llm["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --- remote --------------------------------------------------------------------------------

_entries: dict[tuple[str, str], dict[str, Any]] = {}
_entries_lock = threading.Lock()


def server_model_entry(base_url: str, model: str, api_key: str | None) -> dict[str, Any] | None:
    """The server's /models entry for `model` (cached per process once read), or None when the
    server cannot be asked or does not list it."""
    key = (base_url.rstrip("/"), model)
    with _entries_lock:
        if key in _entries:
            return _entries[key]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        # A client of its own: module-level httpx.get may be patched by the application (or tests).
        with httpx.Client(timeout=PROFILE_TIMEOUT_S, follow_redirects=False) as client:
            response = client.get(f"{key[0]}/models", headers=headers)
        response.raise_for_status()
        listed = response.json().get("data") or []
    except (httpx.HTTPError, ValueError, AttributeError) as e:
        logger.warning("could not read %s/models for the model profile (%s); using the conservative profile",
                       key[0], e)
        return None
    entry = next((m for m in listed if isinstance(m, dict) and m.get("id") == model), None)
    if entry is None:
        logger.warning("%s/models does not list %r; using the conservative profile", key[0], model)
        return None
    with _entries_lock:
        _entries[key] = entry
    return entry


def remote_profile(entry: dict[str, Any] | None, *, allow_url_fetch: bool) -> ModelProfile:
    """A server's profile from its /models entry (None: unknown server, conservative claims)."""
    full = entry is not None and entry.get("owned_by") == NVLM_SERVE_OWNER
    profile = _base(image_urls=allow_url_fetch, pdf=full and _pdf_reader(), structured=full)
    context = entry.get("max_model_len") if entry else None
    if isinstance(context, int) and context > 0:
        profile["max_input_tokens"] = context
    return profile


class ServerProfile(dict):  # type: ignore[type-arg]
    """A remote model's `ModelProfile`, read from the server on first use.

    A dict, as LangChain's profiles are; its keys and values appear when it is first read
    (`profile["max_input_tokens"]`, `.get`, `in`, iteration), which asks the server once.
    Until then it does no I/O, also not in `repr`.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None, *, allow_url_fetch: bool) -> None:
        super().__init__()
        self._source = (base_url, model, api_key)
        self._allow_url_fetch = allow_url_fetch
        self._resolved = False
        self._lock = threading.Lock()

    def _resolve(self) -> None:
        if self._resolved:
            return
        with self._lock:
            if not self._resolved:
                entry = server_model_entry(*self._source)
                super().update(remote_profile(entry, allow_url_fetch=self._allow_url_fetch))
                self._resolved = True

    def __getitem__(self, key: str) -> Any:
        self._resolve()
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self._resolve()
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self._resolve()
        return super().__contains__(key)

    def __iter__(self) -> Iterator[str]:
        self._resolve()
        return super().__iter__()

    def __len__(self) -> int:
        self._resolve()
        return super().__len__()

    def __bool__(self) -> bool:
        return True  # a profile exists, whatever the server says; no I/O for a truth test

    def __eq__(self, other: object) -> bool:
        self._resolve()
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]

    def keys(self) -> Any:
        self._resolve()
        return super().keys()

    def values(self) -> Any:
        self._resolve()
        return super().values()

    def items(self) -> Any:
        self._resolve()
        return super().items()

    def copy(self) -> dict[str, Any]:
        self._resolve()
        return dict(super().items())

    def __or__(self, other: Any) -> dict[str, Any]:
        return {**self.copy(), **other}

    def __reduce__(self) -> Any:  # copy/deepcopy/pickle: a plain dict of the resolved profile
        return (dict, (self.copy(),))

    def __repr__(self) -> str:
        if not self._resolved:
            return f"ServerProfile({self._source[0]!r}, {self._source[1]!r}, not read yet)"
        return super().__repr__()
