"""The NVLM-D network: InternViT -> pixel shuffle -> `mlp1` projector -> Qwen2 (SPEC sections 1-3, 7).

Module names equal the checkpoint keys (`vision_model.*`, `mlp1.*`, `language_model.*`), so a
checkpoint loads with a strict state-dict fill. The LLM's weights are transformers'
`Qwen2ForCausalLM` modules; the engine runs its decoder layers itself over its own KV cache
(`decoder.py`), and `reference_decode.py` runs transformers' layers as the exactness oracle.
This module turns tiles into LLM-space image tokens and splices them into token embeddings.

Knows nothing of tokenizers, images on disk, sampling or streaming.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .config import NVLMConfig
from .vision import InternVisionModel

logger = logging.getLogger(__name__)


def _clone_to(module: nn.Module, device: torch.device) -> nn.Module:
    """A copy of `module` on `device`, its tensors copied there directly (no second copy on the original's device)."""
    tensors = [*module.parameters(), *module.buffers()]
    memo = {id(t): torch.empty_like(t, device="meta") for t in tensors}  # deepcopy copies structure, not data
    clone = copy.deepcopy(module, memo)
    with torch.no_grad():
        for (owner, source), (copied, _) in zip(_tensor_slots(module), _tensor_slots(clone)):
            table = copied._parameters if isinstance(source, nn.Parameter) else copied._buffers
            name = next(n for n, t in (owner._parameters | owner._buffers).items() if t is source)
            target = torch.empty_like(source, device=device)
            target.copy_(source)
            table[name] = target  # a plain tensor: an inference-only copy needs no autograd leaf
    return clone.eval()


def _tensor_slots(module: nn.Module) -> list[tuple[nn.Module, torch.Tensor]]:
    """(owning submodule, tensor) of every parameter and buffer, in a fixed order."""
    return [(m, t) for m in module.modules() for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]


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


def build_projector(config: NVLMConfig) -> nn.Sequential:
    """The `mlp1` projector (on the current default device; `meta` when loading)."""
    llm = config.llm
    # LayerNorm -> Linear(4C -> LLM intermediate, no bias) -> GELU -> Linear(-> LLM hidden).
    # The hidden width is the LLM's intermediate size: NVLM-D's one difference from InternVL2.
    return nn.Sequential(
        nn.LayerNorm(config.projector_in_features, eps=1e-5),
        nn.Linear(config.projector_in_features, llm.intermediate_size, bias=False),
        nn.GELU(),
        nn.Linear(llm.intermediate_size, llm.hidden_size, bias=False),
    )


def encode_tiles(towers: list[tuple[nn.Module, nn.Module]], config: NVLMConfig, pixel_values: torch.Tensor,
                 chunk_tiles: int = 16) -> torch.Tensor:
    """Tiles [T, 3, 448, 448] -> image tokens [T, 256, hidden] on the first projector's device.

    `towers` are (vision tower, projector) copies; with more than one the chunks of `chunk_tiles`
    tiles (smaller, so that every copy gets work) are dealt out to them in turn. Also what each
    tensor-parallel rank runs on its own slice of the tiles.
    """
    total = pixel_values.shape[0]
    if len(towers) > 1:
        chunk_tiles = max(1, min(chunk_tiles, -(-total // len(towers))))
    outputs = []
    for number, start in enumerate(range(0, total, chunk_tiles)):
        vision, projector = towers[number % len(towers)]
        first = vision.embeddings.patch_embedding.weight
        tiles = pixel_values[start : start + chunk_tiles].to(device=first.device, dtype=first.dtype)
        features = vision(tiles)  # [t, 1024, C]
        features = pixel_shuffle(features, config.downsample_ratio, config.ps_version)
        outputs.append(projector(features.to(projector[1].weight.device)))  # [t, 256, hidden]
    home = towers[0][1][1].weight.device
    return torch.cat([out.to(home) for out in outputs])


class NVLMModel(nn.Module):
    """NVLM-D with checkpoint-equal module names."""

    # Tensor parallelism's hooks (`decoder.py`, `tp_executor.py`); None in one process.
    tp_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    tp_link: Any = None

    def __init__(self, config: NVLMConfig, *, context_length: int | None = None) -> None:
        super().__init__()
        from transformers import Qwen2ForCausalLM

        self.config = config
        llm = config.llm
        self.vision_model = InternVisionModel(config.vision, select_layer=config.select_layer)
        self.mlp1 = build_projector(config)
        self.language_model = Qwen2ForCausalLM(llm.to_transformers(context_length or llm.max_position_embeddings))

    def prepare_for_inference(self) -> None:
        """After loading: drop the vision dummy heads when provably inert (outputs unchanged)."""
        if self.vision_model.drop_dummy_heads():
            logger.info("dropped %d inert vision dummy heads per layer", self.config.vision.num_dummy_heads)
        self.eval()

    # --- vision --------------------------------------------------------------------------

    def replicate_vision(self, devices: list[torch.device]) -> None:
        """Put a copy of the vision tower and projector on each of `devices` (besides the original).

        `encode_images` then spreads the tiles of a batch over every copy: kernels are queued
        on all GPUs before any result is gathered, so the copies work at the same time. The
        copies are not submodules (the checkpoint's names and the loader see only the original);
        they are filled from the original's tensors, device to device.
        """
        self.vision_towers = [(self.vision_model, self.mlp1)]
        home = self.vision_model.embeddings.patch_embedding.weight.device
        for device in dict.fromkeys(devices):
            if torch.device(device) != home:
                self.vision_towers.append((_clone_to(self.vision_model, device), _clone_to(self.mlp1, device)))

    def encode_images(self, pixel_values: torch.Tensor, chunk_tiles: int = 16) -> torch.Tensor:
        """Tiles [T, 3, 448, 448] -> LLM-space image tokens [T * 256, hidden].

        Tiles go through the vision tower `chunk_tiles` at a time to bound activation memory;
        with copies of the tower on several GPUs (`replicate_vision`) the chunks are dealt out
        to them in turn, smaller so that every copy gets work, and gathered in order. With
        tensor parallelism every rank holds the tower: the link splits the tiles over the ranks.
        """
        if self.tp_link is not None and pixel_values.shape[0] > 0:
            return self.tp_link.encode_images(self, pixel_values, chunk_tiles).flatten(0, 1)
        towers = getattr(self, "vision_towers", None) or [(self.vision_model, self.mlp1)]
        return encode_tiles(towers, self.config, pixel_values, chunk_tiles).flatten(0, 1)

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
