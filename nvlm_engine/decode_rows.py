"""One request's decoding state (`Row`), what recording a token does to it, and its failure delta.

A row carries the request, its text stream and generated ids, and where it is in the engine's
KV cache (`slot`, `length`: positions holding its keys and values). `record_token` applies
one chosen token: end and stop checks, the constraint, the text delta. Plain host-side
bookkeeping; knows nothing of tensors' devices or of the model.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from .errors import NVLMError, RequestFailedError
from .generation_records import Delta, GenerationResult, PreparedRequest, TokenLogprob, Usage
from .textstream import Decoder, TextStream

logger = logging.getLogger(__name__)


class Row:
    """Decoding state of one request."""

    def __init__(self, index: int, request: PreparedRequest, decoder: Decoder) -> None:
        self.index = index
        self.request = request
        self.options = request.options
        self.stream = TextStream(decoder, request.options.stop, strip_leading=not request.options.continuation)
        self.generated: list[int] = []
        self.logprobs: list[TokenLogprob] = []  # one per generated token, when asked
        self.unsent = 0  # logprobs not yet handed out in a delta
        self.first_token_at: float | None = None
        self.finish_reason: str | None = None
        # Where it is in the engine: its KV cache slot and how many positions hold its KV.
        self.slot: int | None = None
        self.length = 0
        self.keys: np.ndarray = np.zeros(0, dtype=np.int64)  # content keys of its prompt
        self.embeds: torch.Tensor | None = None  # [1, S, hidden] while its prompt is prefilled
        self.logits: torch.Tensor | None = None  # [V] after its prefill, until sampled
        self.next_token = -1  # the token the next decode step feeds
        self.looked_up = False  # its prefix lookup was counted (a waiting request looks again uncounted)

    def take_logprobs(self) -> tuple[TokenLogprob, ...]:
        """The logprobs recorded since the last call (the next delta's)."""
        if not self.unsent:
            return ()
        taken = tuple(self.logprobs[-self.unsent :])
        self.unsent = 0
        return taken

    def result(self) -> GenerationResult:
        now = time.perf_counter()
        request = self.request
        return GenerationResult(
            text=self.stream.text,
            finish_reason=self.finish_reason or "stop",
            usage=Usage(len(request.prompt_ids), len(self.generated), request.image_tokens),
            token_ids=list(self.generated),
            logprobs=list(self.logprobs) if self.options.logprobs else None,
            timings={
                "preprocess": request.preprocess_s,
                "first_token": (self.first_token_at or now) - request.started,
                "total": now - request.started,
            },
        )


def record_token(row: Row, token: int, logprob: TokenLogprob | None, end_id: int) -> str:
    """Record `token` for `row`; sets `row.finish_reason` when the row is done. Returns the delta text."""
    if row.first_token_at is None:
        row.first_token_at = time.perf_counter()
    if row.request.cancel.is_set():
        row.finish_reason = "cancelled"
        return ""
    if token == end_id or token in row.options.stop_token_ids:
        row.finish_reason = "stop"
        return ""
    constraint = row.request.constraint
    if constraint is not None:
        constraint.accept(token)
    row.generated.append(token)
    if row.options.logprobs and logprob is not None:
        row.logprobs.append(logprob)
        row.unsent += 1
    delta = row.stream.push(token)
    if row.stream.stopped or (constraint is not None and constraint.done):
        row.finish_reason = "stop"
    elif len(row.generated) >= row.options.max_new_tokens:
        row.finish_reason = "length"
    return delta


def failed_delta(index: int, stage: str, doing: str, cause: Exception) -> Delta:
    """The final delta of a request that failed; the message names the failure, never the content."""
    logger.warning("request %d failed while %s", index, doing, exc_info=cause)
    detail = f"{type(cause).__name__}: {cause}" if isinstance(cause, NVLMError) else type(cause).__name__
    error = RequestFailedError(
        f"the request failed while {doing} ({detail}); the other requests were not affected. "
        "Check its sampling options, images and constraint; the log has the full cause",
        stage=stage,
    )
    error.__cause__ = cause
    return Delta(index, "", error=error)
