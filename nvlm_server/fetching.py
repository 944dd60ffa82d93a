"""Image URL fetches in their own bounded pool, under one deadline per request.

A fetch is slow on the remote host's terms: a host that never answers holds a thread until the
timeout. So fetches never run in the threads that convert and prepare requests (Starlette's
shared pool of 40): they run in `ImageFetchPool`'s few threads. A request's fetches share one
deadline, `ServerImagePolicy.fetch_timeout_s` from arrival, waiting for a free worker included; a
request that finds every worker busy for most of it (a worker freeing up with under a quarter
of the budget left is not taken) is answered 503. Text-only requests, and requests with inline
images only, never come here.

What may be fetched is `convert.py`'s `ServerImagePolicy` and the engine's `FetchPolicy`; this module
only decides where and until when.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
import weakref
from typing import Any

from starlette.concurrency import run_in_threadpool

from nvlm_engine.errors import ImageSourceError

from .convert import RequestRejected, ServerImagePolicy, fetch_image, image_urls, openai_to_engine_messages
from .schemas import Message

__all__ = ["ImageFetchPool", "convert_messages"]

# getaddrinfo has no timeout of its own: a fetch may outlive its deadline by a stuck DNS lookup,
# and the request stops waiting for it this long after the deadline.
_GRACE_S = 1.0
# A worker that frees up when less than this share of the request's budget is left is not used:
# the fetch could hardly finish, and "the workers were busy" is the true answer.
_MIN_SHARE_LEFT = 0.25


class ImageFetchPool:
    """A fixed number of fetch threads shared by all requests of one app.

    At most `workers` fetches are queued or running at any time, so the executor's queue never
    grows; a worker's slot is freed when its thread finishes, not when the request stops
    waiting, so an abandoned fetch still counts until its own deadline ends it.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="nvlm-image-fetch")
        self._slots = asyncio.Semaphore(workers)

    async def fetch(self, urls: list[str], policy: ServerImagePolicy) -> dict[str, bytes]:
        """Fetch every URL concurrently before the request's deadline; the first failure fails the request.

        Raises:
            RequestRejected: 503 when no worker frees up before the deadline; 400 when the
                policy refuses a URL or one of its redirects.
            ImageSourceError: a fetch failed or ran past the deadline.
            ImageTooLargeError: a body is larger than `policy.max_image_bytes`.
        """
        deadline = time.monotonic() + policy.fetch_timeout_s
        tasks = [asyncio.ensure_future(self._fetch_one(url, policy, deadline)) for url in urls]
        try:
            bodies = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()  # after the first failure the others are not waited for
        return dict(zip(urls, bodies))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _busy(self, policy: ServerImagePolicy) -> RequestRejected:
        return RequestRejected(
            f"all {self.workers} image-fetch workers of this server stayed busy for most of the request's "
            f"{policy.fetch_timeout_s:g} s image deadline; retry later, or send the image inline as a data URL",
            status=503, code="image_fetch_busy",
        )

    async def _fetch_one(self, url: str, policy: ServerImagePolicy, deadline: float) -> bytes:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise self._busy(policy) from None
        if deadline - time.monotonic() < _MIN_SHARE_LEFT * policy.fetch_timeout_s:
            self._slots.release()
            raise self._busy(policy)
        try:
            job = self._executor.submit(fetch_image, url, policy, deadline)
        except BaseException:
            self._slots.release()
            raise
        job.add_done_callback(lambda _: _call_soon(loop, self._slots.release))
        body = asyncio.wrap_future(job)
        body.add_done_callback(_retrieve)  # a result nobody waits for any more is not an error to log
        try:
            # shield: a request that stops waiting (client gone, another image failed) leaves the
            # thread to end at its own deadline rather than pretending to stop it.
            return await asyncio.wait_for(asyncio.shield(body), timeout=max(0.0, deadline - time.monotonic()) + _GRACE_S)
        except asyncio.TimeoutError:
            raise ImageSourceError(
                f"fetching {url!r} did not finish within the request's {policy.fetch_timeout_s:g} s image deadline; "
                "check the URL, or send the image inline as a data URL"
            ) from None


async def convert_messages(app: Any, messages: list[Message], policy: ServerImagePolicy) -> list[dict[str, Any]]:
    """`openai_to_engine_messages` for one request, its image URLs fetched first in `app`'s fetch pool.

    Args:
        app: the Starlette/FastAPI app whose `state` holds the pool (made at the first fetch).
        messages: the request's messages.
        policy: the image policy.
    """
    urls = image_urls(messages, policy)  # refusals that need no network come before any waiting
    fetched = await _pool(app, policy).fetch(urls, policy) if urls else {}
    return await run_in_threadpool(openai_to_engine_messages, messages, policy, fetched)


def _pool(app: Any, policy: ServerImagePolicy) -> ImageFetchPool:
    # Made on the event loop thread, so two first requests cannot both make one.
    pool = getattr(app.state, "image_fetch_pool", None)
    if pool is None:
        pool = app.state.image_fetch_pool = ImageFetchPool(policy.fetch_workers)
        weakref.finalize(app, pool.close)
    return pool


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Any) -> None:
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:
        pass  # the loop is closed: the server is gone, and its semaphore with it


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
