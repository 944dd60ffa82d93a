"""The Qwen2 decoder pass over the engine's own KV cache: a prefill chunk or one decode step.

The weights are transformers' `Qwen2ForCausalLM` modules (names equal the checkpoint keys);
the pass is ours, the same arithmetic as transformers' layer (RMSNorm, RoPE and softmax as it
computes them, `apply_rotary_pos_emb` is its own function) but reading and writing
`KVCache` slots:

- `prefill_chunk`: positions `start..start+S-1` of one slot (a prompt, or the rest of it after
  a cached prefix); keys and values are written in place, attention reads the slot's first
  `start + S` positions, causal.
- `decode_step`: one new token for each of the first `B` slots (the step's rows); row `i` is
  slot `i`, its keys are written at its own position, and attention reads
  `cache[:B, :, :window]` as a view with a mask built on the device from the positions
  (key position <= query position), so the step needs no host sync and, for a given
  `(B, window)`, has static shapes: `torch.compile(fullgraph=True)` compiles it once, and on
  CUDA it runs as a captured graph ("reduce-overhead"). Rows without a live request write to
  the scratch slot and their logits are ignored.

Only the last position's logits are computed. Hidden states move between devices when the
layers are spread over several. Knows the model's modules and the cache's layout; knows nothing
of requests, sampling or text.

Tensor parallelism (`tensor_parallel.py`, `tp_executor.py`) uses two hooks of the model, both
None in one process (then nothing else runs): `model.tp_reduce` sums the row-parallel partial
outputs of `o_proj` and `down_proj` across ranks, and `model.tp_link` (rank 0) hands each
prefill chunk's or step's layer inputs to the worker ranks, which run `prefill_hidden` /
`decode_hidden` on their shards at the same time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from .kv_cache import KVCache
from .model import NVLMModel


def _inputs_on(device: torch.device, cache: dict, tensors: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    """The step's small tensors on `device`, moved once per device per step."""
    if device not in cache:
        cache[device] = {k: (v.to(device, non_blocking=True) if v is not None else None) for k, v in tensors.items()}
    return cache[device]


def _layers(model: NVLMModel, hidden: torch.Tensor, kv: KVCache, positions: torch.Tensor, *,
            rows: slice, write: tuple[torch.Tensor, ...] | slice, window: int, mask: torch.Tensor | None,
            causal: bool) -> torch.Tensor:
    """Run every decoder layer on `hidden` [B, S, hidden]; returns the final hidden states.

    Args:
        rows: the cache slots read as the batch's rows.
        write: where the new keys/values go: a slice of positions of the single row (prefill),
            or `(slot_ids [B], positions [B])` index tensors (decode).
        window: cache positions attention reads.
        mask: bool [B, 1, S, window] (True = may attend) or None.
        causal: no mask, top-left causal (a prefill from position 0).
    """
    lm = model.language_model
    reduce = getattr(model, "tp_reduce", None)  # tensor parallelism: sum the ranks' partial outputs
    cos, sin = lm.model.rotary_emb(hidden, positions.to(hidden.device))  # [B, S, D] in hidden's dtype
    moved: dict = {}
    small = {"cos": cos, "sin": sin, "mask": mask}
    if isinstance(write, tuple):
        small.update(slots=write[0], pos=write[1])
    for index, layer in enumerate(lm.model.layers):
        attn = layer.self_attn
        device = layer.input_layernorm.weight.device
        step = _inputs_on(device, moved, small)
        hidden = hidden.to(device)
        b, s, _ = hidden.shape
        x = layer.input_layernorm(hidden)
        q = attn.q_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)  # [B, H, S, D]
        k = attn.k_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)  # [B, H_kv, S, D]
        v = attn.v_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, step["cos"], step["sin"])
        keys, values = kv.keys[index], kv.values[index]  # [slots + 1, H_kv, capacity, D]
        if isinstance(write, tuple):
            keys[step["slots"], :, step["pos"]] = k[:, :, 0].to(keys.dtype)
            values[step["slots"], :, step["pos"]] = v[:, :, 0].to(values.dtype)
        else:
            keys[rows, :, write] = k.to(keys.dtype)
            values[rows, :, write] = v.to(values.dtype)
        out = _attention(q, keys[rows, :, :window], values[rows, :, :window], step["mask"], causal, attn.scaling)
        if reduce is None:
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(b, s, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        else:  # o_proj and down_proj are row-parallel: each rank holds a partial sum
            hidden = hidden + reduce(attn.o_proj(out.transpose(1, 2).reshape(b, s, -1)))
            hidden = hidden + reduce(layer.mlp(layer.post_attention_layernorm(hidden)))
    return hidden


def _attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, causal: bool,
               scale: float) -> torch.Tensor:
    """SDPA of q [B, H, S, D] over keys/values [B, H_kv, W, D] (grouped-query); returns [B, H, S, D].

    Three shapes of work, each on the form the kernels run fastest (SDPA's `enable_gqa` with a
    boolean mask falls back to a slow path: 3-10x per decode step on the CPU, the math kernel on
    CUDA):
    - no mask (a prefill from position 0): causal, `enable_gqa`;
    - a prefill chunk after position 0: causal aligned to the last key (`causal_lower_right`,
      which flash / memory-efficient kernels take), each key/value head repeated for its group;
    - one token per row (decode): the `G = H / H_kv` query heads sharing a key/value head become
      G queries of that head ([B, H_kv, G, D]; query head h reads key/value head h // G, as
      transformers' `repeat_kv` pairs them) under the row's [B, 1, 1, W] mask.
    """
    b, h, s, d = q.shape
    groups = h // keys.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, keys, values, is_causal=causal, scale=scale, enable_gqa=groups > 1)
    if s > 1:  # a prefill chunk after position 0: its mask is causal aligned to the last key
        w = keys.shape[2]
        if groups > 1:  # each key/value head for its group of query heads (a view when there is one)
            keys, values = (t[:, :, None].expand(b, t.shape[1], groups, w, d).reshape(b, h, w, d)
                            for t in (keys, values))
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=causal_lower_right(s, w), scale=scale)
    folded = q.reshape(b, keys.shape[1], groups, d)  # one token: the group's query heads as its queries
    out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(b, h, s, d)


def _logits(model: NVLMModel, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits [B, V] of the last position of `hidden` [B, S, hidden]."""
    lm = model.language_model
    h = lm.model.norm(hidden[:, -1:, :].to(lm.model.norm.weight.device))
    return lm.lm_head(h.to(lm.lm_head.weight.device))[:, -1, :].float()


def prefill_chunk(model: NVLMModel, kv: KVCache, slot: int, embeds: torch.Tensor, start: int) -> torch.Tensor:
    """Feed `embeds` [1, S, hidden] at positions `start..start+S-1` of `slot`; returns logits [1, V].

    Positions before `start` must already hold this sequence's keys and values (earlier chunks,
    or a cached prefix).
    """
    link = getattr(model, "tp_link", None)
    if link is None:
        return _logits(model, prefill_hidden(model, kv, slot, embeds, start))
    with link.prefill(kv, slot, embeds, start):  # the workers run the same chunk on their shards
        hidden = prefill_hidden(model, kv, slot, embeds, start)
    return _logits(model, hidden)


def prefill_hidden(model: NVLMModel, kv: KVCache, slot: int, embeds: torch.Tensor, start: int) -> torch.Tensor:
    """`prefill_chunk` up to the last layer's hidden states [1, S, hidden] (no norm, no logits)."""
    s = embeds.shape[1]
    end = start + s
    device = embeds.device
    positions = torch.arange(start, end, device=device)[None]  # [1, S]
    if start == 0:
        mask, causal = None, s > 1
    else:  # queries at start.., keys at 0..end-1: key position <= query position
        mask = (torch.arange(end, device=device)[None, :] <= positions[0, :, None])[None, None]  # [1, 1, S, end]
        causal = False
    rows = slice(slot, slot + 1)
    return _layers(model, embeds, kv, positions, rows=rows, write=slice(start, end), window=end, mask=mask,
                   causal=causal)


def decode_step(model: NVLMModel, kv: KVCache, tokens: torch.Tensor, positions: torch.Tensor,
                write_slots: torch.Tensor, window: int) -> torch.Tensor:
    """One token per row for the first `B` slots; returns logits [B, V].

    Args:
        tokens: [B] token ids (any id for rows without a live request).
        positions: [B] the position each token takes (0 for rows without a request).
        write_slots: [B] the slot each row writes its keys to: its own, or `kv.scratch`.
        window: cache positions attention reads; more than every live row's position.
    """
    table = model.language_model.model.embed_tokens
    hidden = table(tokens.to(table.weight.device)[:, None])  # [B, 1, hidden]
    link = getattr(model, "tp_link", None)
    if link is None:
        return _logits(model, decode_hidden(model, kv, hidden, positions, write_slots, window))
    with link.decode(kv, hidden, positions, write_slots, window):  # the workers run the same step
        hidden = decode_hidden(model, kv, hidden, positions, write_slots, window)
    return _logits(model, hidden)


def decode_hidden(model: NVLMModel, kv: KVCache, hidden: torch.Tensor, positions: torch.Tensor,
                  write_slots: torch.Tensor, window: int) -> torch.Tensor:
    """`decode_step` from the token embeddings `hidden` [B, 1, hidden] to the last layer's hidden states."""
    device = hidden.device
    b = hidden.shape[0]
    positions = positions.to(device)
    mask = torch.arange(window, device=device)[None, :] <= positions[:, None]  # [B, window]
    return _layers(
        model, hidden, kv, positions[:, None], rows=slice(0, b), write=(write_slots.to(device), positions),
        window=window, mask=mask[:, None, None, :], causal=False,
    )
