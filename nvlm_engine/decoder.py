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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
        out = F.scaled_dot_product_attention(
            q, keys[rows, :, :window], values[rows, :, :window], attn_mask=step["mask"], is_causal=causal,
            scale=attn.scaling, enable_gqa=q.shape[1] != keys.shape[1],
        )  # [B, H, S, D]
        hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(b, s, -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden


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
    hidden = _layers(model, embeds, kv, positions, rows=rows, write=slice(start, end), window=end, mask=mask,
                     causal=causal)
    return _logits(model, hidden)


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
    device = table.weight.device
    b = tokens.shape[0]
    hidden = table(tokens.to(device)[:, None])  # [B, 1, hidden]
    positions = positions.to(device)
    mask = torch.arange(window, device=device)[None, :] <= positions[:, None]  # [B, window]
    return _logits(model, _layers(
        model, hidden, kv, positions[:, None], rows=slice(0, b), write=(write_slots.to(device), positions),
        window=window, mask=mask[:, None, None, :], causal=False,
    ))
