"""The Qwen2 decoder pass over the engine's own KV cache: decode rows and prefill chunks, one pass.

The weights are transformers' `Qwen2ForCausalLM` modules (names equal the checkpoint keys);
the pass is ours, the same arithmetic as transformers' layer (RMSNorm, RoPE and softmax as it
computes them, `apply_rotary_pos_emb` is its own function) but reading and writing
`KVCache` slots.

A step is one flat sequence of tokens, `[1, N, hidden]`:

- first the decode rows, one new token for each of the first `B` slots (row `i` is slot `i`;
  its keys are written at its own position; rows without a live request write to the scratch
  slot and their logits are ignored);
- then the prefill chunks, each positions `start..start+S-1` of one slot (a prompt, or the part
  of it after a cached prefix or after earlier chunks).

Every linear layer, norm and the rotary embedding run once over all N tokens, so the weights
are read once per step however the tokens divide between decoding and prefilling (on a GPU a
decode step is bound by reading the weights, on a CPU a small matmul wastes most of its
compute: either way, a prefill chunk riding along costs far less than a pass of its own).
Attention is the only part that differs, and runs per part, each in the form its kernel runs
fast (`_decode_attention`, `_chunk_attention`).

`decode_step` (decode rows only) has static shapes for a given `(B, window)`: attention reads
`cache[:B, :, :window]` as a view under a mask built on the device from the positions, so the
step needs no host sync. Its layers and logits (`decode_layers`) are what
`torch.compile(fullgraph=True)` compiles once (on CUDA as a captured graph, "reduce-overhead"),
with tensor parallelism too: the all-reduce is torch's functional collective. The embedding
lookup and the hand-off to tensor-parallel workers run eager around it. Steps with chunks run
eager.

Only the logits of each decode row and of each chunk's last token that asks for them are
computed. Hidden states move between devices when the layers are spread over several. Knows
the model's modules and the cache's layout; knows nothing of requests, sampling or text.

Tensor parallelism (`tensor_parallel.py`, `tp_executor.py`) uses two hooks of the model, both
None in one process (then nothing else runs): `model.tp_reduce` sums the row-parallel partial
outputs of `o_proj` and `down_proj` across ranks, and `model.tp_link` (rank 0) hands each
step's layer inputs to the worker ranks, which run `step_hidden` on their shards at the same
time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from .kv_cache import KVCache
from .model import NVLMModel


class Chunk(NamedTuple):
    """A prefill chunk of a step: positions `start..start + length - 1` of `slot`.

    Positions before `start` must already hold this sequence's keys and values (earlier chunks,
    or a cached prefix).
    """

    slot: int
    start: int
    length: int


def mixed_step(model: NVLMModel, kv: KVCache, tokens: torch.Tensor | None, positions: torch.Tensor | None,
               write_slots: torch.Tensor | None, window: int, chunks: Sequence[Chunk] = (),
               embeds: torch.Tensor | None = None, logits_of: Sequence[int] = ()) -> torch.Tensor:
    """Decode rows and prefill chunks in one pass; returns fp32 logits [B + len(logits_of), V].

    Args:
        tokens: [B] the decode rows' token ids (any id for rows without a live request); None: no row.
        positions: [B] the position each row's token takes (0 for rows without a request).
        write_slots: [B] the slot each row writes its keys to: its own, or `kv.scratch`.
        window: cache positions the rows' attention reads; more than every live row's position.
        chunks: the prefill chunks, in the order of their embeddings in `embeds`.
        embeds: [1, sum of the chunks' lengths, hidden] (prompt embeddings, images spliced in).
        logits_of: the chunks (indices into `chunks`) whose last token's logits are wanted (the
            chunk that ends a prompt); they follow the rows' logits, in this order.
    """
    chunks = tuple(chunks)
    hidden, flat_positions = _step_inputs(model, tokens, positions, chunks, embeds)
    rows = 0 if tokens is None else tokens.shape[0]
    slots = write_slots if write_slots is not None else flat_positions[:0]
    with _on_every_rank(model, kv, hidden, flat_positions, slots, window, chunks, compiled=False):
        hidden = step_hidden(model, kv, hidden, flat_positions, slots, window, chunks)
    ends = [rows + sum(c.length for c in chunks[: i + 1]) - 1 for i in logits_of]
    return _logits(model, hidden, rows, ends)


def decode_step(model: NVLMModel, kv: KVCache, tokens: torch.Tensor, positions: torch.Tensor,
                write_slots: torch.Tensor, window: int, layers: DecodeLayers | None = None) -> torch.Tensor:
    """One token per row for the first `B` slots; returns logits [B, V] (see `mixed_step`).

    `layers`: what runs the layers and the logits, `decode_layers` (the default) or its compiled
    form; the embedding lookup and the workers' hand-off run here, eager.
    """
    hidden, positions = _step_inputs(model, tokens, positions, (), None)
    with _on_every_rank(model, kv, hidden, positions, write_slots, window, (), compiled=layers is not None):
        return (layers or decode_layers)(model, kv, hidden, positions, write_slots, window)


def decode_layers(model: NVLMModel, kv: KVCache, hidden: torch.Tensor, positions: torch.Tensor,
                  write_slots: torch.Tensor, window: int) -> torch.Tensor:
    """Every layer and the logits of a decode-only step: hidden [1, B, hidden] -> logits [B, V].

    Static shapes for a given `(B, window)` and no host sync: the function `DecodeCore` compiles.
    """
    hidden = step_hidden(model, kv, hidden, positions, write_slots, window, ())
    return _logits(model, hidden, write_slots.shape[0], [])


def compile_decode(layers: Callable[..., torch.Tensor], device: torch.device) -> Callable[..., torch.Tensor]:
    """`layers` (`decode_layers`, or a worker rank's `step_hidden`) through `torch.compile`:
    whole (`fullgraph`, a graph break is an error), static shapes, a captured CUDA graph on CUDA."""
    return torch.compile(layers, fullgraph=True, dynamic=False,
                         mode="reduce-overhead" if device.type == "cuda" else None)


DecodeLayers = Callable[[NVLMModel, KVCache, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def _on_every_rank(model: NVLMModel, kv: KVCache, hidden: torch.Tensor, positions: torch.Tensor,
                   write_slots: torch.Tensor, window: int, chunks: tuple[Chunk, ...], *,
                   compiled: bool) -> AbstractContextManager[None]:
    """With tensor parallelism, start the workers on this step (rank 0 runs its layers inside the block)."""
    link = getattr(model, "tp_link", None)
    if link is None:
        return nullcontext()
    return link.step(kv, hidden, positions, write_slots, window, chunks, compiled=compiled)


def prefill_chunk(model: NVLMModel, kv: KVCache, slot: int, embeds: torch.Tensor, start: int) -> torch.Tensor:
    """Feed `embeds` [1, S, hidden] at positions `start..start+S-1` of `slot`; returns logits [1, V]."""
    return mixed_step(model, kv, None, None, None, 0, (Chunk(slot, start, embeds.shape[1]),), embeds, (0,))


def _step_inputs(model: NVLMModel, tokens: torch.Tensor | None, positions: torch.Tensor | None,
                 chunks: tuple[Chunk, ...], embeds: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's flat hidden states [1, N, hidden] and positions [N], rows first, then the chunks."""
    table = model.language_model.model.embed_tokens
    device = table.weight.device
    hidden, flat = [], []
    if tokens is not None:
        hidden.append(table(tokens.to(device)))  # [B, hidden]
        flat.append(positions.to(device))
    if chunks:
        hidden.append(embeds[0].to(device))
        flat.extend(torch.arange(c.start, c.start + c.length, device=device) for c in chunks)
    if len(hidden) == 1 and len(flat) == 1:
        return hidden[0][None], flat[0]
    return torch.cat(hidden)[None], torch.cat(flat)


def _inputs_on(device: torch.device, cache: dict, tensors: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    """The step's small tensors on `device`, moved once per device per step."""
    if device not in cache:
        cache[device] = {k: (v.to(device, non_blocking=True) if v is not None else None) for k, v in tensors.items()}
    return cache[device]


def step_hidden(model: NVLMModel, kv: KVCache, hidden: torch.Tensor, positions: torch.Tensor,
                write_slots: torch.Tensor, window: int, chunks: tuple[Chunk, ...]) -> torch.Tensor:
    """Every decoder layer over the step's tokens; returns the last layer's hidden states [1, N, hidden].

    Args:
        hidden: [1, N, hidden], the `B = len(write_slots)` decode rows first, then the chunks.
        positions: [N] each token's position.
        write_slots: [B] where each row writes its keys (`mixed_step`).
        window, chunks: as for `mixed_step`.
    """
    lm = model.language_model
    reduce = getattr(model, "tp_reduce", None)  # tensor parallelism: sum the ranks' partial outputs
    rows = write_slots.shape[0]
    positions = positions.to(hidden.device)
    cos, sin = lm.model.rotary_emb(hidden, positions[None])  # [1, N, D] in hidden's dtype
    small: dict[str, torch.Tensor | None] = {"cos": cos, "sin": sin, "mask": None, "slots": None, "pos": None}
    if rows:
        row_positions = positions[:rows]
        mask = torch.arange(window, device=hidden.device)[None, :] <= row_positions[:, None]  # [B, window]
        small.update(mask=mask[:, None, None, :], slots=write_slots.to(hidden.device), pos=row_positions)
    moved: dict = {}
    for index, layer in enumerate(lm.model.layers):
        attn = layer.self_attn
        step = _inputs_on(layer.input_layernorm.weight.device, moved, small)
        hidden = hidden.to(layer.input_layernorm.weight.device)
        n, d = hidden.shape[1], attn.head_dim
        x = layer.input_layernorm(hidden)
        q = attn.q_proj(x).view(1, n, -1, d).transpose(1, 2)  # [1, H, N, D]
        k = attn.k_proj(x).view(1, n, -1, d).transpose(1, 2)  # [1, H_kv, N, D]
        v = attn.v_proj(x).view(1, n, -1, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, step["cos"], step["sin"])
        out = _attend(q, k, v, kv.keys[index], kv.values[index], step, rows=rows, window=window, chunks=chunks,
                      scale=attn.scaling)
        if reduce is None:
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        else:  # o_proj and down_proj are row-parallel: each rank holds a partial sum
            hidden = hidden + reduce(attn.o_proj(out))
            hidden = hidden + reduce(layer.mlp(layer.post_attention_layernorm(hidden)))
    return hidden


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
            step: dict, *, rows: int, window: int, chunks: tuple[Chunk, ...], scale: float) -> torch.Tensor:
    """Write the step's keys/values into one layer's cache, attend per part; returns [1, N, H * D].

    q [1, H, N, D] and k, v [1, H_kv, N, D] are the step's flat tokens; keys/values the layer's
    cache [slots + 1, H_kv, capacity, D].
    """
    parts = []
    if rows:
        keys[step["slots"], :, step["pos"]] = k[0, :, :rows].transpose(0, 1).to(keys.dtype)  # [B, H_kv, D]
        values[step["slots"], :, step["pos"]] = v[0, :, :rows].transpose(0, 1).to(values.dtype)
        row_q = q[0, :, :rows].transpose(0, 1)[:, :, None]  # [B, H, 1, D]
        parts.append(_decode_attention(row_q, keys[:rows, :, :window], values[:rows, :, :window], step["mask"], scale))
    offset = rows
    for slot, start, length in chunks:
        end = start + length
        keys[slot, :, start:end] = k[0, :, offset : offset + length].to(keys.dtype)
        values[slot, :, start:end] = v[0, :, offset : offset + length].to(values.dtype)
        chunk_q = q[:, :, offset : offset + length]  # [1, H, S, D]
        parts.append(_chunk_attention(chunk_q, keys[slot : slot + 1, :, :end], values[slot : slot + 1, :, :end],
                                      start, scale))
        offset += length
    return (parts[0] if len(parts) == 1 else torch.cat(parts))[None]


def _decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """One query token per row: q [B, H, 1, D] over keys/values [B, H_kv, W, D] under mask [B, 1, 1, W]; [B, H * D].

    The `G = H / H_kv` query heads sharing a key/value head become G queries of that head
    ([B, H_kv, G, D]; query head h reads key/value head h // G, as transformers' `repeat_kv`
    pairs them): SDPA's `enable_gqa` with a boolean mask falls back to a slow path (3-10x per
    decode step on the CPU, the math kernel on CUDA).
    """
    b, h, _, d = q.shape
    folded = q.reshape(b, keys.shape[1], h // keys.shape[1], d)
    return F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask, scale=scale).reshape(b, h * d)


def _chunk_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int,
                     scale: float) -> torch.Tensor:
    """A prefill chunk: q [1, H, S, D] at positions `start..` over keys/values [1, H_kv, start + S, D]; [S, H * D].

    From position 0 the mask is plain causal (`enable_gqa`, no mask tensor). After it, causal
    aligned to the last key (`causal_lower_right`, which flash / memory-efficient kernels take),
    with each key/value head repeated for its group of query heads (a view when there is one).
    A single token after position 0 reads every key: no mask at all.
    """
    _, h, s, d = q.shape
    groups = h // keys.shape[1]
    if start == 0 or s == 1:
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=s > 1, scale=scale, enable_gqa=groups > 1)
    else:
        w = keys.shape[2]
        if groups > 1:
            keys, values = (t[:, :, None].expand(1, t.shape[1], groups, w, d).reshape(1, h, w, d) for t in (keys, values))
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=causal_lower_right(s, w), scale=scale)
    return out[0].transpose(0, 1).reshape(s, h * d)


def _logits(model: NVLMModel, hidden: torch.Tensor, rows: int, ends: list[int]) -> torch.Tensor:
    """fp32 logits [rows + len(ends), V]: of the first `rows` tokens of `hidden` [1, N, hidden] and of those at `ends`."""
    lm = model.language_model
    picked = hidden[0, :rows]
    if ends:
        chosen = hidden[0, torch.tensor(ends, device=hidden.device)]
        picked = chosen if not rows else torch.cat([picked, chosen])
    h = lm.model.norm(picked.to(lm.model.norm.weight.device))
    return lm.lm_head(h.to(lm.lm_head.weight.device)).float()
