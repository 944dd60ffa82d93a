"""Engine work off the caller's thread: one worker thread per engine batch, deltas by channel.

- `EngineJob` decodes prepared requests as one engine batch (`NVLMEngine.stream_batch`) in one
  worker thread and hands each request's deltas to its `DeltaChannel`.
- A `DeltaChannel` is read either by a thread (blocking) or by an asyncio task, which the
  worker wakes with `loop.call_soon_threadsafe`: async streaming costs no executor hop per token.
- `run_batch` / `arun_batch` give `ChatNVLM.batch` / `abatch` one engine batch for all inputs
  while each input still goes through `invoke` / `ainvoke`, so every input keeps LangChain's
  own callbacks, tracing, caching and error handling. Each input's invoke finds its slot of
  the running batch through a context variable (a `Ticket`), set only around that invoke.

Knows the engine's streaming API; knows nothing of messages or chunks.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from nvlm_engine import NVLMEngine, PreparedRequest
from nvlm_engine.generation import Delta

__all__ = ["DeltaChannel", "EngineJob", "Ticket", "arun_batch", "run_batch", "take_ticket"]


class DeltaChannel:
    """One request's deltas, from the engine thread to one consumer; ends with the delta that has `result`."""

    def __init__(self) -> None:
        self._items: deque[Delta | BaseException] = deque()
        self._cond = threading.Condition()
        self._wake: Callable[[], None] | None = None
        self._waiting = False  # an asyncio consumer is parked on an empty channel

    def put(self, item: Delta | BaseException) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify()
            wake, self._waiting = (self._wake if self._waiting else None), False
        if wake is not None:  # only a parked consumer needs the loop woken: one wake-up per wait
            wake()

    def __iter__(self) -> Iterator[Delta]:
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                item = self._items.popleft()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.result is not None:
                return

    async def __aiter__(self) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the loop closed while the engine was still decoding
                pass

        with self._cond:
            self._wake = wake
        while True:
            with self._cond:
                item = self._items.popleft() if self._items else None
                if item is None:
                    ready.clear()  # under the lock: a put after this schedules a set after it
                    self._waiting = True
            if item is None:
                await ready.wait()
                continue
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.result is not None:
                return


class EngineJob:
    """Prepared requests decoding as one batch in a worker thread."""

    def __init__(self, engine: NVLMEngine, requests: Sequence[PreparedRequest]) -> None:
        self.requests = list(requests)
        self.channels = [DeltaChannel() for _ in self.requests]
        self._thread = threading.Thread(target=self._run, args=(engine,), name="nvlm-engine-job", daemon=True)
        self._thread.start()

    def _run(self, engine: NVLMEngine) -> None:
        finished: set[int] = set()
        try:
            for delta in engine.stream_batch(self.requests):
                if delta.result is not None:
                    finished.add(delta.index)
                self.channels[delta.index].put(delta)
        except BaseException as e:  # noqa: BLE001 - handed to every waiting consumer
            for index, channel in enumerate(self.channels):
                if index not in finished:
                    channel.put(e)

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel.set()


@dataclass
class Ticket:
    """An input's slot in a running batch: its plan and channel, or why it could not be planned."""

    owner: object
    plan: Any = None
    channel: DeltaChannel | None = None
    error: BaseException | None = None
    used: bool = False


_ticket: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar("nvlm_batch_ticket", default=None)


def take_ticket(owner: object) -> Ticket | None:
    """The batch slot of the call running in this context, once (nested calls plan their own)."""
    ticket = _ticket.get()
    if ticket is None or ticket.used or ticket.owner is not owner:
        return None
    ticket.used = True
    if ticket.error is not None:
        raise ticket.error
    return ticket


def _tickets(owner: object, plans: list[Any]) -> tuple[list[Ticket], EngineJob | None]:
    """Starts one engine job for the inputs that planned; `plans` holds plans or exceptions."""
    good = [p for p in plans if not isinstance(p, BaseException)]
    job = EngineJob(good[0].engine, [p.request for p in good]) if good else None
    channels = iter(job.channels if job else [])
    tickets = [
        Ticket(owner, error=p) if isinstance(p, BaseException) else Ticket(owner, plan=p, channel=next(channels))
        for p in plans
    ]
    return tickets, job


def run_batch(owner: object, plans: list[Any], invoke: Callable[[int], Any], executor: Any, return_exceptions: bool) -> list[Any]:
    """Runs `invoke(i)` for every input in `executor`, each under its ticket of one engine job."""
    tickets, job = _tickets(owner, plans)

    def one(index: int) -> Any:
        token = _ticket.set(tickets[index])
        try:
            return invoke(index)
        except Exception as e:
            if return_exceptions:
                return e
            raise
        finally:
            _ticket.reset(token)

    try:
        return list(executor.map(one, range(len(plans))))
    finally:
        if job is not None:
            job.cancel()  # no-op for finished requests; stops the rest if an input raised


async def arun_batch(owner: object, plans: list[Any], ainvoke: Callable[[int], Any], max_concurrency: int | None,
                     return_exceptions: bool) -> list[Any]:
    """The async `run_batch`: `ainvoke(i)` as tasks (at most `max_concurrency` at once)."""
    tickets, job = _tickets(owner, plans)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(index: int) -> Any:
        token = _ticket.set(tickets[index])
        try:
            if gate is None:
                return await ainvoke(index)
            async with gate:
                return await ainvoke(index)
        except Exception as e:
            if return_exceptions:
                return e
            raise
        finally:
            _ticket.reset(token)

    try:
        return list(await asyncio.gather(*(one(i) for i in range(len(plans)))))
    finally:
        if job is not None:
            job.cancel()
