"""`ChatNVLM`'s local backend: calls run on the in-process engine's continuous-batching scheduler.

A call is planned (`call_plan.py`: options, messages, images, tokens), submitted to the
engine's scheduler, and its deltas become chunks (`responses.ResponseStream`); the last chunk
carries the whole answer's logprobs when asked. `batch` submits every input's request at once
(`jobs.py`), so they decode in shared steps. Knows engines and LangChain; knows no HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Generator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGenerationChunk
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import get_executor_for_config, run_in_executor
from langchain_core.utils.function_calling import convert_to_openai_tool

from nvlm_engine import GenerationResult, NVLMEngine
from nvlm_engine.chat.logprobs import openai_logprobs
from nvlm_engine.scheduler import RequestHandle

from .call_plan import CallPlan, compose_call, plan_call
from .engines import get_engine
from .jobs import arun_batch, run_batch, take_ticket
from .profile import local_profile
from .responses import ResponseStream

if TYPE_CHECKING:
    from .chat_models import ChatNVLM

__all__ = ["LOCAL", "LocalBackend"]


class LocalBackend:
    """The in-process engine (see the module docstring); stateless, one instance (`LOCAL`)."""

    mode = "without base_url (a local model)"
    foreign_fields = frozenset({"api_key", "timeout", "max_retries"})
    submits_batches = True

    def check(self, chat: ChatNVLM) -> None:
        pass

    # --- calls ---------------------------------------------------------------------------

    def stream(self, chat: ChatNVLM, messages: list[BaseMessage], stop: list[str] | None,
               kwargs: dict[str, Any]) -> Generator[ChatGenerationChunk, None, None]:
        plan, handle = _plan(chat, messages, stop, kwargs)
        response = ResponseStream(self.display_name(chat, plan.model_name), parse_tools=plan.parse_tools)
        deltas = handle.deltas()  # a blocking get per delta from the scheduler's thread
        try:
            for delta in deltas:
                if delta.result is not None:
                    yield _with_logprobs(response.last(delta.text, delta.result), plan.engine, delta.result)
                elif (chunk := response.chunk(delta.text)) is not None:
                    yield chunk
        finally:
            deltas.close()  # the consumer stopped early: the request is cancelled, its row freed

    async def astream(self, chat: ChatNVLM, messages: list[BaseMessage], stop: list[str] | None,
                      kwargs: dict[str, Any]) -> AsyncGenerator[ChatGenerationChunk, None]:
        plan, handle = await _aplan(chat, messages, stop, kwargs)
        response = ResponseStream(self.display_name(chat, plan.model_name), parse_tools=plan.parse_tools)
        # Deltas arrive by call_soon_threadsafe from the scheduler's thread: no executor hop per token.
        # aclose() or a cancelled task cancels the request; the scheduler frees its row at the next step.
        async with aclosing(handle.adeltas()) as deltas:
            async for delta in deltas:
                if delta.result is not None:
                    yield _with_logprobs(response.last(delta.text, delta.result), plan.engine, delta.result)
                elif (chunk := response.chunk(delta.text)) is not None:
                    yield chunk

    # --- batching: all requests queued at once, each input still a full LangChain call -------

    def batch(self, chat: ChatNVLM, inputs: list[LanguageModelInput], configs: list[RunnableConfig],
              return_exceptions: bool, kwargs: dict[str, Any]) -> list[AIMessage | Exception]:
        stop = kwargs.pop("stop", None)
        plans = _plan_all(chat, inputs, stop, kwargs)
        with get_executor_for_config(configs[0]) as executor:
            return run_batch(chat, plans, lambda i: chat.invoke(inputs[i], configs[i], stop=stop, **kwargs),
                             executor, return_exceptions)

    async def abatch(self, chat: ChatNVLM, inputs: list[LanguageModelInput], configs: list[RunnableConfig],
                     return_exceptions: bool, kwargs: dict[str, Any]) -> list[AIMessage | Exception]:
        stop = kwargs.pop("stop", None)
        plans = await run_in_executor(None, _plan_all, chat, inputs, stop, kwargs)

        async def ainvoke(i: int) -> AIMessage:
            return await chat.ainvoke(inputs[i], configs[i], stop=stop, **kwargs)

        return await arun_batch(chat, plans, ainvoke, configs[0].get("max_concurrency"), return_exceptions)

    # --- the engine, tokens, identity ----------------------------------------------------

    def engine(self, chat: ChatNVLM, progress: Callable[[Path, int, int], None] | None = None, *,
               what: str = "engine") -> NVLMEngine:
        return get_engine(chat.engine_spec(), progress).engine(chat.dialect)

    def count_message_tokens(self, chat: ChatNVLM, messages: list[BaseMessage], tools: Sequence[Any] | None) -> int:
        kwargs = {"tools": [convert_to_openai_tool(t) for t in tools]} if tools else {}
        call = compose_call(chat, messages, kwargs)
        return call.engine.count_tokens(call.messages, max_tiles=call.max_tiles)

    def token_ids(self, chat: ChatNVLM, text: str) -> list[int]:
        return list(self.engine(chat).tokenizer.encode(text, add_special_tokens=False))

    def num_tokens(self, chat: ChatNVLM, text: str) -> int | None:
        return None  # LangChain's: len(get_token_ids(text)), the real tokenizer

    def profile(self, chat: ChatNVLM) -> ModelProfile | None:
        return local_profile(chat.model, context_length=chat.context_length, allow_url_fetch=chat.allow_url_fetch)

    def lazy_profile(self, chat: ChatNVLM) -> ModelProfile | None:
        return None

    def identifying_params(self, chat: ChatNVLM) -> dict[str, Any]:
        return {
            "model": chat.model, "dialect": chat.dialect, "device_map": chat.device_map, "dtype": chat.dtype,
            "context_length": chat.context_length, "max_tiles": chat.max_tiles, "temperature": chat.temperature,
            "top_p": chat.top_p, "top_k": chat.top_k, "max_tokens": chat.max_tokens, "seed": chat.seed,
            "stop": chat.stop, "repetition_penalty": chat.repetition_penalty,
            "presence_penalty": chat.presence_penalty, "frequency_penalty": chat.frequency_penalty,
        }

    def display_name(self, chat: ChatNVLM, model: str | None = None) -> str:
        """A checkpoint folder's name ("NVLM-D-72B"), not its path."""
        name = model or chat.model
        return Path(name).expanduser().absolute().name or name


LOCAL = LocalBackend()


def _with_logprobs(chunk: ChatGenerationChunk, engine: NVLMEngine, result: GenerationResult) -> ChatGenerationChunk:
    # The whole answer's logprobs, in ChatOpenAI's shape and place (the generation info, which
    # LangChain copies into response_metadata), when the request asked for them.
    if getattr(result, "logprobs", None) is not None:
        chunk.generation_info = {**(chunk.generation_info or {}),
                                 "logprobs": openai_logprobs(engine.tokenizer, result.logprobs)}
    return chunk


def _plan(chat: ChatNVLM, messages: list[BaseMessage], stop: list[str] | None,
          kwargs: dict[str, Any]) -> tuple[CallPlan, RequestHandle]:
    """The call's plan and its handle on the engine's scheduler (planning errors raise before queueing)."""
    ticket = take_ticket(chat)
    if ticket is not None:  # this invoke is one input of `batch`: its request is already queued
        assert ticket.handle is not None
        return ticket.plan, ticket.handle
    plan = plan_call(chat, messages, stop, kwargs)
    return plan, plan.loaded.scheduler.submit(plan.request)


async def _aplan(chat: ChatNVLM, messages: list[BaseMessage], stop: list[str] | None,
                 kwargs: dict[str, Any]) -> tuple[CallPlan, RequestHandle]:
    """The async `_plan`: the handle delivers to this event loop."""
    ticket = take_ticket(chat)
    if ticket is not None:
        assert ticket.handle is not None
        return ticket.plan, ticket.handle
    # Planning reads and tiles images: off the event loop.
    plan = await run_in_executor(None, plan_call, chat, messages, stop, kwargs)
    return plan, plan.loaded.scheduler.submit(plan.request, loop=asyncio.get_running_loop())


def _plan_all(chat: ChatNVLM, inputs: Sequence[LanguageModelInput], stop: list[str] | None,
              kwargs: dict[str, Any]) -> list[CallPlan | Exception]:
    plans: list[CallPlan | Exception] = []
    for value in inputs:
        try:
            plans.append(plan_call(chat, chat._convert_input(value).to_messages(), stop, kwargs))
        except Exception as e:  # noqa: BLE001 - kept for that input: its invoke raises it, with callbacks
            plans.append(e)
    return plans
