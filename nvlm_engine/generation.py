"""Generation, top to bottom: prefill -> decode one token -> decode until done.

`decode_requests()` is the one loop: it takes prepared requests (prompt ids, tiles, options),
prefills them together as one left-padded batch, then decodes one token per live request per
step, handing out text deltas as they become safe to show. Finished requests leave the batch
(their KV rows are dropped), so a long answer never waits on short ones and short ones never
pay for long ones. Greedy outputs of a batch equal the one-by-one outputs.

Knows the model's forward functions and a tokenizer's `decode`; knows nothing of images on
disk, prompt formats or public API shapes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .model import LLMStep, NVLMModel, build_attention_mask
from .sampling import SamplingOptions, TokenConstraint, apply_constraint, apply_repetition_penalty, sample_token
from .textstream import Decoder, TextStream


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
    """

    text: str
    finish_reason: str
    usage: Usage
    token_ids: list[int]
    timings: dict[str, float] = field(default_factory=dict)


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


@dataclass(frozen=True)
class Delta:
    """Text that became safe to show for request `index`; `result` is set on its last delta."""

    index: int
    text: str
    result: GenerationResult | None = None


@dataclass(frozen=True)
class TokenIds:
    """The ids the decoding loop needs from the tokenizer."""

    end: int  # <|im_end|>
    image: int  # <|vision_pad|>
    pad: int  # filler for left padding; never attended to


class _Row:
    """Decoding state of one live request."""

    def __init__(self, index: int, request: PreparedRequest, decoder: Decoder, device: torch.device) -> None:
        self.index = index
        self.request = request
        self.options = request.options
        self.generator = request.options.generator(device)
        self.stream = TextStream(decoder, request.options.stop)
        self.generated: list[int] = []
        self.seen = torch.tensor(request.prompt_ids, dtype=torch.long)
        self.first_token_at: float | None = None
        self.finish_reason: str | None = None

    def result(self) -> GenerationResult:
        now = time.perf_counter()
        request = self.request
        return GenerationResult(
            text=self.stream.text,
            finish_reason=self.finish_reason or "stop",
            usage=Usage(len(request.prompt_ids), len(self.generated), request.image_tokens),
            token_ids=list(self.generated),
            timings={
                "preprocess": request.preprocess_s,
                "first_token": (self.first_token_at or now) - request.started,
                "total": now - request.started,
            },
        )


@torch.inference_mode()
def prefill(model: NVLMModel, requests: list[PreparedRequest], ids: TokenIds) -> tuple[torch.Tensor, LLMStep, torch.Tensor]:
    """Encode images, splice them into the left-padded prompts and run the decoder once.

    Returns the last-position logits [B, V], the step state (cache) and the validity mask [B, K].
    """
    tiles = [r.pixel_values for r in requests if r.pixel_values is not None]
    image_tokens = model.encode_images(torch.cat(tiles)) if tiles else None  # [sum tiles * 256, hidden]
    longest = max(len(r.prompt_ids) for r in requests)
    input_ids = torch.full((len(requests), longest), ids.pad, dtype=torch.long)
    valid = torch.zeros((len(requests), longest), dtype=torch.bool)
    for row, request in enumerate(requests):
        n = len(request.prompt_ids)
        input_ids[row, longest - n :] = torch.tensor(request.prompt_ids, dtype=torch.long)
        valid[row, longest - n :] = True
    embeds = model.embed(input_ids, image_tokens, ids.image)  # [B, S, hidden]
    device = embeds.device
    valid = valid.to(device)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # pads share position 0, unattended
    from transformers import DynamicCache

    step = LLMStep(positions, build_attention_mask(valid, longest), DynamicCache())
    return model.forward_llm(embeds, step), step, valid


@torch.inference_mode()
def decode_one(model: NVLMModel, tokens: torch.Tensor, step: LLMStep, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed one token per row [B] and return the next logits [B, V] and the grown validity mask."""
    valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
    step.position_ids = step.position_ids[:, -1:] + 1
    step.attention_mask = build_attention_mask(valid, 1)
    embeds = model.embed(tokens[:, None], None, -1)
    return model.forward_llm(embeds, step), valid


def decode_requests(
    model: NVLMModel, requests: list[PreparedRequest], decoder: Decoder, ids: TokenIds
) -> Iterator[Delta]:
    """Generate every request to its end, yielding text deltas as they are ready.

    Each request ends on `<|im_end|>` or one of its stop token ids / stop strings ("stop"),
    after its `max_new_tokens` ("length"), or when its `cancel` event is set ("cancelled").
    Exactly one `Delta` with `result` set is yielded per request.
    """
    device = model.language_model.lm_head.weight.device
    rows = [_Row(i, r, decoder, device) for i, r in enumerate(requests)]
    for row in rows:  # cancelled before any compute
        if row.request.cancel.is_set():
            row.finish_reason = "cancelled"
            yield Delta(row.index, "", row.result())
    rows = [row for row in rows if row.finish_reason is None]
    if not rows:
        return
    logits, step, valid = prefill(model, [row.request for row in rows], ids)
    while rows:
        tokens: list[int] = []
        for i, row in enumerate(rows):
            token = _choose(row, logits[i])
            tokens.append(token)
            delta = _advance(row, token, ids.end)
            if row.finish_reason is not None:
                delta += row.stream.finish()
                yield Delta(row.index, delta, row.result())
            elif delta:
                yield Delta(row.index, delta)
        keep = [i for i, row in enumerate(rows) if row.finish_reason is None]
        if not keep:
            return
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=valid.device)
            step.cache.batch_select_indices(index)
            step.position_ids = step.position_ids[index]
            valid = valid[index]
            rows = [rows[i] for i in keep]
            tokens = [tokens[i] for i in keep]
        logits, valid = decode_one(model, torch.tensor(tokens, device=valid.device), step, valid)


def _choose(row: _Row, logits: torch.Tensor) -> int:
    options = row.options
    if options.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, row.seen, options.repetition_penalty)
    logits = apply_constraint(logits, row.request.constraint)
    return sample_token(logits, options, row.generator)


def _advance(row: _Row, token: int, end_id: int) -> str:
    """Record `token` for `row`; sets `row.finish_reason` when the row is done. Returns the delta."""
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
    if row.options.repetition_penalty != 1.0:
        row.seen = torch.cat([row.seen, torch.tensor([token])])
    delta = row.stream.push(token)
    if row.stream.stopped or (constraint is not None and constraint.done):
        row.finish_reason = "stop"
    elif len(row.generated) >= row.options.max_new_tokens:
        row.finish_reason = "length"
    return delta
