"""Continuous batching: many concurrent requests share one engine, one worker thread.

Callers (threads of a server, asyncio tasks, LangChain `batch` calls) `submit()` prepared
requests and read their deltas from the returned `RequestHandle`, sync or async. The worker
thread owns a decode core (`generation.DecodeCore`): between two decode steps it admits
waiting requests, whose prompts are prefilled in chunks interleaved with the running rows'
steps, so a newcomer's first token never waits for the running answers to finish and the
running answers never stall for a newcomer's whole prefill. The queue is bounded; a full queue is a typed error the caller can
turn into "429 Too Many Requests". Cancelling a handle (a client went away) frees its row at
the next step. A request that fails alone (its sampling, its seed, its prefill) gets its own
`RequestFailedError` and the others go on; every error a handle raises is an `NVLMError`.

Knows the engine's prepared requests and decode batch; knows nothing of HTTP or LangChain.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from .errors import NVLMError, RequestFailedError
from .generation import Delta, GenerationResult, PreparedRequest

if TYPE_CHECKING:
    from .engine import NVLMEngine

logger = logging.getLogger(__name__)


class QueueFullError(NVLMError):
    """The scheduler's queue is full: retry later, or raise `max_queue`."""


class SchedulerClosedError(NVLMError):
    """The scheduler was closed; no new requests are accepted."""


_END = object()


@dataclass(eq=False)
class RequestHandle:
    """One submitted request: iterate its text deltas (sync or async); `result` when done."""

    request: PreparedRequest
    result: GenerationResult | None = None
    error: BaseException | None = None
    _queue: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    _loop: asyncio.AbstractEventLoop | None = None
    _async_queue: asyncio.Queue | None = None

    def cancel(self) -> None:
        """Stop generating for this request (any thread); it ends with finish_reason "cancelled"."""
        self.request.cancel.set()

    def __iter__(self) -> Iterator[str]:
        for delta in self.deltas():
            if delta.text:
                yield delta.text

    def deltas(self) -> Generator[Delta, None, None]:
        """Blocking iteration over `Delta`s (index 0); the last one carries `result` and the final text.

        Leaving early (break, close, an exception in the consumer) cancels the request.
        """
        try:
            yield from self._read()
        finally:
            if self.result is None:  # the consumer left early: free the slot
                self.cancel()

    def _read(self) -> Iterator[Delta]:
        while (delta := self._unwrap(self._queue.get())) is not None:
            yield delta
            if delta.result is not None:
                return

    def _unwrap(self, item: object) -> Delta | None:
        """A queued item as a delta; None at the end; the request's error raised if it failed."""
        if isinstance(item, Delta):
            return item
        assert item is _END
        if self.error is not None:
            raise self.error
        return None

    def wait(self) -> GenerationResult:
        """Block until the request is done and return its result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result

    async def astream(self) -> AsyncIterator[str]:
        """Async iteration; the handle must have been submitted with `loop` set (see `Scheduler.submit`)."""
        deltas = self.adeltas()
        try:
            async for delta in deltas:
                if delta.text:
                    yield delta.text
        finally:
            await deltas.aclose()

    async def adeltas(self) -> AsyncGenerator[Delta, None]:
        """The async `deltas()`: needs the handle submitted with `loop` set; leaving early cancels."""
        assert self._async_queue is not None, "submit(..., loop=asyncio.get_running_loop()) for async use"
        try:
            while (delta := self._unwrap(await self._async_queue.get())) is not None:
                yield delta
                if delta.result is not None:
                    return
        finally:
            if self.result is None:  # the consumer left early: free the slot
                self.cancel()

    def _put(self, item: object) -> None:
        if self._loop is not None and self._async_queue is not None:
            try:
                self._loop.call_soon_threadsafe(self._async_queue.put_nowait, item)
            except RuntimeError:  # the consumer's loop closed: nobody reads this handle any more
                self.cancel()
        else:
            self._queue.put(item)


class Scheduler:
    """Runs an engine's requests with continuous batching in a background thread.

    Args:
        engine: the loaded engine.
        max_batch_size: rows decoded together at most; more requests wait in the queue.
        max_queue: waiting requests at most; `submit` raises `QueueFullError` beyond.
    """

    def __init__(self, engine: NVLMEngine, *, max_batch_size: int = 16, max_queue: int = 256) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._waiting: list[RequestHandle] = []
        self._lock = threading.Condition()
        self._closed = False
        self._handles: dict[int, RequestHandle] = {}
        self._next_id = 0
        self.max_rows = 0
        """The most rows decoded together in one step so far (monitoring, tests)."""
        # Running rows plus as many cached sequences again (prefix caching) at most.
        self._slots = max(2 * max_batch_size, engine.decoding.max_slots)
        self.core = engine.new_core(max_slots=self._slots)
        self._thread = threading.Thread(target=self._run, name="nvlm-scheduler", daemon=True)
        self._thread.start()

    # --- callers -------------------------------------------------------------------------

    def submit(self, request: PreparedRequest, *, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue a prepared request; pass the running event loop to read the handle asynchronously."""
        (handle,) = self.submit_many([request], loop=loop)
        return handle

    def submit_many(self, requests: Sequence[PreparedRequest], *,
                    loop: asyncio.AbstractEventLoop | None = None) -> list[RequestHandle]:
        """Queue requests together (all or none): an idle worker admits them in one prefill group."""
        handles = [RequestHandle(request) for request in requests]
        if loop is not None:
            for handle in handles:
                handle._loop, handle._async_queue = loop, asyncio.Queue()
        with self._lock:
            if self._closed:
                raise SchedulerClosedError("the scheduler is closed; create a new one")
            if len(self._waiting) + len(handles) > self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests already wait (max_queue={self.max_queue}); retry later")
            self._waiting.extend(handles)
            self._lock.notify()
        return handles

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._handles)

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop accepting requests, cancel the running ones and stop the worker."""
        with self._lock:
            self._closed = True
            for handle in self._waiting:
                handle.error = SchedulerClosedError("the scheduler closed before this request started")
                handle._put(_END)
            self._waiting.clear()
            for handle in list(self._handles.values()):
                handle.cancel()
            self._lock.notify()
        self._thread.join(timeout)

    # --- worker --------------------------------------------------------------------------

    def _run(self) -> None:
        core = self.core
        while True:
            admitted = self._admit(busy=core.busy)
            if admitted is None:
                self._dispatch(core.cancel_all())
                return
            if admitted:
                self._dispatch(core.admit([(i, h.request) for i, h in admitted]))
            if not core.busy:
                continue
            self.max_rows = max(self.max_rows, len(core.running))
            try:
                deltas = core.step()  # a row that fails alone comes back as an error delta
            except Exception as e:  # a failed step fails its requests, never the worker
                logger.exception("decode step failed")
                self._dispatch(core.cancel_all())
                self._fail(list(self._handles), e)
                self.core = core = self.engine.new_core(max_slots=self._slots)
                continue
            self._dispatch(deltas)

    def _admit(self, *, busy: bool) -> list[tuple[int, RequestHandle]] | None:
        """Take waiting requests that fit; block while idle. None means: shut down."""
        with self._lock:
            while not busy and not self._waiting and not self._closed:
                self._lock.wait()
            if self._closed and not busy:
                return None
            room = max(0, self.max_batch_size - len(self._handles))
            taken, self._waiting = self._waiting[:room], self._waiting[room:]
            admitted = []
            for handle in taken:
                self._next_id += 1
                self._handles[self._next_id] = handle
                admitted.append((self._next_id, handle))
        return admitted

    def _dispatch(self, deltas: list[Delta]) -> None:
        for delta in deltas:
            handle = self._handles.get(delta.index)
            if handle is None:
                continue
            if delta.error is not None:
                self._fail([delta.index], delta.error)
            elif delta.result is not None:
                handle.result = delta.result
                with self._lock:
                    del self._handles[delta.index]
                handle._put(replace(delta, index=0))
            elif delta.text or delta.logprobs:
                handle._put(replace(delta, index=0))

    def _fail(self, indices: list[int], error: Exception, stage: str = "decode") -> None:
        """End these requests with `error`, as an `NVLMError` so every caller can report it."""
        if not isinstance(error, NVLMError):
            cause = error
            error = RequestFailedError(
                f"the batch this request ran in failed ({type(cause).__name__}); retry it. "
                "The log has the full cause", stage=stage)
            error.__cause__ = cause
        for index in indices:
            with self._lock:
                handle = self._handles.pop(index, None)
            if handle is not None:
                handle.error = error
                handle._put(_END)
