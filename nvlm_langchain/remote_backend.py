"""`ChatNVLM`'s remote backend: calls go to an OpenAI-compatible server (`remote.py`).

Every call, `invoke` included, is one streaming `chat.completions` request with
`stream_options.include_usage`, whose chunks `remote_responses.CompletionStream` translates
into the chunks a local answer makes (tool calls, usage, logprobs), so `ChatNVLM` aggregates
both backends' streams alike. There is no tokenizer here: token counts are estimates, and the
profile is read from the server's `/models` entry on first use (`profile.py`).
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Callable, Generator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.messages.utils import count_tokens_approximately
from langchain_core.outputs import ChatGenerationChunk
from langchain_core.runnables import RunnableConfig
from langchain_core.utils.function_calling import convert_to_openai_tool

from nvlm_engine import NVLMEngine

from . import remote
from .profile import ServerProfile

if TYPE_CHECKING:
    from .chat_models import ChatNVLM

__all__ = ["REMOTE", "RemoteBackend"]


class RemoteBackend:
    """An OpenAI-compatible server (see the module docstring); stateless, one instance (`REMOTE`)."""

    mode = "with base_url (a remote model)"
    foreign_fields = frozenset({"device_map", "dtype", "max_memory", "dialect", "max_tiles", "quantization",
                                "tensor_parallel", "compile", "batch_size", "revision", "download", "progress"})
    submits_batches = False  # LangChain's concurrent invokes; the server batches them

    def check(self, chat: ChatNVLM) -> None:
        if not str(chat.base_url).lower().startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL like http://host:8000/v1, got {chat.base_url!r}")

    def stream(self, chat: ChatNVLM, messages: list[BaseMessage], stop: list[str] | None,
               kwargs: dict[str, Any]) -> Generator[ChatGenerationChunk, None, None]:
        yield from remote.stream(chat, messages, stop, kwargs)

    async def astream(self, chat: ChatNVLM, messages: list[BaseMessage], stop: list[str] | None,
                      kwargs: dict[str, Any]) -> AsyncGenerator[ChatGenerationChunk, None]:
        async with aclosing(remote.astream(chat, messages, stop, kwargs)) as chunks:
            async for chunk in chunks:
                yield chunk

    def batch(self, chat: ChatNVLM, inputs: list[LanguageModelInput], configs: list[RunnableConfig],
              return_exceptions: bool, kwargs: dict[str, Any]) -> list[AIMessage | Exception]:
        raise NotImplementedError("remote batches are LangChain's concurrent invokes (submits_batches is False)")

    async def abatch(self, chat: ChatNVLM, inputs: list[LanguageModelInput], configs: list[RunnableConfig],
                     return_exceptions: bool, kwargs: dict[str, Any]) -> list[AIMessage | Exception]:
        raise NotImplementedError("remote batches are LangChain's concurrent invokes (submits_batches is False)")

    def engine(self, chat: ChatNVLM, progress: Callable[[Path, int, int], None] | None = None, *,
               what: str = "engine") -> NVLMEngine:
        raise _local_only(chat, what)

    def count_message_tokens(self, chat: ChatNVLM, messages: list[BaseMessage], tools: Sequence[Any] | None) -> int:
        # No tokenizer here: LangChain's estimate (4 characters a token, 85 per image).
        return count_tokens_approximately(messages, tools=[convert_to_openai_tool(t) for t in tools or ()] or None)

    def token_ids(self, chat: ChatNVLM, text: str) -> list[int]:
        if chat.custom_get_token_ids is not None:
            return chat.custom_get_token_ids(text)
        raise _local_only(chat, "get_token_ids (the tokenizer)")

    def num_tokens(self, chat: ChatNVLM, text: str) -> int | None:
        return math.ceil(len(text) / 4) if chat.custom_get_token_ids is None else None

    def profile(self, chat: ChatNVLM) -> ModelProfile | None:
        # None keeps LangChain's construction-time key check from asking the server: the
        # profile is read on first use instead (`lazy_profile`).
        return None

    def lazy_profile(self, chat: ChatNVLM) -> ModelProfile | None:
        assert chat.base_url is not None
        key = chat.api_key.get_secret_value() if chat.api_key is not None else None
        return ServerProfile(chat.base_url, chat.model, key, allow_url_fetch=chat.allow_url_fetch)  # type: ignore[return-value]

    def identifying_params(self, chat: ChatNVLM) -> dict[str, Any]:
        # The server decides placement and prompt layout.
        return {
            "model": chat.model, "base_url": chat.base_url, "temperature": chat.temperature, "top_p": chat.top_p,
            "top_k": chat.top_k, "max_tokens": chat.max_tokens, "seed": chat.seed, "stop": chat.stop,
            "repetition_penalty": chat.repetition_penalty, "presence_penalty": chat.presence_penalty,
            "frequency_penalty": chat.frequency_penalty,
        }

    def display_name(self, chat: ChatNVLM, model: str | None = None) -> str:
        return model or chat.model  # the served name, as given


REMOTE = RemoteBackend()


def _local_only(chat: ChatNVLM, what: str) -> remote.RemoteError:
    return remote.RemoteError(
        f"{what} needs local weights; this ChatNVLM answers through {chat.base_url} (base_url). "
        "Build ChatNVLM(model=<checkpoint folder>) without base_url to run the model here."
    )
