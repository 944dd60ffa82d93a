"""The NVLM-D network: InternViT -> pixel shuffle -> `mlp1` projector -> Qwen2 (SPEC sections 1-3, 7).

Module names equal the checkpoint keys (`vision_model.*`, `mlp1.*`, `language_model.*`), so a
checkpoint loads with a strict state-dict fill. The LLM's weights are transformers'
`Qwen2ForCausalLM` modules; the engine runs its decoder layers itself over its own KV cache
(`decoder.py`), and `reference_decode.py` runs transformers' layers as the exactness oracle.
This module turns tiles into LLM-space image tokens and splices them into token embeddings.

Knows nothing of tokenizers, images on disk, sampling or streaming.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .config import NVLMConfig
from .vision import InternVisionModel

logger = logging.getLogger(__name__)


def pixel_shuffle(x: torch.Tensor, ratio: float, version: str = "v2") -> torch.Tensor:
    """Merge each 2x2 block of patch features into one token (SPEC section 3).

    Args:
        x: [T, N, C] patch features, N a square (1024 for 448 px tiles).
        ratio: downsample ratio (0.5 for NVLM-D).
        version: "v2" (NVLM-D) or "v1" (omits the last permute: a transposed image).

    Returns:
        [T, N * ratio**2, C / ratio**2]; for NVLM-D [T, 256, 4C], token i*16+j holding the
        four vectors (2i,2j), (2i,2j+1), (2i+1,2j), (2i+1,2j+1) in that order.
    """
    t, n, c = x.shape
    side = int(n**0.5)
    x = x.reshape(t, side, side, c)  # [T, H, W, C]
    x = x.reshape(t, side, int(side * ratio), int(c / ratio))  # [T, H, W/2, 2C]
    x = x.permute(0, 2, 1, 3).contiguous()  # [T, W/2, H, 2C]
    x = x.reshape(t, int(side * ratio), int(side * ratio), int(c / ratio**2))  # [T, W/2, H/2, 4C]
    if version == "v2":
        x = x.permute(0, 2, 1, 3).contiguous()  # [T, H/2, W/2, 4C]
    return x.reshape(t, -1, x.shape[-1])


class NVLMModel(nn.Module):
    """NVLM-D with checkpoint-equal module names."""

    def __init__(self, config: NVLMConfig, *, context_length: int | None = None) -> None:
        super().__init__()
        from transformers import Qwen2ForCausalLM

        self.config = config
        llm = config.llm
        self.vision_model = InternVisionModel(config.vision, select_layer=config.select_layer)
        # LayerNorm -> Linear(4C -> LLM intermediate, no bias) -> GELU -> Linear(-> LLM hidden).
        # The hidden width is the LLM's intermediate size: NVLM-D's one difference from InternVL2.
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(config.projector_in_features, eps=1e-5),
            nn.Linear(config.projector_in_features, llm.intermediate_size, bias=False),
            nn.GELU(),
            nn.Linear(llm.intermediate_size, llm.hidden_size, bias=False),
        )
        self.language_model = Qwen2ForCausalLM(llm.to_transformers(context_length or llm.max_position_embeddings))

    def prepare_for_inference(self) -> None:
        """After loading: drop the vision dummy heads when provably inert (outputs unchanged)."""
        if self.vision_model.drop_dummy_heads():
            logger.info("dropped %d inert vision dummy heads per layer", self.config.vision.num_dummy_heads)
        self.eval()

    # --- vision --------------------------------------------------------------------------

    def encode_images(self, pixel_values: torch.Tensor, chunk_tiles: int = 16) -> torch.Tensor:
        """Tiles [T, 3, 448, 448] -> LLM-space image tokens [T * 256, hidden].

        Tiles go through the vision tower `chunk_tiles` at a time to bound activation memory.
        """
        first = self.vision_model.embeddings.patch_embedding.weight
        outputs = []
        for start in range(0, pixel_values.shape[0], chunk_tiles):
            tiles = pixel_values[start : start + chunk_tiles].to(device=first.device, dtype=first.dtype)
            features = self.vision_model(tiles)  # [t, 1024, C]
            features = pixel_shuffle(features, self.config.downsample_ratio, self.config.ps_version)
            projector_device = self.mlp1[1].weight.device
            outputs.append(self.mlp1(features.to(projector_device)))  # [t, 256, hidden]
        return torch.cat(outputs).flatten(0, 1)

    # --- language model ------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor, image_tokens: torch.Tensor | None, image_token_id: int) -> torch.Tensor:
        """Token embeddings with the `<|vision_pad|>` rows replaced, in order, by image tokens.

        Args:
            input_ids: [B, S].
            image_tokens: [K, hidden], K equal to the number of pad ids in `input_ids`.
            image_token_id: id of `<|vision_pad|>`.
        """
        table = self.language_model.model.embed_tokens
        input_ids = input_ids.to(table.weight.device)
        embeds = table(input_ids)  # [B, S, hidden]
        if image_tokens is None:
            return embeds
        mask = input_ids == image_token_id
        count = int(mask.sum())
        if count != image_tokens.shape[0]:
            raise ValueError(f"{count} image pad tokens in the prompt but {image_tokens.shape[0]} image features")
        embeds = embeds.clone()
        embeds[mask] = image_tokens.to(device=embeds.device, dtype=embeds.dtype)
        return embeds
