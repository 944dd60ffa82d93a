"""Driving a decode core to the end of a list of requests: the loop `NVLMEngine.run` and `stream` use.

Knows `DecodeCore`'s admit/step interface and the deltas it hands out; knows nothing of models.
"""

from __future__ import annotations

from collections.abc import Iterator

from .errors import RequestFailedError
from .generation import DecodeCore, Delta, PreparedRequest


def decode_requests(core: DecodeCore, requests: list[PreparedRequest]) -> Iterator[Delta]:
    """Generate every request to its end on `core`, yielding text deltas as they are ready.

    Each request ends on `<|im_end|>` or one of its stop token ids / stop strings ("stop"),
    after its `max_new_tokens` ("length"), or when its `cancel` event is set ("cancelled").
    Exactly one final `Delta` is yielded per request, with `result` set, or with `error` set
    when that request failed; `Delta.index` is the request's position in `requests`.

    Raises:
        RequestFailedError: the first request's failure, once every other request has ended,
            so callers that expect one result per request never see one missing.
    """
    failure: RequestFailedError | None = None
    pending = len(requests)
    done = core.admit(list(enumerate(requests)))
    try:
        while True:
            for delta in done:
                if delta.result is not None or delta.error is not None:
                    pending -= 1
                failure = failure or delta.error
                yield delta
            if not pending:
                break
            done = core.step()
    finally:
        if pending:  # the consumer left early: end our requests, keep the core usable
            for request in requests:
                request.cancel.set()
            while core.busy:
                core.step()
    if failure is not None:
        raise failure
