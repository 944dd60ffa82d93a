"""bench_decode_core.py's baseline: a compact copy of the previous engine's continuous-batching loop
(0b078ab `generation.DecodeBatch` and `_Row`, greedy only) over transformers' Qwen2 layers and
`DynamicCache` (`reference_decode.py`).
"""

from __future__ import annotations

import torch

from nvlm_engine.generation import PreparedRequest, TokenIds
from nvlm_engine.reference_decode import LLMStep, decode_one, prefill
from nvlm_engine.sampling import sample_token
from nvlm_engine.textstream import TextStream

# --- the previous engine's loop (baseline) -----------------------------------------------------


class PreviousRow:
    """A live request of the previous loop (0b078ab `generation._Row`, greedy only)."""

    def __init__(self, index: int, request: PreparedRequest, decoder: object) -> None:
        self.index, self.request, self.options = index, request, request.options
        self.stream = TextStream(decoder, request.options.stop)
        self.generated: list[int] = []
        self.finish_reason: str | None = None

    def push(self, token: int, end_id: int) -> None:
        """0b078ab `generation._advance` without constraints and penalties."""
        if token == end_id or token in self.options.stop_token_ids:
            self.finish_reason = "stop"
            return
        self.generated.append(token)
        self.stream.push(token)
        if self.stream.stopped:
            self.finish_reason = "stop"
        elif len(self.generated) >= self.options.max_new_tokens:
            self.finish_reason = "length"


class PreviousBatch:
    """THE PREVIOUS ENGINE'S LOOP, the baseline: a compact copy of 0b078ab `generation.DecodeBatch`.

    `start` prefills the newcomers as one left-padded group (vision, then the whole prompt in
    one pass); `merge` left-pads the shorter `DynamicCache` and concatenates every layer's keys
    and values (a copy of the whole running KV at each admission); `advance` picks one token per
    row (`sample_token`: one host sync per row), drops finished rows (`batch_select_indices`:
    another copy) and runs `reference_decode.decode_one` (transformers' layers; `DynamicCache`
    appends by concatenation; a boolean mask whenever a row is padded).
    """

    def __init__(self, model: object, rows: list[PreviousRow], ids: TokenIds) -> None:
        self.model, self.rows, self.ids = model, rows, ids
        self.logits: torch.Tensor | None = None
        self.step: LLMStep | None = None
        self.valid: torch.Tensor | None = None

    @classmethod
    @torch.inference_mode()
    def start(cls, model: object, requests: list[tuple[int, PreparedRequest]], decoder: object,
              ids: TokenIds) -> PreviousBatch:
        batch = cls(model, [PreviousRow(i, r, decoder) for i, r in requests], ids)
        batch.logits, batch.step, batch.valid = prefill(model, [r for _, r in requests], ids)
        return batch

    def merge(self, other: PreviousBatch) -> None:
        if not other.rows:
            return
        if not self.rows:
            self.rows, self.logits, self.step, self.valid = other.rows, other.logits, other.step, other.valid
            return
        length = max(self.valid.shape[1], other.valid.shape[1])
        for cache in (self.step.cache, other.step.cache):
            for layer in cache.layers:
                missing = length - layer.keys.shape[-2]
                if missing:
                    layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, missing, 0))
                    layer.values = torch.nn.functional.pad(layer.values, (0, 0, missing, 0))
        for a, b in zip(self.step.cache.layers, other.step.cache.layers):
            a.keys = torch.cat([a.keys, b.keys])
            a.values = torch.cat([a.values, b.values])
        pad = lambda v: torch.nn.functional.pad(v, (length - v.shape[1], 0), value=False)
        self.valid = torch.cat([pad(self.valid), pad(other.valid)])
        self.step.position_ids = torch.cat([self.step.position_ids[:, -1:], other.step.position_ids[:, -1:]])
        self.step.attention_mask = None  # rebuilt by the next decode step
        self.logits = torch.cat([self.logits, other.logits])
        self.rows += other.rows

    @torch.inference_mode()
    def advance(self) -> None:
        tokens = []
        for i, row in enumerate(self.rows):
            token = sample_token(self.logits[i], row.options, None)  # greedy: int(argmax), a host sync
            row.push(token, self.ids.end)
            tokens.append(token)
        keep = [i for i, row in enumerate(self.rows) if row.finish_reason is None]
        if len(keep) < len(self.rows):
            self.rows = [self.rows[i] for i in keep]
            tokens = [tokens[i] for i in keep]
            if not keep:
                self.logits = self.step = self.valid = None
                return
            index = torch.tensor(keep)
            self.step.cache.batch_select_indices(index)
            self.step.position_ids = self.step.position_ids[index]
            self.valid = self.valid[index]
        self.logits, self.valid = decode_one(self.model, torch.tensor(tokens), self.step, self.valid)
