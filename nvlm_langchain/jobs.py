"""`ChatNVLM.batch` / `abatch`: all inputs submitted to the engine's scheduler at once, each
input still answered through its own `invoke` / `ainvoke`.

Every input keeps LangChain's own callbacks, tracing, caching and error handling: the inputs
are planned up front (a bad input keeps its error for its own call), the good ones are queued
together on the `LoadedEngine`'s scheduler (so an idle scheduler prefills them as one group),
and each input's invoke finds its handle through a context variable (a `Ticket`), set only
around that invoke.

Knows the scheduler's handles; knows nothing of messages or chunks.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nvlm_engine.scheduler import RequestHandle

__all__ = ["Ticket", "arun_batch", "run_batch", "take_ticket"]


@dataclass
class Ticket:
    """An input's slot in a submitted batch: its plan and handle, or why it could not be planned."""

    owner: object
    plan: Any = None
    handle: RequestHandle | None = None
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


def _tickets(owner: object, plans: list[Any], loop: asyncio.AbstractEventLoop | None) -> list[Ticket]:
    """Submits the inputs that planned, together per loaded engine; `plans` holds plans or exceptions."""
    good = [p for p in plans if not isinstance(p, BaseException)]
    handles: dict[int, RequestHandle] = {}
    by_engine: dict[int, list[Any]] = {}
    for plan in good:
        by_engine.setdefault(id(plan.loaded), []).append(plan)
    for group in by_engine.values():
        submitted = group[0].loaded.scheduler.submit_many([p.request for p in group], loop=loop)
        handles.update({id(p): h for p, h in zip(group, submitted)})
    return [Ticket(owner, error=p) if isinstance(p, BaseException) else Ticket(owner, plan=p, handle=handles[id(p)])
            for p in plans]


def _cancel(tickets: list[Ticket]) -> None:
    for ticket in tickets:  # no-op for finished requests; stops the rest if an input raised
        if ticket.handle is not None:
            ticket.handle.cancel()


def run_batch(owner: object, plans: list[Any], invoke: Callable[[int], Any], executor: Any, return_exceptions: bool) -> list[Any]:
    """Runs `invoke(i)` for every input in `executor`, each under its ticket (its queued request)."""
    tickets = _tickets(owner, plans, None)

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
        _cancel(tickets)


async def arun_batch(owner: object, plans: list[Any], ainvoke: Callable[[int], Any], max_concurrency: int | None,
                     return_exceptions: bool) -> list[Any]:
    """The async `run_batch`: `ainvoke(i)` as tasks (at most `max_concurrency` at once)."""
    tickets = _tickets(owner, plans, asyncio.get_running_loop())
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
        _cancel(tickets)
