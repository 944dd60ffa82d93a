"""The records generation passes around: a prepared request, the deltas and result it yields,
its usage and token log-probabilities, and the token ids the decoding loop needs.

Plain data, shared by `generation.py` (which produces them), the scheduler and the chat layer.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from .errors import RequestFailedError
from .sampling import SamplingOptions, TokenConstraint

__all__ = ["Delta", "GenerationResult", "PreparedRequest", "TokenIds", "TokenLogprob", "Usage"]


@dataclass(frozen=True)
class Usage:
    """Token accounting of one request. `prompt_tokens` includes the image tokens."""

    prompt_tokens: int
    completion_tokens: int
    image_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of one generated token, and optionally of the likeliest alternatives.

    Log-probabilities are `log_softmax` (fp32) of the model's raw next-token logits at that
    step: before the repetition, presence and frequency penalties, temperature, top-k/top-p
    and constraint masks. This is what vLLM returns by default ("raw logprobs"), so a greedy
    token is always the top-1 entry whatever the sampling settings.

    Attributes:
        token_id: the generated token.
        logprob: its log-probability.
        top: the request's `top_logprobs` likeliest `(token_id, logprob)` pairs, descending.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class GenerationResult:
    """The outcome of one request.

    Attributes:
        text: the answer, special tokens dropped, cut before `<|im_end|>` / a stop string, stripped.
        finish_reason: "stop" (end token or stop string), "length" (max_new_tokens) or
            "cancelled" (cancelled from another thread).
        usage: prompt (with image) and completion token counts.
        token_ids: the generated ids, without the end token.
        timings: seconds: "preprocess" (images + prompt), "first_token" (from the request's
            start), "total".
        logprobs: one `TokenLogprob` per id of `token_ids` when the request asked for
            `logprobs`, else None.
    """

    text: str
    finish_reason: str
    usage: Usage
    token_ids: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    logprobs: list[TokenLogprob] | None = None


@dataclass
class PreparedRequest:
    """A request ready for the model: what `decode_requests` consumes."""

    prompt_ids: list[int]
    pixel_values: torch.Tensor | None  # [tiles, 3, 448, 448] of all its images, in prompt order
    options: SamplingOptions
    image_tokens: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.perf_counter)
    preprocess_s: float = 0.0
    constraint: TokenConstraint | None = None  # e.g. a grammar matcher for tool calls / JSON
    image_tiles: tuple[int, ...] = ()  # tiles of each image, in prompt order (sum: pixel_values' rows)
    image_keys: tuple[int, ...] = ()  # each image's content hash (`image_cache.image_key`): cache keys


@dataclass(frozen=True)
class Delta:
    """Text that became safe to show for request `index`.

    Its last delta has `result` set when it finished, or `error` set (and no result) when it failed.
    `logprobs` holds the entries of the tokens recorded since the request's previous delta, so
    the deltas' logprobs, concatenated, are the result's (empty unless the request asked).
    """

    index: int
    text: str
    result: GenerationResult | None = None
    error: RequestFailedError | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class TokenIds:
    """The ids the decoding loop needs from the tokenizer."""

    end: int  # <|im_end|>
    image: int  # <|vision_pad|>
    pad: int  # filler for left padding; never attended to
