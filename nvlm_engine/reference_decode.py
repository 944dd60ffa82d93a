"""The reference decoder pass: transformers' own Qwen2 layers over transformers' `DynamicCache`.

This is the decode path the engine used before it had its own KV cache (`kv_cache.py`,
`decoder.py`), kept as the exactness oracle: tests check that the engine's tokens and logits
equal these, and `bench/` measures the new core against it in the same run. It is not used to
serve requests.

- `prefill` splices image tokens into left-padded prompts and runs the layers once,
- `decode_one` feeds one token per row,

with a boolean attention mask whenever a row is padded (a padded key is never attended).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .generation_records import PreparedRequest, TokenIds
from .model import NVLMModel


@dataclass
class LLMStep:
    """What one decoder pass needs besides the embeddings.

    Attributes:
        position_ids: [B, S] positions of the new tokens (pads excluded from the count).
        attention_mask: None for an unpadded causal pass, else a boolean [B, 1, S, past + S]
            (True = may attend).
        cache: a transformers `DynamicCache` holding the keys and values so far.
    """

    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    cache: object


def build_attention_mask(valid: torch.Tensor, query_len: int) -> torch.Tensor | None:
    """Boolean [B, 1, S, K] mask for the last `query_len` positions of `valid` ([B, K], True = real token).

    Returns None when no row has padding, so SDPA takes its fast causal path. A padding
    position may attend to itself so that its row is never empty (an empty row gives NaN,
    and NaN in a value vector poisons the real rows even at weight zero).
    """
    if bool(valid.all()):
        return None
    _, k = valid.shape
    device = valid.device
    q_pos = torch.arange(k - query_len, k, device=device)  # absolute positions of the queries
    k_pos = torch.arange(k, device=device)
    causal = k_pos[None, :] <= q_pos[:, None]  # [S, K]
    mask = causal[None] & valid[:, None, :]  # [B, S, K]
    mask = mask | (k_pos[None, None, :] == q_pos[None, :, None])
    return mask[:, None]


def forward_llm(model: NVLMModel, embeds: torch.Tensor, step: LLMStep) -> torch.Tensor:
    """transformers' decoder layers on [B, S, hidden] embeddings; logits [B, V] of the last position."""
    lm = model.language_model
    h = embeds
    cos, sin = lm.model.rotary_emb(h, step.position_ids.to(h.device))
    devices: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
    for layer in lm.model.layers:
        device = layer.input_layernorm.weight.device
        if device not in devices:
            mask = step.attention_mask.to(device) if step.attention_mask is not None else None
            devices[device] = (cos.to(device), sin.to(device), mask)
        layer_cos, layer_sin, mask = devices[device]
        h = layer(h.to(device), attention_mask=mask, position_embeddings=(layer_cos, layer_sin),
                  cache=step.cache, use_cache=True)
    h = lm.model.norm(h[:, -1:, :].to(lm.model.norm.weight.device))
    logits = lm.lm_head(h.to(lm.lm_head.weight.device))
    return logits[:, -1, :].float()  # [B, vocab], fp32 for sampling


@torch.inference_mode()
def prefill(model: NVLMModel, requests: list[PreparedRequest], ids: TokenIds) -> tuple[torch.Tensor, LLMStep, torch.Tensor]:
    """Encode images, splice them into the left-padded prompts and run the decoder once.

    Returns the last-position logits [B, V], the step state (cache) and the validity mask [B, K].
    """
    from transformers import DynamicCache

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
    valid = valid.to(embeds.device)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # pads share position 0, unattended
    step = LLMStep(positions, build_attention_mask(valid, longest), DynamicCache())
    return forward_llm(model, embeds, step), step, valid


@torch.inference_mode()
def decode_one(model: NVLMModel, tokens: torch.Tensor, step: LLMStep, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed one token per row [B] and return the next logits [B, V] and the grown validity mask."""
    valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
    step.position_ids = step.position_ids[:, -1:] + 1
    step.attention_mask = build_attention_mask(valid, 1)
    embeds = model.embed(tokens[:, None], None, -1)
    return forward_llm(model, embeds, step), valid


def greedy_reference(model: NVLMModel, request: PreparedRequest, ids: TokenIds, max_new_tokens: int) -> list[int]:
    """Greedy token ids of one request on the reference path (ends at `<|im_end|>`), for tests and benches."""
    logits, step, valid = prefill(model, [request], ids)
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        token = int(torch.argmax(logits[0]))
        if token == ids.end:
            break
        tokens.append(token)
        logits, valid = decode_one(model, torch.tensor([token], device=valid.device), step, valid)
    return tokens
