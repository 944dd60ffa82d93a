"""The FastAPI application: OpenAI-compatible `/v1/chat/completions`, `/v1/models`, `/health`, `/metrics`.

One loaded engine, one continuous-batching scheduler, one `nvlm_engine.chat.ChatService`
(tools, grammars, system turn, answer events); every request is validated and prepared
(images decoded, grammar compiled, prompt built, context checked) in a worker thread before
it is queued, so bad input costs no model time. The answer's chat events become OpenAI JSON
or SSE in `openai_output.py`. Clients that disconnect are cancelled and free their slot. Errors
are OpenAI-style JSON with the right status; no stack trace ever reaches a client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from nvlm_engine import ContextLengthError, NVLMEngine, NVLMError
from nvlm_engine.chat import ChatRequest, ChatService, PreparedChat
from nvlm_engine.chat.grammar_budget import GrammarBusyError, GrammarTooComplexError
from nvlm_engine.errors import ImageSourceError, ImageTooLargeError
from nvlm_engine.scheduler import QueueFullError, RequestHandle, Scheduler

from . import schemas
from .chat_request import to_chat_request
from .convert import RequestRejected, ServerImagePolicy
from .fetching import convert_messages
from .guard import BodyError, Guard, check_api_key, parse_json_body
from .openai_output import OpenAIOutput

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    """Operator settings; every limit has a safe default.

    Attributes:
        model_name: the id clients see in /v1/models and responses.
        model_aliases: more ids the model answers to (vLLM's repeated --served-model-name); a
            request naming one is answered under that name. Any other name is a 404.
        api_key: when set, every path but /health (the OpenAPI schema included) needs
            `Authorization: Bearer <api_key>`; a visible-ASCII token, never empty (None: no auth).
        max_body_bytes: larger request bodies get 413 (counted as they arrive, chunked ones too).
        max_tiles: tiles per image at most (a request cannot ask for more).
        request_timeout_s: a request still running after this is cancelled: a 504, or a stream
            that ends early with finish_reason "length", usage and [DONE].
        max_batch_size, max_queue: scheduler limits; a full queue answers 429.
        grammar_timeout_s: compile budget of a tools / response_format grammar, off the event loop;
            past it 400 grammar_too_complex (static bounds: nvlm_engine.chat.grammar_budget.GrammarLimits).
        images: the image policy (inline only by default).
    """

    model_name: str = "nvlm-d"
    model_aliases: tuple[str, ...] = ()
    api_key: str | None = None
    max_body_bytes: int = 32 * 2**20
    max_tiles: int = 6
    request_timeout_s: float = 600.0
    max_batch_size: int = 16
    max_queue: int = 256
    grammar_timeout_s: float = 5.0
    images: ServerImagePolicy = field(default_factory=ServerImagePolicy)

    def __post_init__(self) -> None:
        if self.api_key is not None:
            check_api_key(self.api_key)  # "" would silently mean: no auth


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("nvlm_requests_total", "Chat requests by HTTP status", ["status"], registry=self.registry)
        self.tokens = Counter("nvlm_tokens_total", "Tokens processed", ["kind"], registry=self.registry)
        self.ttft = Histogram("nvlm_time_to_first_token_seconds", "Time to first token", registry=self.registry)
        self.latency = Histogram("nvlm_request_seconds", "Request duration", registry=self.registry)
        self.queued = Gauge("nvlm_queue_depth", "Requests waiting for a batch slot", registry=self.registry)
        self.running = Gauge("nvlm_running_requests", "Requests being decoded", registry=self.registry)


# engine.cache_stats() key -> (metric name, counter?, help); a counter's samples get "_total".
_CACHE_METRICS = (
    ("prefix_queries", "nvlm_prefix_cache_queries", True, "Prefix-cache lookups"),
    ("prefix_hits", "nvlm_prefix_cache_hits", True, "Prefix-cache lookups that reused a slot's KV"),
    ("prefix_hit_tokens", "nvlm_prefix_cache_hit_tokens", True, "Prompt tokens whose KV was reused"),
    ("prefix_query_tokens", "nvlm_prefix_cache_query_tokens", True, "Prompt tokens looked up in the prefix cache"),
    ("prefix_evictions", "nvlm_prefix_cache_evictions", True, "Idle KV slots evicted"),
    ("prefix_idle_slots", "nvlm_prefix_cache_idle_slots", False, "KV slots resident and idle, reusable"),
    ("image_cache_hits", "nvlm_image_cache_hits", True, "Images whose embeddings came from the cache"),
    ("image_cache_misses", "nvlm_image_cache_misses", True, "Images that went through the vision tower"),
    ("image_cache_evictions", "nvlm_image_cache_evictions", True, "Image embeddings evicted"),
    ("image_cache_entries", "nvlm_image_cache_entries", False, "Image embeddings cached"),
    ("image_cache_bytes", "nvlm_image_cache_bytes", False, "Bytes of cached image embeddings"),
)


class _CacheCollector(Collector):
    """The engine's prefix/image cache counters, read at scrape time: one `cache_stats()` call per scrape.

    An engine without `cache_stats` exposes nothing; a key it does not report is left out; a
    failing call is logged and the scrape goes on without these metrics.
    """

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def describe(self) -> list[Metric]:  # names only, for the registry's duplicate check; no engine call
        if getattr(self._engine, "cache_stats", None) is None:
            return []
        return [(CounterMetricFamily if counter else GaugeMetricFamily)(name, text)
                for _, name, counter, text in _CACHE_METRICS]

    def collect(self) -> list[Metric]:
        cache_stats = getattr(self._engine, "cache_stats", None)
        if cache_stats is None:
            return []
        try:
            stats = cache_stats()
        except Exception:
            logger.exception("engine.cache_stats() failed; cache metrics left out of this scrape")
            return []
        families: list[Metric] = []
        for key, name, counter, text in _CACHE_METRICS:
            if key in stats:
                family = CounterMetricFamily if counter else GaugeMetricFamily
                families.append(family(name, text, value=stats[key]))
        return families


def create_app(engine: NVLMEngine, settings: ServerSettings | None = None) -> FastAPI:
    """Build the app around a loaded engine (the caller owns its lifetime)."""
    settings = settings or ServerSettings()
    metrics = _Metrics()
    scheduler = Scheduler(engine, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue)
    service = ChatService(engine)
    metrics.queued.set_function(lambda: scheduler.queued)
    metrics.running.set_function(lambda: scheduler.running)
    metrics.registry.register(_CacheCollector(engine))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        scheduler.close()

    app = FastAPI(title="nvlm-serve", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.scheduler = scheduler
    app.state.chat = service

    # API key, body limit and the last line of defence, as pure ASGI (see guard.py for why not @app.middleware)
    app.add_middleware(Guard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name, "queued": scheduler.queued, "running": scheduler.running}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        # max_model_len: the context length, under vLLM's name, so remote clients can derive a profile;
        # max_tiles: the tile budget, so an evaluation can check it runs with the card's 6.
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0, "owned_by": "nvlm",
                                            "max_model_len": engine.context_length, "max_tiles": settings.max_tiles}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        started = time.perf_counter()
        response = await _chat(request, service, scheduler, settings, metrics)
        metrics.requests.labels(str(response.status_code)).inc()
        metrics.latency.observe(time.perf_counter() - started)
        return response

    return app


async def _chat(request: Request, service: ChatService, scheduler: Scheduler, settings: ServerSettings,
                metrics: _Metrics) -> Response:
    # 1. read and validate the body (the guard stops reading it past max_body_bytes)
    body = await request.body()
    if len(body) > settings.max_body_bytes:
        return _error(413, f"request body larger than {settings.max_body_bytes} bytes", code="request_too_large")
    try:
        # strict (bad UTF-8, lone surrogates, NaN, deep nesting: 400s); off the loop, as a 32 MB body takes seconds
        payload = await run_in_threadpool(parse_json_body, body)
        req = schemas.ChatCompletionRequest.model_validate(payload)
    except BodyError as e:
        return _error(400, str(e), code=e.code, param=e.param)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            return _error(400, f"unsupported field {where!r}: this server does not implement it; remove it",
                          code="unsupported_parameter", param=where)
        return _error(400, f"invalid request: {where}: {first['msg']}", code="invalid_request", param=where)
    if req.model is not None and req.model not in (settings.model_name, *settings.model_aliases):
        return _error(404, f"the model {req.model!r} does not exist; this server serves {settings.model_name!r} "
                      "(GET /v1/models)", code="model_not_found", param="model")
    # 2. convert and prepare off the event loop (image decoding, grammar compiling, tokenization)
    try:
        messages = await convert_messages(request.app, req.messages, settings.images)  # URLs in their own pool
        default_max = min(1024, service.engine.context_length // 4)
        chat = to_chat_request(req, messages, settings.max_tiles, default_max)
        prepared = await run_in_threadpool(_prepare, service, chat, settings)
    except RequestRejected as e:
        return _error(e.status, str(e), code=e.code, param=e.param)
    except ContextLengthError as e:
        return _error(400, str(e), code="context_length_exceeded")
    except ImageTooLargeError as e:
        return _error(413, str(e), code="image_too_large")
    except ImageSourceError as e:
        return _error(400, str(e), code="invalid_image_url")
    except NVLMError as e:
        return _error(400, str(e), code=type(e).__name__)
    # 3. queue it
    try:
        handle = scheduler.submit(prepared.request, loop=asyncio.get_running_loop())
    except QueueFullError as e:
        return _error(429, str(e), "rate_limit_error", "queue_full")
    output = OpenAIOutput(service.engine.tokenizer, logprobs=prepared.logprobs)
    model = req.model or settings.model_name
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            _sse(handle, prepared, output, model, include_usage, settings, metrics),
            media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
        )
    return await _complete(request, handle, prepared, output, model, settings, metrics)


def _prepare(service: ChatService, chat: ChatRequest, settings: ServerSettings) -> PreparedChat:
    """The chat layer's preparation; grammar refusals become the server's answers.

    Compiling waits at most `grammar_timeout_s` (plus the wait for a free compile worker), then
    answers 400 `grammar_too_complex`; busy workers answer 503.
    """
    param = "tools" if chat.tools.tools else "response_format"
    try:
        return service.prepare(chat, grammar_timeout_s=settings.grammar_timeout_s)
    except GrammarTooComplexError as e:
        raise RequestRejected(str(e), code="grammar_too_complex", param=param) from e
    except GrammarBusyError as e:
        raise RequestRejected(str(e), status=503, code="grammar_busy", param=param) from e
    except NVLMError:
        raise
    except ValueError as e:  # a schema xgrammar cannot express
        raise RequestRejected(f"cannot use the given schema: {e}", code="invalid_schema", param=param) from e


async def _complete(request: Request, handle: RequestHandle, prepared: PreparedChat, output: OpenAIOutput,
                    model: str, settings: ServerSettings, metrics: _Metrics) -> Response:
    consume = asyncio.ensure_future(_drain(handle, prepared, output))
    deadline = time.monotonic() + settings.request_timeout_s
    while not consume.done():
        await asyncio.wait({consume}, timeout=0.25)
        if consume.done():
            break
        if await request.is_disconnected():
            handle.cancel()  # the client left: free the slot
        if time.monotonic() > deadline:
            handle.cancel()
            try:
                await consume
            except NVLMError:
                pass  # it failed while being cancelled: the timeout is still the answer
            return _error(504, f"request exceeded {settings.request_timeout_s:.0f}s and was cancelled", "timeout", "timeout")
    try:
        consume.result()
    except NVLMError as e:  # this request failed alone (e.g. its sampling); never a 500
        return _error(422, str(e), "server_error", type(e).__name__)
    result = handle.result
    assert result is not None
    _observe(metrics, result)
    usage = schemas.usage_dict(result.usage.prompt_tokens, result.usage.completion_tokens)
    return JSONResponse(schemas.completion(schemas.completion_id(), model, output.message(), output.finish_reason,
                                           usage, logprobs=output.logprobs))


async def _drain(handle: RequestHandle, prepared: PreparedChat, output: OpenAIOutput) -> None:
    reader = prepared.reader()
    async for delta in handle.adeltas():
        output.push(reader.feed(delta))


async def _sse(handle: RequestHandle, prepared: PreparedChat, output: OpenAIOutput, model: str, include_usage: bool,
               settings: ServerSettings, metrics: _Metrics) -> AsyncIterator[bytes]:
    cid = schemas.completion_id()
    yield _event(schemas.chunk(cid, model, {"role": "assistant", "content": ""}))
    reader = prepared.reader()
    # At the deadline a timer cancels the request; it ends at its next step ("cancelled", sent as
    # "length", as OpenAI reports a cut answer), then usage and [DONE] as usual. Not a timeout
    # around each read: cancelling a read closes the generator before its final delta.
    deadline = asyncio.get_running_loop().call_later(settings.request_timeout_s, handle.cancel)
    deltas = handle.adeltas()
    try:
        try:
            async for delta in deltas:
                for piece, logprobs in output.push(reader.feed(delta)):
                    yield _event(schemas.chunk(cid, model, piece, logprobs=logprobs))
        finally:
            deadline.cancel()
        result = handle.result
        assert result is not None
        _observe(metrics, result)
        yield _event(schemas.chunk(cid, model, {}, output.finish_reason))
        if include_usage:
            usage = schemas.usage_dict(result.usage.prompt_tokens, result.usage.completion_tokens)
            yield _event(schemas.chunk(cid, model, {}, usage=usage, empty_choices=True))
        yield b"data: [DONE]\n\n"
    except NVLMError as e:  # this request failed alone: its own error event, then the normal end
        yield _event(schemas.error_body(str(e), kind="server_error", code=type(e).__name__))
        yield b"data: [DONE]\n\n"
    except Exception:  # last line of defence: log it, never show it, still end the stream
        logger.exception("stream failed")
        yield _event(schemas.error_body("internal server error", kind="server_error"))
        yield b"data: [DONE]\n\n"
    finally:
        if handle.result is None:  # client disconnected mid-stream
            handle.cancel()
        await deltas.aclose()


def _observe(metrics: _Metrics, result: Any) -> None:
    metrics.tokens.labels("prompt").inc(result.usage.prompt_tokens)
    metrics.tokens.labels("completion").inc(result.usage.completion_tokens)
    metrics.ttft.observe(result.timings.get("first_token", 0.0))


def _event(body: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
           param: str | None = None) -> JSONResponse:
    return JSONResponse(schemas.error_body(message, kind=kind, code=code, param=param), status_code=status)
