"""Generation, top to bottom: admit -> prefill in chunks -> sample -> decode one token -> repeat.

`DecodeCore` owns the decoding state of one engine (or one scheduler): the KV cache slots
(`kv_cache.py`), the device-side sampler (`batch_sampling.py`), the prefix index
(`prefix_cache.py`) and the shared image-embedding cache (`image_cache.py`). Every `step()` is
one forward pass (`decoder.mixed_step`) over:

1. a new token for every running row, and
2. the next chunks of the prompts waiting to be prefilled, up to a budget of tokens
   (`chunk_budget.py`) that keeps the step's time within a bound of a decode-only step: a long
   image prompt is prefilled over several steps, riding along with the running rows (the
   weights are read once for both), and running streams never stall for a whole prefill;

then samples one token for every row that has logits (the running rows, and the rows whose
prompt that pass completed) with one host transfer for the whole batch, hands out text
deltas, and ends the rows that are done (their slot stays cached for a later request with the
same prefix).

A request whose prompt starts with content a slot already holds (the same conversation's
previous turn, the same document page) reuses that KV: it takes the idle slot over, or copies
the prefix from a running one, and prefills only the rest. Images whose embeddings are cached
skip the vision tower. A hit produces exactly the tokens a miss produces (the cached keys are
the ones the miss would compute, up to float rounding of a different chunking).

A failure that belongs to one request (seeding, choosing its token, its prefill) ends that
request alone with a `RequestFailedError`; the rest go on token for token.

Knows the model's forward functions and a tokenizer's `decode`; knows nothing of images on
disk, prompt formats or public API shapes.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

import numpy as np
import torch

from .batch_sampling import BatchSampler
from .chunk_budget import ChunkBudget
from .decode_rows import Row, failed_delta, record_token
from .decoder import Chunk, compile_decode, decode_layers, decode_step, mixed_step
from .generation_records import (  # noqa: F401 (re-exported: the public names of generation)
    Delta,
    GenerationResult,
    PreparedRequest,
    TokenIds,
    TokenLogprob,
    Usage,
)
from .image_cache import ImageEmbeddingCache, image_key
from .kv_cache import KVCache, KVCacheFullError, KVCacheGrowing
from .model import NVLMModel
from .prefix_cache import PrefixIndex, content_keys
from .slot_placement import SlotPlanner
from .textstream import Decoder

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_TOKENS = 512  # prompt tokens prefilled per step (one image tile is 256)


class DecodeCore:
    """The decoding state of one stream of requests; not thread-safe (one owner thread).

    Args:
        model, decoder, ids: the loaded model, a tokenizer's `decode`, its special token ids.
        context_length: tokens per sequence at most.
        kv_tokens: KV cache tokens at most over all slots (the placement plan's room), None: no bound.
        max_slots: sequences held at most (running and cached).
        chunk_tokens: prompt tokens prefilled per step.
        prefix_caching: keep finished sequences' KV for later requests with the same prefix.
        image_cache: shared cache of image embeddings (None: no image caching).
        compile: run the decode step through `torch.compile(fullgraph=True)` (CUDA graphs on CUDA)
            with rows and window in power-of-two buckets; eager is the default and the reference.
    """

    def __init__(self, model: NVLMModel, decoder: Decoder, ids: TokenIds, *, context_length: int,
                 kv_tokens: int | None = None, max_slots: int = 64, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 prefix_caching: bool = True, image_cache: ImageEmbeddingCache | None = None,
                 compile: bool = False) -> None:
        self.model, self.decoder, self.ids = model, decoder, ids
        lm = model.language_model
        layers = lm.model.layers
        self.device = lm.lm_head.weight.device
        self.embed_device = lm.model.embed_tokens.weight.device
        self._cache_args: dict[str, Any] = {
            "kv_heads": lm.config.num_key_value_heads, "head_dim": layers[0].self_attn.head_dim,
            "max_capacity": context_length, "max_tokens": kv_tokens, "max_slots": max_slots,
            "static_addresses": compile}
        self.kv = self._new_cache()
        self.sampler = BatchSampler(lm.lm_head.out_features, self.device, slots=1)
        self.prefix = PrefixIndex(enabled=prefix_caching)
        self.images = image_cache if image_cache is not None else ImageEmbeddingCache(0)
        self.chunk_tokens = max(1, chunk_tokens)
        self.budget = ChunkBudget(self.chunk_tokens)
        self.tokens_per_tile = model.config.tokens_per_tile
        self.waiting: deque[Row] = deque()  # admitted, no slot yet (the cache is full)
        self.prefilling: deque[Row] = deque()  # holding a slot, prompt not yet all in the cache
        self.running: dict[int, Row] = {}  # slot -> row, decoding
        self.ready: list[Row] = []  # rows with logits to sample from
        self.logits: torch.Tensor | None = None  # [B, V] of the last decode step (row i = slot i)
        self._step = compile_decode(decode_layers, self.device) if compile else None
        self.compiled = compile

    def _layer_devices(self) -> list[torch.device]:
        return [layer.input_layernorm.weight.device for layer in self.model.language_model.model.layers]

    def _new_cache(self) -> KVCache:
        link = getattr(self.model, "tp_link", None)  # tensor parallelism: the workers mirror every cache
        make = KVCache if link is None else link.new_cache
        return make(self._layer_devices(), dtype=self.model.language_model.model.embed_tokens.weight.dtype,
                    **self._cache_args)

    def _follow_the_model(self) -> None:
        """Rebuild the (empty) cache if the model's layers moved since it was made (tests move them)."""
        if not self.busy and self.kv.layer_devices != self._layer_devices():
            for slot in self.prefix.idle_slots():
                self.prefix.forget(slot)
            self.kv = self._new_cache()
            lm = self.model.language_model
            self.device, self.embed_device = lm.lm_head.weight.device, lm.model.embed_tokens.weight.device
            self.sampler = BatchSampler(lm.lm_head.out_features, self.device, slots=1)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running or self.ready)

    # --- admission -----------------------------------------------------------------------

    def admit(self, requests: list[tuple[int, PreparedRequest]]) -> list[Delta]:
        """Take `(index, request)` pairs; a request cancelled or failing before any compute ends at once."""
        self._follow_the_model()
        done: list[Delta] = []
        for index, request in requests:
            if request.cancel.is_set():
                row = Row(index, request, self.decoder)
                row.finish_reason = "cancelled"
                done.append(Delta(index, "", row.result()))
                continue
            try:
                row = Row(index, request, self.decoder)
                row.keys = self._content_keys(request)
            except Exception as e:  # that request only
                done.append(failed_delta(index, "prefill", "preparing its prompt", e))
                continue
            self.waiting.append(row)
        return done + self._place_waiting()

    def _content_keys(self, request: PreparedRequest) -> np.ndarray:
        tiles, keys = request.image_tiles, request.image_keys
        if request.pixel_values is not None and not tiles:  # one image made of all the tiles
            tiles = (request.pixel_values.shape[0],)
        if request.pixel_values is not None and len(keys) != len(tiles):
            chunks = torch.split(request.pixel_values, list(tiles))
            keys = tuple(image_key(chunk) for chunk in chunks)
        if request.pixel_values is not None and request.pixel_values.shape[0] != sum(tiles):
            raise ValueError(f"the request has {request.pixel_values.shape[0]} tiles of pixels for images of "
                             f"{list(tiles)} tiles")
        request.image_tiles, request.image_keys = tuple(tiles), tuple(keys)
        return content_keys(request.prompt_ids, self.ids.image, keys, tiles, self.tokens_per_tile)

    def _place_waiting(self) -> list[Delta]:
        """Give waiting rows a slot, reusing a cached prefix where one matches."""
        done: list[Delta] = []
        while self.waiting:
            row = self.waiting[0]
            if row.request.cancel.is_set():
                self.waiting.popleft()
                done.append(self._end(row, "cancelled"))
                continue
            need = len(row.request.prompt_ids) + row.options.max_new_tokens
            try:
                slot, start = self._slot_for(row, need)
            except KVCacheGrowing:
                break  # the cache is being resized off this thread: the row is placed at a later step
            except KVCacheFullError as e:
                if self._holding():
                    break  # room comes back when a running request ends
                self.waiting.popleft()
                done.append(failed_delta(row.index, "prefill", "reserving its KV cache", e))
                continue
            self.waiting.popleft()
            try:
                self.sampler.ensure_slots(self.kv.slots + 1)
                self.sampler.admit(slot, row.options, row.request.prompt_ids)
            except Exception as e:
                self.prefix.forget(slot)
                done.append(failed_delta(row.index, "prefill", "preparing its sampling state", e))
                continue
            row.slot, row.length = slot, start
            self.prefix.running(slot, row.keys[:start])
            self.prefilling.append(row)
        return done

    def _holding(self) -> bool:
        return bool(self.prefilling or self.running or self.ready)

    def _busy_slots(self) -> set[int]:
        return {row.slot for row in (*self.prefilling, *self.ready) if row.slot is not None} | set(self.running)

    def _slot_for(self, row: Row, need: int) -> tuple[int, int]:
        """A slot for `row` and how many of its prompt positions already hold its KV there."""
        match = self.prefix.lookup(row.keys, max_length=len(row.keys) - 1, count=not row.looked_up)
        row.looked_up = True
        background = self._holding() and getattr(self.model, "tp_link", None) is None  # streams are waiting
        return SlotPlanner(self.kv, self.prefix, self._busy_slots(), background=background).place(match, need)

    # --- one step ------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Delta]:
        """One forward pass (a token for every running row, the next prompt chunks), then sample."""
        started = time.perf_counter()
        rows = len(self.running)
        deltas = self._place_waiting()
        chunks, failed = self._next_chunks(self.budget.tokens(rows=rows))
        deltas += failed
        deltas += self._forward(chunks)
        deltas += self._sample()
        self.budget.record(time.perf_counter() - started, tokens=rows + sum(c.length for _, c in chunks))
        return deltas

    def _next_chunks(self, budget: int) -> tuple[list[tuple[Row, Chunk]], list[Delta]]:
        """The prompt chunks of this step, up to `budget` tokens, in queue order; and the rows that failed."""
        chunks: list[tuple[Row, Chunk]] = []
        deltas: list[Delta] = []
        for row in list(self.prefilling):
            if budget <= 0:
                break
            if row.request.cancel.is_set():
                self.prefilling.remove(row)
                deltas.append(self._end(row, "cancelled"))
                continue
            try:
                if row.embeds is None:
                    row.embeds = self._embed(row)
            except Exception as e:  # its images or its prompt: that row only
                self._fail_prefill(row, e, deltas)
                continue
            length = min(len(row.request.prompt_ids) - row.length, budget)
            chunks.append((row, Chunk(row.slot, row.length, length)))
            budget -= length
        return chunks, deltas

    def _forward(self, chunks: list[tuple[Row, Chunk]]) -> list[Delta]:
        """Run the step's forward pass; a pass with chunks that fails is retried part by part,
        so a failing prompt ends its own request alone."""
        try:
            self._run(chunks)
            return []
        except Exception:
            if not chunks:
                raise  # the running rows' step itself: not one request's fault
            logger.warning("a step with %d prompt chunk(s) failed; retrying its parts apart", len(chunks),
                           exc_info=True)
        deltas: list[Delta] = []
        self._run([])
        for row, chunk in chunks:
            try:
                self._run([(row, chunk)], decode=False)
            except Exception as e:
                self._fail_prefill(row, e, deltas)
        return deltas

    def _fail_prefill(self, row: Row, error: Exception, deltas: list[Delta]) -> None:
        self.prefilling.remove(row)
        self._release(row, keep=False)
        deltas.append(failed_delta(row.index, "prefill", "prefilling its prompt", error))

    def _run(self, chunks: list[tuple[Row, Chunk]], *, decode: bool = True) -> None:
        """One forward over the running rows' new tokens (unless `decode` is False) and `chunks`.

        The rows' logits land in `self.logits` (row i = slot i); a chunk that ends its prompt
        gives its row logits and moves it to `ready`.
        """
        running = self.running if decode else {}
        if not running and not chunks:
            if decode:
                self.logits = None
            return
        rows = window = 0
        tokens = positions = writes = None
        if running:
            top = max(running) + 1
            longest = max(row.length for row in running.values()) + 1
            rows, window = (_bucket(top, 1), _bucket(longest, 256)) if self._step and not chunks else (top, longest)
            rows, window = min(rows, self.kv.slots), min(window, self.kv.capacity)
            step = [[self.ids.pad] * rows, [0] * rows, [self.kv.scratch] * rows]
            for slot, row in running.items():
                step[0][slot], step[1][slot], step[2][slot] = row.next_token, row.length, slot
            host = torch.tensor(step, dtype=torch.long)  # [3, rows], on the host
            if self.embed_device.type == "cuda" and torch.cuda.is_available():
                host = host.pin_memory()
            tokens, positions, writes = host.to(self.embed_device, non_blocking=True)  # host -> device: no sync
        prompts = [row.request.prompt_ids for row, _ in chunks]
        ends = [i for i, (row, chunk) in enumerate(chunks) if chunk.start + chunk.length == len(prompts[i])]
        if chunks:
            embeds = torch.cat([row.embeds[:, c.start : c.start + c.length] for row, c in chunks], dim=1)
            logits = mixed_step(self.model, self.kv, tokens, positions, writes, window,
                                tuple(c for _, c in chunks), embeds, ends)
        else:
            logits = decode_step(self.model, self.kv, tokens, positions, writes, window, self._step)
            if self._step is not None:
                logits = logits.clone()  # a CUDA graph's output is overwritten by its next replay
        if running:
            self.logits = logits[:rows]
            for slot, row in running.items():
                self.prefix.extend(slot, [row.next_token])
                row.length += 1
        for row, chunk in chunks:
            end = chunk.start + chunk.length
            self.prefix.extend(row.slot, row.keys[chunk.start : end])
            row.length = end
        for j, i in enumerate(ends):
            row = chunks[i][0]
            self.prefilling.remove(row)
            row.embeds = None
            row.logits = logits[rows + j]
            self.ready.append(row)

    def _embed(self, row: Row) -> torch.Tensor:
        """Embeddings [1, S, hidden] of the prompt, images spliced in (only when the uncached part has image pads)."""
        request = row.request
        ids = torch.tensor([request.prompt_ids], dtype=torch.long)
        needs_images = request.pixel_values is not None and bool((row.keys[row.length :] < 0).any())
        if not needs_images:
            ids = ids.masked_fill(ids == self.ids.image, self.ids.pad)  # cached or absent: any id will do
            return self.model.embed(ids, None, self.ids.image)
        parts = []
        for key, pixels in zip(request.image_keys, torch.split(request.pixel_values, list(request.image_tiles))):
            tokens = self.images.get(key)
            if tokens is None:
                tokens = self.model.encode_images(pixels)
                self.images.put(key, tokens)
            parts.append(tokens)
        return self.model.embed(ids, torch.cat(parts), self.ids.image)

    def _sample(self) -> list[Delta]:
        """One token for every row with logits: one sampler call, one host transfer."""
        rows = [row for row in self.ready if row.logits is not None]
        rows += [row for _, row in sorted(self.running.items())]
        self.ready = []
        if not rows:
            return []
        logits = self._gather_logits(rows)
        masks, failures = [], {}
        for i, row in enumerate(rows):
            try:
                masks.append(row.request.constraint.allowed() if row.request.constraint is not None else None)
            except Exception as e:  # its grammar: that row only
                masks.append(None)
                failures[i] = e
        picked = self.sampler.sample(logits, [row.slot for row in rows], masks)
        deltas: list[Delta] = []
        for i, row in enumerate(rows):
            error = failures.get(i) or picked.errors[i]
            if error is not None:
                self.running.pop(row.slot, None)
                self._release(row, keep=False)
                deltas.append(failed_delta(row.index, "decode", f"choosing token {len(row.generated) + 1}", error))
                continue
            try:
                text = record_token(row, picked.tokens[i], picked.logprobs[i], self.ids.end)
            except Exception as e:  # its constraint refused the token, its stop strings: that row only
                self.running.pop(row.slot, None)
                self._release(row, keep=False)
                deltas.append(failed_delta(row.index, "decode", f"recording token {len(row.generated) + 1}", e))
                continue
            if row.finish_reason is not None:
                self.running.pop(row.slot, None)
                text += row.stream.finish()
                self._release(row, keep=True)
                deltas.append(Delta(row.index, text, row.result(), logprobs=row.take_logprobs()))
            else:
                row.next_token = picked.tokens[i]
                self.running[row.slot] = row
                if text or row.unsent:
                    deltas.append(Delta(row.index, text, logprobs=row.take_logprobs()))
        return deltas

    def _gather_logits(self, rows: list[Row]) -> torch.Tensor:
        """[R, V] logits of `rows`: fresh prefill logits, and the last decode step's row of each running slot."""
        parts = []
        for row in rows:
            if row.logits is not None:
                parts.append(row.logits[None])
                row.logits = None
            else:
                assert self.logits is not None
                parts.append(self.logits[row.slot : row.slot + 1])
        return torch.cat(parts)

    # --- ending --------------------------------------------------------------------------

    def _end(self, row: Row, reason: str) -> Delta:
        row.finish_reason = reason
        self._release(row, keep=False)
        return Delta(row.index, row.stream.finish(), row.result(), logprobs=row.take_logprobs())

    def _release(self, row: Row, *, keep: bool) -> None:
        """Give the row's slot back: cached for later prefixes when it ended well, else forgotten."""
        if row.slot is None:
            return
        self.sampler.release(row.slot)
        if keep:
            self.prefix.finish(row.slot)
        else:
            self.prefix.forget(row.slot)
        row.slot = None

    def cancel_all(self) -> list[Delta]:
        """End every request this core holds ("cancelled"), e.g. when its owner shuts down."""
        rows = [*self.waiting, *self.prefilling, *self.ready, *self.running.values()]
        self.waiting.clear(), self.prefilling.clear(), self.ready.clear(), self.running.clear()
        return [self._end(row, "cancelled") for row in rows]


def _bucket(n: int, least: int) -> int:
    size = least
    while size < n:
        size *= 2
    return size
