"""`ChatNVLM`: NVIDIA's NVLM-D as a LangChain chat model, run in-process from its checkpoint
or, with `base_url`, on an OpenAI-compatible server (nvlm-serve, or vLLM serving NVLM-D).

This module is the LangChain surface: fields, the generate / stream hooks (sync and async),
batching, tools, structured output, tracing parameters, token counting and the profile. The
work is done beside it: `requests.py` turns a call into an engine request, `responses.py`
turns engine output into messages, `engines.py` loads each checkpoint once per process and
runs all its decoding on one continuous-batching scheduler (so concurrent calls from any
threads or tasks share decode steps), `jobs.py` submits a `batch`'s inputs together;
`remote.py` does a call on a server instead, when `base_url` is set. The two are backends
(`backend.py`: `local_backend.py`, `remote_backend.py`), chosen by `base_url` in one place;
every hook here asks the backend, and `invoke` aggregates the backend's stream.
"""

from __future__ import annotations

import logging
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
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import get_config_list
from langchain_core.tools import BaseTool
from langchain_core.utils import secret_from_env
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator

from nvlm_engine import NVLMEngine
from nvlm_engine.chat import normalize_tool_choice
from nvlm_engine.sampling import DEFAULT_MAX_NEW_TOKENS, make_options

from .backend import Backend, backend_for
from .call_plan import unknown_argument_error
from .engines import EngineSpec
from .messages import ContentOptions
from .responses import PROVIDER, combine_llm_outputs, finish_chunk, finish_result
from .structured import Method, structured_output

__all__ = ["ChatNVLM"]

logger = logging.getLogger(__name__)


class ChatNVLM(BaseChatModel):
    """NVLM-D (InternViT-6B + Qwen2-72B) as a chat model, on your own GPUs or CPU.

    Construction is free: the checkpoint loads on first call, once per process and placement.

    Setup: `pip install nvlm-langchain` (`[pdf]` reads PDFs); `model` is a checkpoint folder or a
    Hugging Face id in the local cache (`download=True` fetches one on first load).

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

    Per-call options: `temperature`, `top_p`, `top_k`, `max_tokens` (alias `max_completion_tokens`),
    `seed`, `repetition_penalty`, `max_tiles`, `model` (another checkpoint folder), `stop` (alias
    `stop_sequences`), `logprobs`, `top_logprobs`, `presence_penalty`, `frequency_penalty`.

    As ChatOpenAI: its constructor spellings are accepted, an argument no field reads is refused
    naming the nearest field, and `dumpd` / `loads(..., valid_namespaces=["nvlm_langchain"],
    allowed_objects=[ChatNVLM])` round-trip a model (see the README on ChatOpenAI conventions).

    Remote (`pip install 'nvlm-langchain[remote]'`): with `base_url`, calls go to an
    OpenAI-compatible server (nvlm-serve, or vLLM serving NVLM-D, its quirks handled) and `model`
    is the served name: `ChatNVLM(base_url="http://gpu-host:8000/v1", model="nvidia/NVLM-D-72B")`.
    """

    model: str = Field(alias="model_name",
                       description="The checkpoint folder, or a Hugging Face id such as nvidia/NVLM-D-72B (from "
                                   "the local cache; download=True fetches it), or with "
                                   "base_url the model name the server serves. Alias: model_name.")

    # --- remote: an OpenAI-compatible server instead of local weights ---
    base_url: str | None = None
    """The server's OpenAI API root, e.g. "http://gpu-host:8000/v1" (nvlm-serve, or vLLM serving NVLM-D).
    Set, calls go there (see `remote.py`) and the placement fields below do not apply."""
    api_key: SecretStr | None = Field(default_factory=secret_from_env("NVLM_API_KEY", default=None))
    """The server's bearer token; default from the NVLM_API_KEY environment variable (never OPENAI_API_KEY)."""
    timeout: float | None = Field(default=None, alias="request_timeout")
    """Seconds to wait for the server: to connect, and for each read of its streamed answer (every
    call streams, invoke too); None is the openai client's default (10 minutes)."""
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
    quantization: Literal["bnb-8bit", "bnb-4bit", "fp8"] | None = None
    """The decoder layers' linear weights as 8-bit / 4-bit (bitsandbytes) or FP8; None keeps `dtype`."""
    batch_size: int | None = None
    """Sequences decoded together: memory is reserved for this many, and the scheduler decodes at most
    this many at once. None plans for 1 and decodes up to 16 when memory allows."""
    tensor_parallel: int = 1
    """Split every decoder layer over this many processes, one per GPU (tensor parallelism; see the README)."""
    compile: bool = False
    """Decode steps through torch.compile, as CUDA graphs on a GPU; the first calls pay the compile time (~1 min)."""
    revision: str | None = None
    """With a Hugging Face id as `model`: the branch, tag or commit to load (default "main")."""
    download: bool = False
    """Download a Hugging Face id missing from the local cache on load (weights, configs, tokenizer only)."""
    progress: bool | Literal["log"] | None = None
    """Loading progress: None a bar on a terminal or notebook, True always, False never, "log" log lines."""

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
        # forward it (ChatOpenAI moves unknown ones into model_kwargs for its API).
        if not isinstance(values, dict):
            return values
        known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
        if error := unknown_argument_error(sorted(k for k in values if k not in known), known):
            raise error
        return values

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
        ignored = sorted(self.model_fields_set & self._backend.foreign_fields)
        if ignored:
            warnings.warn(f"ChatNVLM ignores {ignored} {self._backend.mode}", UserWarning, stacklevel=4)
        self._backend.check(self)
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
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (None plans for 1), got {self.batch_size}")
        return self

    def engine_spec(self, model: str | None = None) -> EngineSpec:
        """The registry key of this model's weights (or of `model`, another folder, with the same placement)."""
        return EngineSpec.of(model or self.model, self)  # the fields of the same names: placement, compile, ...

    @property
    def _backend(self) -> Backend:
        """Where calls run: chosen by `base_url` here alone (stateless, so a `model_copy` reads its own fields)."""
        return backend_for(self.base_url)

    @property
    def engine(self) -> NVLMEngine:
        """The engine this model runs on (loads the checkpoint on first access).

        Raises:
            remote.RemoteError: a remote model (`base_url` set) has no local engine.
        """
        return self._backend.engine(self)

    def load(self, progress: bool | str | Callable[[Path, int, int], None] | None = None) -> NVLMEngine:
        """Load the weights now; `progress`: None is the field's, or True/False/"log"/`callable(shard, n, count)`."""
        return self._backend.engine(self, progress, what="load()")

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
            for name in self._backend.foreign_fields:
                kwargs.pop(name, None)
        return serialized

    def display_name(self, model: str | None = None) -> str:
        """The model's name in metadata and traces: a checkpoint folder's name ("NVLM-D-72B"), not
        its path; with base_url, the served name as given."""
        return self._backend.display_name(self, model)

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self._backend.identifying_params(self)

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider=PROVIDER,
            ls_model_name=self.display_name(kwargs.get("model")),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
        )
        max_tokens = kwargs.get("max_tokens", kwargs.get("max_completion_tokens", self.max_tokens))
        if max_tokens:
            params["ls_max_tokens"] = max_tokens
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop or [])
        return params

    def _resolve_model_profile(self) -> ModelProfile | None:
        return self._backend.profile(self)

    @model_validator(mode="after")
    def _lazy_server_profile(self) -> ChatNVLM:
        if self.profile is None and (profile := self._backend.lazy_profile(self)) is not None:
            self.profile = profile
        return self

    # --- generation ----------------------------------------------------------------------

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        # The stream, aggregated (as langchain-ollama's): one code path per backend for both, so
        # an invoke equals a stream's chunks added up by construction.
        chunks = self._stream(messages, stop, run_manager, **kwargs)
        return finish_result(generate_from_stream(chunks), self.display_name())

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        # LangChain fires on_llm_new_token for every chunk yielded here; doing it too would double it.
        chunks = self._backend.stream(self, messages, stop, kwargs)
        try:
            for chunk in chunks:
                yield finish_chunk(chunk)
        finally:
            chunks.close()  # stopping early cancels the request

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        # A cancelled task closes the stream, which cancels the request.
        async with aclosing(self._astream(messages, stop, run_manager, **kwargs)) as chunks:
            return finish_result(await agenerate_from_stream(chunks), self.display_name())

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        async with aclosing(self._backend.astream(self, messages, stop, kwargs)) as chunks:
            async for chunk in chunks:
                yield finish_chunk(chunk)

    def _combine_llm_outputs(self, llm_outputs: list[dict[str, Any] | None]) -> dict[str, Any]:
        return combine_llm_outputs(llm_outputs, self.display_name())

    # --- batching: all requests queued at once, each input still a full LangChain call -------

    def batch(self, inputs: list[LanguageModelInput], config: RunnableConfig | list[RunnableConfig] | None = None,
              *, return_exceptions: bool = False, **kwargs: Any) -> list[AIMessage | Exception]:
        """Submits every input's request at once to the engine's scheduler, which decodes them in
        shared batches (greedy answers equal one-by-one answers).

        Remote: concurrent requests (up to the config's max_concurrency), which the server batches.
        """
        if not self._backend.submits_batches or len(inputs) < 2 or self._cached():
            return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        return self._backend.batch(self, inputs, get_config_list(config, len(inputs)), return_exceptions, kwargs)

    async def abatch(self, inputs: list[LanguageModelInput],
                     config: RunnableConfig | list[RunnableConfig] | None = None, *, return_exceptions: bool = False,
                     **kwargs: Any) -> list[AIMessage | Exception]:
        """The async `batch`: all requests submitted at once, inputs awaited as tasks (remote: concurrent requests)."""
        if not self._backend.submits_batches or len(inputs) < 2 or self._cached():
            return await super().abatch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        return await self._backend.abatch(self, inputs, get_config_list(config, len(inputs)), return_exceptions,
                                          kwargs)

    def _cached(self) -> bool:
        # With an LLM cache, inputs may be answered without the model: no batch is started for
        # them ahead of their calls (each call then runs, or hits the cache, on its own).
        return self.cache is not False and (self.cache is not None or get_llm_cache() is not None)

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
        return self._backend.count_message_tokens(self, messages, tools)

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of `text` (remote: only with `custom_get_token_ids`, as there is no tokenizer here)."""
        return self._backend.token_ids(self, text)

    def get_num_tokens(self, text: str) -> int:
        """Tokens in `text` (remote without `custom_get_token_ids`: 4 characters a token, an estimate)."""
        count = self._backend.num_tokens(self, text)
        return super().get_num_tokens(text) if count is None else count
