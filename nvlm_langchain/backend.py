"""The `Backend` protocol: what `ChatNVLM` asks of where its model runs, and `backend_for` to pick one.

A `ChatNVLM` is one class over two backends, chosen by `base_url` in one place
(`backend_for`): `LocalBackend` (`local_backend.py`, the in-process engine's chat service)
and `RemoteBackend` (`remote_backend.py`, an OpenAI-compatible server through the openai
client). Both turn a call into the same `ChatGenerationChunk`s (the last one carrying usage,
metadata and, when asked, logprobs); `ChatNVLM` aggregates them for `invoke`, so there is one
code path per backend and sync/async pair. Backends hold no state: every method takes the
chat model, so a `model_copy` (with another api_key, max_tokens, ...) is read afresh.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Generator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGenerationChunk
from langchain_core.runnables import RunnableConfig

if TYPE_CHECKING:
    from nvlm_engine import NVLMEngine

    from .chat_models import ChatNVLM

__all__ = ["Backend", "backend_for"]


class Backend(Protocol):
    """Where a `ChatNVLM`'s calls run."""

    mode: str
    """The mode in words, for warnings ("with base_url (a remote model)")."""
    foreign_fields: frozenset[str]
    """Fields only the other backend reads: setting one warns, and serialization drops them."""
    submits_batches: bool
    """`batch`/`abatch` are the backend's own (all requests queued at once) rather than LangChain's."""

    def check(self, chat: ChatNVLM) -> None:
        """Construction-time checks of this backend's fields (raises ValueError)."""

    def stream(self, chat: ChatNVLM, messages: list[BaseMessage], stop: list[str] | None,
               kwargs: dict[str, Any]) -> Generator[ChatGenerationChunk, None, None]:
        """One call's answer as chunks; closing the iterator early cancels the request."""

    def astream(self, chat: ChatNVLM, messages: list[BaseMessage], stop: list[str] | None,
                kwargs: dict[str, Any]) -> AsyncGenerator[ChatGenerationChunk, None]:
        """The async `stream` (an async generator: `aclose()` or a cancelled task cancels the request)."""

    def batch(self, chat: ChatNVLM, inputs: list[LanguageModelInput], configs: list[RunnableConfig],
              return_exceptions: bool, kwargs: dict[str, Any]) -> list[AIMessage | Exception]:
        """All inputs at once (only called when `submits_batches`)."""

    async def abatch(self, chat: ChatNVLM, inputs: list[LanguageModelInput], configs: list[RunnableConfig],
                     return_exceptions: bool, kwargs: dict[str, Any]) -> list[AIMessage | Exception]:
        """The async `batch`."""

    def engine(self, chat: ChatNVLM, progress: Callable[[Path, int, int], None] | None = None, *,
               what: str = "engine") -> NVLMEngine:
        """The local engine (loading it); a remote backend raises `RemoteError` naming `what` was asked."""

    def count_message_tokens(self, chat: ChatNVLM, messages: list[BaseMessage], tools: Sequence[Any] | None) -> int:
        """Prompt tokens of `messages` (exact locally, estimated remotely)."""

    def token_ids(self, chat: ChatNVLM, text: str) -> list[int]:
        """Token ids of `text`."""

    def num_tokens(self, chat: ChatNVLM, text: str) -> int | None:
        """Tokens in `text`, or None for LangChain's default (`len(get_token_ids(text))`)."""

    def profile(self, chat: ChatNVLM) -> ModelProfile | None:
        """The profile known at construction (None: none, or read later)."""

    def lazy_profile(self, chat: ChatNVLM) -> ModelProfile | None:
        """A profile read on first use (a server's `/models` entry), or None."""

    def identifying_params(self, chat: ChatNVLM) -> dict[str, Any]:
        """What identifies this model's answers (LangChain's cache key and traces)."""

    def display_name(self, chat: ChatNVLM, model: str | None = None) -> str:
        """The model's name in metadata and traces."""


def backend_for(base_url: str | None) -> Backend:
    """The one place `base_url` chooses a mode: a server with it, the local engine without."""
    if base_url is None:
        from .local_backend import LOCAL

        return LOCAL
    from .remote_backend import REMOTE

    return REMOTE
