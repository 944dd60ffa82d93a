"""Generation, top to bottom: prefill -> decode one token -> decode until done.

`decode_requests()` is the one loop: it takes prepared requests (prompt ids, tiles, options),
prefills them together as one left-padded batch, then decodes one token per live request per
step, handing out text deltas as they become safe to show. Finished requests leave the batch
(their KV rows are dropped), so a long answer never waits on short ones and short ones never
pay for long ones. Greedy outputs of a batch equal the one-by-one outputs.

A failure that belongs to one request (seeding its generator, choosing its token, a prefill
that fails only with it in the group) ends that request alone with a `RequestFailedError`;
the rest of the batch goes on token for token as if it had never been there.

Requests that ask for `logprobs` get each generated token's log-probability under the raw
logits (`TokenLogprob`), computed for all of them at once per step.

Knows the model's forward functions and a tokenizer's `decode`; knows nothing of images on
disk, prompt formats or public API shapes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import torch

from .errors import NVLMError, RequestFailedError
from .generation_records import (  # noqa: F401 (re-exported: the public names of generation)
    Delta,
    GenerationResult,
    PreparedRequest,
    TokenIds,
    TokenLogprob,
    Usage,
)
from .model import LLMStep, NVLMModel, build_attention_mask
from .sampling import (
    apply_constraint,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    sample_token,
)
from .textstream import Decoder, TextStream

logger = logging.getLogger(__name__)


class _Row:
    """Decoding state of one live request."""

    def __init__(self, index: int, request: PreparedRequest, decoder: Decoder, device: torch.device) -> None:
        self.index = index
        self.request = request
        self.options = request.options
        self.generator = request.options.generator(device)
        self.stream = TextStream(decoder, request.options.stop)
        self.generated: list[int] = []
        self.logprobs: list[TokenLogprob] = []  # one per generated token, when asked
        self.unsent = 0  # logprobs not yet handed out in a delta
        # Per-vocabulary state of the penalties, on the logits' device, updated in place per
        # token; made at the first step, when the vocabulary width is known.
        self.seen: torch.Tensor | None = None  # bool [V]: prompt and generated ids (repetition)
        self.counts: torch.Tensor | None = None  # fp32 [V]: generated ids (presence, frequency)
        self.first_token_at: float | None = None
        self.finish_reason: str | None = None

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


class DecodeBatch:
    """Requests being decoded together: their rows, KV cache, validity mask and next logits.

    `start()` prefills a group of requests; `advance()` picks one token per row, hands out the
    deltas, drops finished rows and runs the next decoder step; `merge()` joins a freshly
    prefilled batch to a running one (continuous batching: newcomers do not wait for the
    running requests to finish). Rows carry the caller's `index` so deltas can be routed.
    """

    def __init__(self, model: NVLMModel, rows: list[_Row], ids: TokenIds) -> None:
        self.model = model
        self.rows = rows
        self.ids = ids
        self.logits: torch.Tensor | None = None
        self.step: LLMStep | None = None
        self.valid: torch.Tensor | None = None

    @classmethod
    def start(
        cls, model: NVLMModel, requests: list[tuple[int, PreparedRequest]], decoder: Decoder, ids: TokenIds
    ) -> tuple[DecodeBatch, list[Delta]]:
        """Prefill `(index, request)` pairs; requests cancelled before any compute end at once.

        A request whose row cannot be built, or whose prefill fails, ends with an error delta;
        the others are prefilled without it.
        """
        device = model.language_model.lm_head.weight.device
        rows: list[_Row] = []
        done: list[Delta] = []
        for index, request in requests:
            try:
                row = _Row(index, request, decoder, device)
            except Exception as e:  # e.g. seeding its generator: that request only
                done.append(_failed(index, "prefill", "preparing its sampling state", e))
                continue
            if request.cancel.is_set():
                row.finish_reason = "cancelled"
                done.append(Delta(row.index, "", row.result()))
            else:
                rows.append(row)
        batch, failed = cls._prefill(model, rows, ids)
        return batch, done + failed

    @classmethod
    def _prefill(cls, model: NVLMModel, rows: list[_Row], ids: TokenIds) -> tuple[DecodeBatch, list[Delta]]:
        """Prefill `rows` as one group; if that fails, one by one, so only the culprits fail."""
        batch = cls(model, rows, ids)
        if not rows:
            return batch, []
        try:
            batch.logits, batch.step, batch.valid = prefill(model, [row.request for row in rows], ids)
            return batch, []
        except Exception as e:
            if len(rows) == 1:
                return cls(model, [], ids), [_failed(rows[0].index, "prefill", "prefilling its prompt", e)]
            logger.warning("prefill of a group of %d requests failed; retrying them one by one", len(rows), exc_info=e)
        batch, failed = cls(model, [], ids), []
        for row in rows:
            alone, errors = cls._prefill(model, [row], ids)
            batch.merge(alone)
            failed += errors
        return batch, failed

    def merge(self, other: DecodeBatch) -> None:
        """Append `other`'s rows; the shorter cache is left-padded (padding is never attended)."""
        if not other.rows:
            return
        if not self.rows:
            self.rows, self.logits, self.step, self.valid = other.rows, other.logits, other.step, other.valid
            return
        assert self.step and other.step and self.valid is not None and other.valid is not None
        assert self.logits is not None and other.logits is not None
        length = max(self.valid.shape[1], other.valid.shape[1])
        for cache in (self.step.cache, other.step.cache):
            _left_pad_cache(cache, length)
        for a, b in zip(self.step.cache.layers, other.step.cache.layers):
            a.keys = torch.cat([a.keys, b.keys.to(a.keys.device)])
            a.values = torch.cat([a.values, b.values.to(a.values.device)])
        self.valid = torch.cat([_left_pad(self.valid, length), _left_pad(other.valid, length).to(self.valid.device)])
        self.step.position_ids = torch.cat([self.step.position_ids[:, -1:], other.step.position_ids[:, -1:].to(self.step.position_ids.device)])
        self.step.attention_mask = None  # rebuilt by the next decode step
        self.logits = torch.cat([self.logits, other.logits.to(self.logits.device)])
        self.rows += other.rows

    def advance(self) -> list[Delta]:
        """Choose one token per row, return the deltas, and compute the next logits.

        A row whose token cannot be chosen or recorded ends alone with an error delta.
        """
        assert self.logits is not None and self.step is not None and self.valid is not None
        outcomes: list[Delta | tuple[_Row, str]] = []  # per row: its failure, or its new text
        tokens: list[int] = []
        picks: list[tuple[int, int]] = []  # (batch row, token) of recorded tokens asking for logprobs
        for i, row in enumerate(self.rows):
            try:
                token = _choose(row, self.logits[i])
                before = len(row.generated)
                text = _advance(row, token, self.ids.end)
            except Exception as e:  # this row's sampling or constraint: never the batch's
                row.finish_reason = "error"
                tokens.append(self.ids.pad)  # dropped with the row below
                outcomes.append(_failed(row.index, "decode", f"choosing token {len(row.generated) + 1}", e))
                continue
            tokens.append(token)
            if row.options.logprobs and len(row.generated) > before:
                picks.append((i, token))
            outcomes.append((row, text))
        if picks:
            _record_logprobs(self.logits, [self.rows[i] for i, _ in picks], picks)
        deltas: list[Delta] = []
        for outcome in outcomes:
            if isinstance(outcome, Delta):
                deltas.append(outcome)
                continue
            row, text = outcome
            if row.finish_reason is not None:
                text += row.stream.finish()
                deltas.append(Delta(row.index, text, row.result(), logprobs=row.take_logprobs()))
            elif text:
                deltas.append(Delta(row.index, text, logprobs=row.take_logprobs()))
        keep = [i for i, row in enumerate(self.rows) if row.finish_reason is None]
        if len(keep) < len(self.rows):
            self.rows = [self.rows[i] for i in keep]
            tokens = [tokens[i] for i in keep]
            if not keep:
                self.logits = self.step = self.valid = None
                return deltas
            index = torch.tensor(keep)  # a CPU index works for cache layers on every device
            self.step.cache.batch_select_indices(index)
            self.step.position_ids = self.step.position_ids[index]
            self.valid = self.valid[index]
        self.logits, self.valid = decode_one(self.model, torch.tensor(tokens, device=self.valid.device), self.step, self.valid)
        return deltas


def decode_requests(
    model: NVLMModel, requests: list[PreparedRequest], decoder: Decoder, ids: TokenIds
) -> Iterator[Delta]:
    """Generate every request to its end, yielding text deltas as they are ready.

    Each request ends on `<|im_end|>` or one of its stop token ids / stop strings ("stop"),
    after its `max_new_tokens` ("length"), or when its `cancel` event is set ("cancelled").
    Exactly one final `Delta` is yielded per request, with `result` set, or with `error` set
    when that request failed; `Delta.index` is the request's position in `requests`.

    Raises:
        RequestFailedError: the first request's failure, once every other request has ended,
            so callers that expect one result per request never see one missing.
    """
    failure: RequestFailedError | None = None
    batch, done = DecodeBatch.start(model, list(enumerate(requests)), decoder, ids)
    while True:
        for delta in done:
            failure = failure or delta.error
            yield delta
        if not batch.rows:
            break
        done = batch.advance()
    if failure is not None:
        raise failure


def _left_pad(valid: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - valid.shape[1]
    return torch.nn.functional.pad(valid, (missing, 0), value=False) if missing else valid


def _left_pad_cache(cache: object, length: int) -> None:
    for layer in cache.layers:  # transformers DynamicCache: keys/values [B, H, K, D]
        missing = length - layer.keys.shape[-2]
        if missing:
            layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, missing, 0))
            layer.values = torch.nn.functional.pad(layer.values, (0, 0, missing, 0))


def _failed(index: int, stage: str, doing: str, cause: Exception) -> Delta:
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


def _record_logprobs(logits: torch.Tensor, rows: list[_Row], picks: list[tuple[int, int]]) -> None:
    """Append each picked token's `TokenLogprob` to its row, from the raw logits [B, V].

    One `log_softmax` over the rows that ask and one copy to the host for all of them.
    """
    device = logits.device
    index = torch.tensor([i for i, _ in picks], device=device)
    chosen = torch.tensor([t for _, t in picks], device=device)
    logprobs = torch.log_softmax(logits[index].float(), dim=-1)  # [R, V]
    columns = [logprobs.gather(1, chosen[:, None]).double()]  # [R, 1]
    k = min(max(row.options.top_logprobs for row in rows), logprobs.shape[-1])
    if k:
        top = torch.topk(logprobs, k, dim=-1)  # sorted, descending
        # Ids travel as float64 (exact below 2**53) so everything crosses to the host at once.
        columns += [top.values.double(), top.indices.double()]
    host = torch.cat(columns, dim=1).tolist()  # [R, 1 + 2k]
    for row, (_, token), values in zip(rows, picks, host):
        n = row.options.top_logprobs
        top_pairs = tuple((int(values[1 + k + j]), values[1 + j]) for j in range(n))
        row.logprobs.append(TokenLogprob(token, values[0], top_pairs))
        row.unsent += 1


def _choose(row: _Row, logits: torch.Tensor) -> int:
    """Penalties (vLLM's order: repetition, then presence/frequency), constraint, sampling."""
    options = row.options
    if options.repetition_penalty != 1.0:
        if row.seen is None:
            row.seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            seen = torch.tensor(row.request.prompt_ids + row.generated, dtype=torch.long)
            row.seen[seen.to(logits.device)] = True
        logits = apply_repetition_penalty(logits, row.seen, options.repetition_penalty)
    if options.presence_penalty or options.frequency_penalty:
        if row.counts is None:
            row.counts = torch.zeros(logits.shape[-1], dtype=torch.float32, device=logits.device)
        logits = apply_presence_frequency_penalty(
            logits, row.counts, options.presence_penalty, options.frequency_penalty
        )
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
    if row.seen is not None:
        row.seen[token] = True  # in place on the device: no host sync, no copy of the history
    if row.counts is not None:
        row.counts[token] += 1
    delta = row.stream.push(token)
    if row.stream.stopped or (constraint is not None and constraint.done):
        row.finish_reason = "stop"
    elif len(row.generated) >= row.options.max_new_tokens:
        row.finish_reason = "length"
    return delta
