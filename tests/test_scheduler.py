"""Continuous batching: concurrent requests, newcomers joining a running batch, queue limits, cancellation."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from nvlm_engine import NVLMEngine
from nvlm_engine.scheduler import QueueFullError, Scheduler, SchedulerClosedError

QUESTIONS = ["Hi", "What is the total?", "Describe the chart in detail please.", "Who?", "List the items.",
             "When was it signed, and by whom?", "Name a color.", "Count to five."]


def _conv(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


@pytest.fixture()
def scheduler(tiny_engine: NVLMEngine):
    s = Scheduler(tiny_engine, max_batch_size=4, max_queue=64)
    yield s
    s.close()


def test_concurrent_requests_equal_their_solo_answers(tiny_engine: NVLMEngine, scheduler: Scheduler) -> None:
    lengths = [6, 11, 3, 9, 7, 12, 5, 8]  # different lengths: rows leave and newcomers join mid-batch
    solo = [tiny_engine.generate(_conv(q), max_new_tokens=n) for q, n in zip(QUESTIONS, lengths)]
    results: dict[int, object] = {}

    def client(i: int) -> None:
        time.sleep(0.01 * i)  # staggered arrivals
        handle = scheduler.submit(tiny_engine.prepare(_conv(QUESTIONS[i]), max_new_tokens=lengths[i]))
        text = "".join(handle)
        results[i] = (text, handle.result)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, expected in enumerate(solo):
        text, result = results[i]
        assert result.token_ids == expected.token_ids, i
        assert text == result.text == expected.text
    assert scheduler.running == 0 and scheduler.queued == 0


def test_async_stream(tiny_engine: NVLMEngine, scheduler: Scheduler) -> None:
    expected = tiny_engine.generate(_conv("Hi"), max_new_tokens=10)

    async def main() -> tuple[list[str], object]:
        handle = scheduler.submit(tiny_engine.prepare(_conv("Hi"), max_new_tokens=10), loop=asyncio.get_running_loop())
        chunks = [c async for c in handle.astream()]
        return chunks, handle.result

    chunks, result = asyncio.run(main())
    assert "".join(chunks) == expected.text and result.token_ids == expected.token_ids


def test_cancel_frees_the_slot(tiny_engine: NVLMEngine, scheduler: Scheduler) -> None:
    handle = scheduler.submit(tiny_engine.prepare(_conv("Hi"), max_new_tokens=400))
    iterator = iter(handle)
    next(iterator)
    handle.cancel()
    list(iterator)
    assert handle.result.finish_reason == "cancelled"
    assert handle.result.usage.completion_tokens < 400
    deadline = time.time() + 5
    while scheduler.running and time.time() < deadline:
        time.sleep(0.01)
    assert scheduler.running == 0
    # the scheduler still serves
    assert scheduler.submit(tiny_engine.prepare(_conv("Hi"), max_new_tokens=2)).wait().usage.completion_tokens == 2


def test_full_queue_is_refused(tiny_engine: NVLMEngine) -> None:
    scheduler = Scheduler(tiny_engine, max_batch_size=1, max_queue=1)
    handles, refused = [], 0
    try:
        for _ in range(5):
            try:
                handles.append(scheduler.submit(tiny_engine.prepare(_conv("Hi"), max_new_tokens=300)))
            except QueueFullError as e:
                refused += 1
                assert "max_queue=1" in str(e)
        assert refused >= 3
    finally:
        for h in handles:
            h.cancel()
        scheduler.close()
    with pytest.raises(SchedulerClosedError):
        scheduler.submit(tiny_engine.prepare(_conv("Hi"), max_new_tokens=1))
