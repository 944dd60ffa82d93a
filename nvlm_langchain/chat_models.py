"""`ChatNVLM`: NVIDIA's NVLM-D as a LangChain chat model, run in-process from its checkpoint
or, with `base_url`, on an OpenAI-compatible server (nvlm-serve, or vLLM serving NVLM-D).

This module is the LangChain surface: fields, the generate / stream hooks (sync and async),
batching, tools, structured output, tracing parameters, token counting and the profile. The
work is done beside it: `requests.py` turns a call into an engine request, `responses.py`
turns engine output into messages, `engines.py` loads each checkpoint once per process and
runs all its decoding on one continuous-batching scheduler (so concurrent calls from any
threads or tasks share decode steps), `jobs.py` submits a `batch`'s inputs together;
`remote.py` does a call on a server instead, when `base_url` is set.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import math
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.globals import get_llm_cache
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.load.serializable import SerializedConstructor, SerializedNotImplemented
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.messages.utils import count_tokens_approximately
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import get_config_list, get_executor_for_config, run_in_executor
from langchain_core.tools import BaseTool
from langchain_core.utils import secret_from_env
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator

from nvlm_engine import GenerationResult, NVLMEngine
from nvlm_engine.chat import normalize_tool_choice
from nvlm_engine.chat.logprobs import openai_logprobs
from nvlm_engine.sampling import DEFAULT_MAX_NEW_TOKENS, make_options
from nvlm_engine.scheduler import RequestHandle

from . import remote
from .call_plan import CallPlan, compose_call, plan_call
from .engines import EngineSpec, get_engine
from .jobs import arun_batch, run_batch, take_ticket
from .messages import ContentOptions
from .profile import ServerProfile, local_profile
from .responses import ResponseStream
from .structured import Method, structured_output

__all__ = ["ChatNVLM"]

logger = logging.getLogger(__name__)


class ChatNVLM(BaseChatModel):
    """NVLM-D (InternViT-6B + Qwen2-72B) as a chat model, on your own GPUs or CPU.

    Construction is free: the checkpoint loads on the first call, once per process, and is
    shared by every `ChatNVLM` on the same folder and placement.

    Setup:
        `pip install nvlm-langchain` (add `[pdf]` to read PDFs), then download the weights:
        `huggingface-cli download nvidia/NVLM-D-72B --local-dir /models/NVLM-D-72B`.

    Invoke, with images in any LangChain form (standard blocks, OpenAI `image_url`, Anthropic
    `source`, data URLs, local paths), several per message, in any turn:
        ```python
        from langchain_core.messages import HumanMessage
        from nvlm_langchain import ChatNVLM

        llm = ChatNVLM(model="/models/NVLM-D-72B", max_tokens=512)
        llm.invoke([HumanMessage([{"type": "image", "url": "/data/chart.png"},
                                  {"type": "text", "text": "What is the highest bar?"}])])
        for chunk in llm.stream("Tell me about InternViT."):
            print(chunk.text, end="")
        ```

    Tools (Qwen2.5 / Hermes format; `tool_choice="any"` or a tool name constrains decoding so
    the answer is a valid call) and structured output (grammar-constrained JSON):
        ```python
        llm.bind_tools([get_weather], tool_choice="any").invoke("Weather in Paris?").tool_calls
        llm.with_structured_output(Invoice).invoke([HumanMessage([image_block, "Extract the invoice."])])
        ```

    Per-call options: `temperature`, `top_p`, `top_k`, `max_tokens`, `seed`,
    `repetition_penalty`, `max_tiles`, `model` (another checkpoint folder), `stop`.

    As ChatOpenAI: the constructor takes its spellings (`model_name`, `max_completion_tokens`,
    `stop_sequences`, `request_timeout`, one `stop` string), and refuses an argument no field
    reads, naming the nearest field (there is no `model_kwargs` pass-through: a local engine has
    nowhere to send one). Answers carry `response_metadata["model_provider"] == "nvlm"` and the
    model's name (a checkpoint folder's name, not its path); `generate` returns `llm_output`
    with `token_usage`. `dumpd` / `loads(..., valid_namespaces=["nvlm_langchain"],
    allowed_objects=[ChatNVLM])` round-trip a model, its API key as the NVLM_API_KEY secret.
    The remote `profile` is read from the server's `/models` entry on first use (`profile.py`).

    Remote (`pip install 'nvlm-langchain[remote]'`): with `base_url`, calls go to an
    OpenAI-compatible server, nvlm-serve or vLLM serving NVLM-D, and `model` is the served
    model name. The same calls work (images, streaming with usage, batch, tools, structured
    output, where the server supports them); images are sent as data URLs, and vLLM's NVLM-D
    quirks are handled (`top_p` always sent, the model card's system prompt by default):
        ```python
        llm = ChatNVLM(base_url="http://gpu-host:8000/v1", model="nvidia/NVLM-D-72B")  # key: NVLM_API_KEY
        ```
    """

    model: str = Field(alias="model_name",
                       description="The checkpoint folder (e.g. a download of nvidia/NVLM-D-72B), or with "
                                   "base_url the model name the server serves. Alias: model_name.")

    # --- remote: an OpenAI-compatible server instead of local weights ---
    base_url: str | None = None
    """The server's OpenAI API root, e.g. "http://gpu-host:8000/v1" (nvlm-serve, or vLLM serving NVLM-D).
    Set, calls go there (see `remote.py`) and the placement fields below do not apply."""
    api_key: SecretStr | None = Field(default_factory=secret_from_env("NVLM_API_KEY", default=None))
    """The server's bearer token; default from the NVLM_API_KEY environment variable (never OPENAI_API_KEY)."""
    timeout: float | None = Field(default=None, alias="request_timeout")
    """Seconds to wait for the server: to connect, and for each read of its answer (a whole answer
    when not streaming); None is the openai client's default (10 minutes)."""
    max_retries: int = 2
    """Retries of connection errors, timeouts, 429 and 5xx answers, with backoff (the openai client's)."""

    # --- which weights, where (these make the engine key) ---
    device_map: str | list[str] | dict[str, Any] | None = "auto"
    """"auto" (the GPUs if any, else the CPU), a device, a list of devices, or a module->device map."""
    dtype: str | None = None
    """Compute dtype; None is bfloat16 on GPU and float32 on CPU."""
    max_memory: dict[str | int, int | str] | None = None
    """Per-device memory budget used to split layers, e.g. {0: "70GiB", 1: "80GiB"}."""
    context_length: int | None = None
    """Longest prompt + answer; None is the checkpoint's (32,768 for NVLM-D)."""

    # --- how requests are read ---
    dialect: Literal["reference", "vllm"] = "reference"
    """Prompt layout: the model card's `chat()` ("reference") or vLLM's server ("vllm")."""
    max_tiles: int | None = None
    """Tile budget per request, shared by its images; None is the checkpoint's rule (6 // n images)."""
    allow_url_fetch: bool = False
    """Fetch http(s) image URLs (size- and time-limited). Off: pass bytes, base64 or paths."""
    allow_private_image_hosts: bool = False
    """Let URL fetches reach loopback, private and link-local addresses (an intranet image host).
    Off, every hop of a fetch must resolve to a public address."""
    images_first: bool = True
    """Put a message's images before its text, the layout NVLM-D was trained with."""
    pdf_dpi: float = 144.0
    pdf_max_pages: int = 8

    # --- generation ---
    temperature: float | None = 0.0
    """0 is greedy decoding, the model card's setting; None means that default too."""
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = Field(default=None, alias="max_completion_tokens")
    """Answer length limit, >= 1; None is the model card's 1,024. Alias: max_completion_tokens."""
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    """Strings that end the answer (one string or a list). Alias: stop_sequences."""
    seed: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    """In [-2, 2]: subtracted once from the logit of each token already generated (OpenAI's rule)."""
    frequency_penalty: float | None = None
    """In [-2, 2]: subtracted from a token's logit once per time it was generated (OpenAI's rule)."""
    logprobs: bool | None = None
    """Return each answer token's log-probability in `response_metadata["logprobs"]` (ChatOpenAI's shape)."""
    top_logprobs: int | None = None
    """0..20 likeliest alternatives per token, with `logprobs`."""
    streaming: bool = False
    """Make `invoke` stream internally (callbacks get tokens); `stream` always streams."""

    # Fields by name or by alias (ChatOpenAI's spellings: model_name, max_completion_tokens, ...).
    model_config = ConfigDict(protected_namespaces=(), validate_by_name=True, validate_by_alias=True)

    # --- construction ------------------------------------------------------------------

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown_arguments(cls, values: Any) -> Any:
        # An argument no field reads would be silently dropped: a local engine has nowhere to
        # forward it (ChatOpenAI moves unknown ones into model_kwargs for its API; see below).
        if not isinstance(values, dict):
            return values
        known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
        unknown = sorted(k for k in values if k not in known)
        if not unknown:
            return values
        problems = []
        for name in unknown:
            if name == "model_kwargs":
                problems.append("model_kwargs (no pass-through: a local engine has nowhere to send it, and "
                                "every option ChatNVLM sends to a server is a field of its own)")
                continue
            close = difflib.get_close_matches(name, sorted(known), n=1)
            problems.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"ChatNVLM got unknown argument(s): {', '.join(problems)}")

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("temperature", mode="after")
    @classmethod
    def _no_temperature_is_the_default(cls, value: float | None) -> float:
        return 0.0 if value is None else value  # the model card's greedy decoding

    @field_validator("max_tokens", mode="after")
    @classmethod
    def _max_tokens_at_least_one(cls, value: int | None) -> int | None:
        if value is not None and value < 1:  # 0 used to mean the default, silently
            raise ValueError(f"max_tokens must be >= 1 (None is the model card's {DEFAULT_MAX_NEW_TOKENS}), got {value}")
        return value

    @model_validator(mode="after")
    def _warn_fields_of_the_other_mode(self) -> ChatNVLM:
        # Explicitly set fields only: a default (or the API key from the environment) says nothing.
        other = _REMOTE_ONLY if self.base_url is None else _LOCAL_ONLY
        ignored = sorted(self.model_fields_set & other)
        if ignored:
            mode = "without base_url (a local model)" if self.base_url is None else "with base_url (a remote model)"
            warnings.warn(f"ChatNVLM ignores {ignored} {mode}", UserWarning, stacklevel=4)
        if self.base_url is not None and not self.base_url.lower().startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL like http://host:8000/v1, got {self.base_url!r}")
        return self

    @model_validator(mode="after")
    def _check_options(self) -> ChatNVLM:
        try:  # the engine's own checks, now rather than at the first call
            make_options(max_new_tokens=self.default_max_tokens(), temperature=self.temperature, top_p=self.top_p,
                         top_k=self.top_k, repetition_penalty=self.repetition_penalty, seed=self.seed, stop=self.stop,
                         presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                         logprobs=self.logprobs, top_logprobs=self.top_logprobs)
        except Exception as e:
            raise ValueError(str(e)) from e
        if self.max_tiles is not None and self.max_tiles < 1:
            raise ValueError(f"max_tiles must be >= 1, got {self.max_tiles}")
        return self

    def engine_spec(self, model: str | None = None) -> EngineSpec:
        """The registry key of this model's weights (or of `model`, another folder, with the same placement)."""
        return EngineSpec(path=model or self.model, device_map=self.device_map, dtype=self.dtype,
                          max_memory=self.max_memory, context_length=self.context_length)

    @property
    def engine(self) -> NVLMEngine:
        """The engine this model runs on (loads the checkpoint on first access).

        Raises:
            remote.RemoteError: a remote model (`base_url` set) has no local engine.
        """
        self._require_local("engine")
        return get_engine(self.engine_spec()).engine(self.dialect)

    def load(self, progress: Callable[[Path, int, int], None] | None = None) -> NVLMEngine:
        """Load the weights now instead of on first use; `progress(shard, number, count)` per shard."""
        self._require_local("load()")
        return get_engine(self.engine_spec(), progress).engine(self.dialect)

    def _require_local(self, what: str) -> None:
        if self.base_url is not None:
            raise remote.RemoteError(
                f"{what} needs local weights; this ChatNVLM answers through {self.base_url} (base_url). "
                "Build ChatNVLM(model=<checkpoint folder>) without base_url to run the model here."
            )

    def content_options(self) -> ContentOptions:
        return ContentOptions(images_first=self.images_first, pdf_dpi=self.pdf_dpi, pdf_max_pages=self.pdf_max_pages)

    def default_max_tokens(self) -> int:
        return self.max_tokens or DEFAULT_MAX_NEW_TOKENS

    # --- identity, tracing, profile ------------------------------------------------------

    @property
    def _llm_type(self) -> str:
        return PROVIDER

    @classmethod
    def is_lc_serializable(cls) -> bool:
        return True

    @classmethod
    def get_lc_namespace(cls) -> list[str]:
        """`["nvlm_langchain", "chat_models"]`: load with `valid_namespaces=["nvlm_langchain"]`."""
        return ["nvlm_langchain", "chat_models"]

    @property
    def lc_secrets(self) -> dict[str, str]:
        return {"api_key": "NVLM_API_KEY"}

    def to_json(self) -> SerializedConstructor | SerializedNotImplemented:
        serialized = super().to_json()
        # LangChain keeps every truthy field, defaults included (device_map="auto", max_retries=2):
        # the other mode's would make the loaded copy warn that it ignores them.
        kwargs = serialized.get("kwargs")
        if isinstance(kwargs, dict):
            for name in _REMOTE_ONLY if self.base_url is None else _LOCAL_ONLY:
                kwargs.pop(name, None)
        return serialized

    def display_name(self, model: str | None = None) -> str:
        """The model's name in metadata and traces: a checkpoint folder's name ("NVLM-D-72B"), not
        its path; with base_url, the served name as given."""
        name = model or self.model
        if self.base_url is not None:
            return name
        return Path(name).expanduser().absolute().name or name

    @property
    def _identifying_params(self) -> dict[str, Any]:
        if self.base_url is not None:  # the server decides placement and prompt layout
            return {
                "model": self.model, "base_url": self.base_url, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "max_tokens": self.max_tokens, "seed": self.seed, "stop": self.stop,
                "repetition_penalty": self.repetition_penalty, "presence_penalty": self.presence_penalty,
                "frequency_penalty": self.frequency_penalty,
            }
        return {
            "model": self.model, "dialect": self.dialect, "device_map": self.device_map, "dtype": self.dtype,
            "context_length": self.context_length, "max_tiles": self.max_tiles, "temperature": self.temperature,
            "top_p": self.top_p, "top_k": self.top_k, "max_tokens": self.max_tokens, "seed": self.seed,
            "stop": self.stop, "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider=PROVIDER,
            ls_model_name=self.display_name(kwargs.get("model")),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
        )
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens:
            params["ls_max_tokens"] = max_tokens
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop or [])
        return params

    def _resolve_model_profile(self) -> ModelProfile | None:
        if self.base_url is not None:
            # Read from the server on first use (profile.py); None here keeps LangChain's
            # construction-time key check from asking it: `_lazy_server_profile` sets it after.
            return None
        return local_profile(self.model, context_length=self.context_length, allow_url_fetch=self.allow_url_fetch)

    @model_validator(mode="after")
    def _lazy_server_profile(self) -> ChatNVLM:
        if self.base_url is not None and self.profile is None:
            key = self.api_key.get_secret_value() if self.api_key is not None else None
            self.profile = ServerProfile(self.base_url, self.model, key,  # type: ignore[assignment]
                                         allow_url_fetch=self.allow_url_fetch)
        return self

    # --- generation ----------------------------------------------------------------------

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        if self.base_url is not None:
            return self._finish(remote.generate(self, messages, stop, kwargs))
        # The stream, aggregated (as langchain-ollama's): one local code path for both, so an
        # invoke equals a stream's chunks added up by construction.
        return self._finish(generate_from_stream(self._stream(messages, stop, run_manager, **kwargs)))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        # LangChain fires on_llm_new_token for every chunk yielded here; doing it too would double it.
        if self.base_url is not None:
            for chunk in remote.stream(self, messages, stop, kwargs):
                yield self._finish_chunk(chunk)
            return
        plan, handle = self._plan(messages, stop, kwargs)
        response = ResponseStream(self.display_name(plan.model_name), parse_tools=plan.parse_tools)
        deltas = handle.deltas()  # a blocking get per delta from the scheduler's thread
        try:
            for delta in deltas:
                if delta.result is not None:
                    yield self._finish_chunk(response.last(delta.text, delta.result), _logprobs(plan.engine, delta.result))
                elif (chunk := response.chunk(delta.text)) is not None:
                    yield chunk
        finally:
            deltas.close()  # the consumer stopped early: the request is cancelled, its row freed

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        if self.base_url is not None:
            return self._finish(await remote.agenerate(self, messages, stop, kwargs))
        # A cancelled task closes the stream, which cancels the request.
        async with aclosing(self._astream(messages, stop, run_manager, **kwargs)) as chunks:
            return self._finish(await agenerate_from_stream(chunks))

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        if self.base_url is not None:
            async with aclosing(remote.astream(self, messages, stop, kwargs)) as chunks:
                async for chunk in chunks:
                    yield self._finish_chunk(chunk)
            return
        plan, handle = await self._aplan(messages, stop, kwargs)
        response = ResponseStream(self.display_name(plan.model_name), parse_tools=plan.parse_tools)
        # Deltas arrive by call_soon_threadsafe from the scheduler's thread: no executor hop per token.
        # aclose() or a cancelled task cancels the request; the scheduler frees its row at the next step.
        async with aclosing(handle.adeltas()) as deltas:
            async for delta in deltas:
                if delta.result is not None:
                    yield self._finish_chunk(response.last(delta.text, delta.result), _logprobs(plan.engine, delta.result))
                elif (chunk := response.chunk(delta.text)) is not None:
                    yield chunk

    def _finish(self, result: ChatResult) -> ChatResult:
        """Adds what both backends report alike: the provider, and the legacy `llm_output` (token
        usage and model name, as ChatOpenAI's, which callbacks such as cost trackers read)."""
        for generation in result.generations:
            generation.message.response_metadata["model_provider"] = PROVIDER
        message = result.generations[0].message
        usage = getattr(message, "usage_metadata", None)
        result.llm_output = {
            "token_usage": _token_usage(usage) if usage else None,
            "model_name": message.response_metadata.get("model_name", self.display_name()),
            "model_provider": PROVIDER,
        }
        return result

    @staticmethod
    def _finish_chunk(chunk: ChatGenerationChunk, logprobs: dict[str, Any] | None = None) -> ChatGenerationChunk:
        # The last chunk alone carries response_metadata (see responses.py): the provider, the
        # token usage that invoke's gets from llm_output, and the whole answer's logprobs, in
        # ChatOpenAI's shape and place (the generation info, which LangChain copies into
        # response_metadata), so that a stream aggregates to what invoke returns.
        if getattr(chunk.message, "chunk_position", None) == "last":
            usage = getattr(chunk.message, "usage_metadata", None)
            chunk.message.response_metadata["token_usage"] = _token_usage(usage) if usage else None
            chunk.message.response_metadata["model_provider"] = PROVIDER
            if logprobs is not None:
                chunk.generation_info = {**(chunk.generation_info or {}), "logprobs": logprobs}
        return chunk

    def _combine_llm_outputs(self, llm_outputs: list[dict[str, Any] | None]) -> dict[str, Any]:
        # As ChatOpenAI: a batch's llm_output sums the token usage.
        total: dict[str, int] = {}
        model_name = None
        for output in llm_outputs:
            if not output:
                continue
            model_name = model_name or output.get("model_name")
            for key, value in (output.get("token_usage") or {}).items():
                total[key] = total.get(key, 0) + value
        return {"token_usage": total, "model_name": model_name or self.display_name(), "model_provider": PROVIDER}

    def _plan(self, messages: list[BaseMessage], stop: list[str] | None,
              kwargs: dict[str, Any]) -> tuple[CallPlan, RequestHandle]:
        """The call's plan and its handle on the engine's scheduler (planning errors raise before queueing)."""
        ticket = take_ticket(self)
        if ticket is not None:  # this invoke is one input of `batch`: its request is already queued
            assert ticket.handle is not None
            return ticket.plan, ticket.handle
        plan = plan_call(self, messages, stop, kwargs)
        return plan, plan.loaded.scheduler.submit(plan.request)

    async def _aplan(self, messages: list[BaseMessage], stop: list[str] | None,
                     kwargs: dict[str, Any]) -> tuple[CallPlan, RequestHandle]:
        """The async `_plan`: the handle delivers to this event loop."""
        ticket = take_ticket(self)
        if ticket is not None:
            assert ticket.handle is not None
            return ticket.plan, ticket.handle
        # Planning reads and tiles images: off the event loop.
        plan = await run_in_executor(None, plan_call, self, messages, stop, kwargs)
        return plan, plan.loaded.scheduler.submit(plan.request, loop=asyncio.get_running_loop())

    # --- batching: all requests queued at once, each input still a full LangChain call -------

    def batch(self, inputs: list[LanguageModelInput], config: RunnableConfig | list[RunnableConfig] | None = None,
              *, return_exceptions: bool = False, **kwargs: Any) -> list[AIMessage | Exception]:
        """Submits every input's request at once to the engine's scheduler, which decodes them in
        shared batches (greedy answers equal one-by-one answers).

        Remote: concurrent requests (up to the config's max_concurrency), which the server batches.
        """
        if self.base_url is not None or len(inputs) < 2 or self._cached():
            return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        configs = get_config_list(config, len(inputs))
        stop = kwargs.pop("stop", None)
        plans = self._plan_all(inputs, stop, kwargs)
        with get_executor_for_config(configs[0]) as executor:
            return run_batch(self, plans, lambda i: self.invoke(inputs[i], configs[i], stop=stop, **kwargs),
                             executor, return_exceptions)

    async def abatch(self, inputs: list[LanguageModelInput],
                     config: RunnableConfig | list[RunnableConfig] | None = None, *, return_exceptions: bool = False,
                     **kwargs: Any) -> list[AIMessage | Exception]:
        """The async `batch`: all requests submitted at once, inputs awaited as tasks (remote: concurrent requests)."""
        if self.base_url is not None or len(inputs) < 2 or self._cached():
            return await super().abatch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        configs = get_config_list(config, len(inputs))
        stop = kwargs.pop("stop", None)
        plans = await run_in_executor(None, self._plan_all, inputs, stop, kwargs)

        async def ainvoke(i: int) -> AIMessage:
            return await self.ainvoke(inputs[i], configs[i], stop=stop, **kwargs)

        return await arun_batch(self, plans, ainvoke, configs[0].get("max_concurrency"), return_exceptions)

    def _cached(self) -> bool:
        # With an LLM cache, inputs may be answered without the model: no batch is started for
        # them ahead of their calls (each call then runs, or hits the cache, on its own).
        return self.cache is not False and (self.cache is not None or get_llm_cache() is not None)

    def _plan_all(self, inputs: Sequence[LanguageModelInput], stop: list[str] | None,
                  kwargs: dict[str, Any]) -> list[CallPlan | Exception]:
        plans: list[CallPlan | Exception] = []
        for value in inputs:
            try:
                plans.append(plan_call(self, self._convert_input(value).to_messages(), stop, kwargs))
            except Exception as e:  # noqa: BLE001 - kept for that input: its invoke raises it, with callbacks
                plans.append(e)
        return plans

    # --- tools and structured output -----------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        parallel_tool_calls: bool | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Binds tools, shown to the model in the Qwen2.5 / Hermes format.

        Args:
            tools: LangChain tools, functions, pydantic classes, TypedDicts or tool dicts
                (OpenAI or Anthropic shape).
            tool_choice: "auto" (default: the model decides; a call it starts is kept valid by
                the grammar), "any" / "required" (at least one call), a tool name (exactly one
                call of that tool), or "none" (tools hidden).
            parallel_tool_calls: allow several calls in one answer (default True).
            strict: accepted for compatibility; calls are always grammar-checked against the schemas.
        """
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        if tool_choice is not None:
            kwargs["tool_choice"] = normalize_tool_choice(tool_choice, [t["function"]["name"] for t in formatted])
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        return super().bind(tools=formatted, **kwargs)

    def with_structured_output(  # type: ignore[override]
        self, schema: dict[str, Any] | type | None = None, *, method: Method = "json_schema",
        include_raw: bool = False, strict: bool | None = None, **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """A runnable whose output follows `schema`, enforced by constrained decoding.

        Args:
            schema: a pydantic class (the output is an instance), a TypedDict or a JSON schema
                dict (the output is a dict); may be None with method="json_mode".
            method: "json_schema" (default; JSON matching the schema), "function_calling" (a
                forced tool call) or "json_mode" (any JSON object; say the keys in the prompt).
            include_raw: return {"raw": AIMessage, "parsed": ..., "parsing_error": ...}.
            strict: accepted for compatibility; the grammar always enforces the schema.
        """
        if kwargs:
            raise ValueError(f"with_structured_output got unsupported arguments {sorted(kwargs)}")
        return structured_output(self, schema, method=method, include_raw=include_raw)

    # --- token counting ------------------------------------------------------------------

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence[Any] | None = None) -> int:
        """Prompt tokens as the model sees them: real tokenizer, image tokens, tool schemas included.

        Remote (no tokenizer here): LangChain's estimate, `count_tokens_approximately` (4 characters
        a token, 85 per image), good for trimming histories, not for exact budgets; the server's
        count comes back in each answer's `usage_metadata`.
        """
        if self.base_url is not None:
            return count_tokens_approximately(messages, tools=[convert_to_openai_tool(t) for t in tools or ()] or None)
        kwargs = {"tools": [convert_to_openai_tool(t) for t in tools]} if tools else {}
        call = compose_call(self, messages, kwargs)
        return call.engine.count_tokens(call.messages, max_tiles=call.max_tiles)

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of `text` (remote: only with `custom_get_token_ids`, as there is no tokenizer here)."""
        if self.base_url is not None:
            if self.custom_get_token_ids is not None:
                return self.custom_get_token_ids(text)
            self._require_local("get_token_ids (the tokenizer)")
        return list(self.engine.tokenizer.encode(text, add_special_tokens=False))

    def get_num_tokens(self, text: str) -> int:
        """Tokens in `text` (remote without `custom_get_token_ids`: 4 characters a token, an estimate)."""
        if self.base_url is not None and self.custom_get_token_ids is None:
            return math.ceil(len(text) / 4)
        return super().get_num_tokens(text)


PROVIDER = "nvlm"
"""`response_metadata["model_provider"]`, `llm_output["model_provider"]` and LangSmith's `ls_provider`."""


def _logprobs(engine: NVLMEngine, result: GenerationResult) -> dict[str, Any] | None:
    """The answer's logprobs in ChatOpenAI's shape, when the request asked for them."""
    if getattr(result, "logprobs", None) is None:
        return None
    return openai_logprobs(engine.tokenizer, result.logprobs)


def _token_usage(usage: Any) -> dict[str, int]:
    """LangChain's usage metadata in OpenAI's `usage` names (`llm_output["token_usage"]`)."""
    return {"prompt_tokens": usage["input_tokens"], "completion_tokens": usage["output_tokens"],
            "total_tokens": usage["total_tokens"]}


# Fields that only one mode reads: setting one in the other mode warns.
_REMOTE_ONLY = frozenset({"api_key", "timeout", "max_retries"})
_LOCAL_ONLY = frozenset({"device_map", "dtype", "max_memory", "dialect", "max_tiles"})
