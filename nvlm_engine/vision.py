"""InternViT-6B, the vision tower of NVLM-D (SPEC section 2).

Attribute names equal the checkpoint keys under `vision_model.`, so loading is a strict
state-dict fill. Knows nothing of tiling, prompts or the LLM.

The checkpoint pads the real attention heads with zero "dummy" heads so that Megatron's
tensor parallelism of 8 divided the head count. Two things follow and are reproduced here:
the QK-norm computes its variance over the real channels only, and the dummy heads add
nothing to the output because their `proj` columns are zero. `drop_dummy_heads()` checks that
and then slices them away, which saves their compute without changing a single output value.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig

logger = logging.getLogger(__name__)


class InternRMSNorm(nn.Module):
    """RMSNorm in fp32; the variance may be taken over the first `variance_size` channels only.

    NVLM-D's QK-norm normalizes q (and k) of all heads jointly with a weight over all 32 heads,
    but its mean square is over the 25 real heads' channels (SPEC section 2).
    """

    def __init__(self, size: int, eps: float, variance_size: int | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.variance_size = variance_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        real = x if self.variance_size is None or self.variance_size == x.shape[-1] else x[..., : self.variance_size]
        variance = real.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(dtype)


def _norm(config: VisionConfig, size: int) -> nn.Module:
    if config.norm_type == "rms_norm":
        return InternRMSNorm(size, config.layer_norm_eps)
    return nn.LayerNorm(size, eps=config.layer_norm_eps)


class InternVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        c = config.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, c))
        self.patch_embedding = nn.Conv2d(config.num_channels, c, kernel_size=config.patch_size, stride=config.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, config.num_patches + 1, c))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values [T, 3, 448, 448] -> patches [T, 1024, C], row-major (SPEC section 2)
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], -1, -1).to(patches.dtype)
        # No position-embedding interpolation: tiles are always exactly image_size square.
        return torch.cat([cls, patches], dim=1) + self.position_embedding.to(patches.dtype)  # [T, 1025, C]


class InternAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads  # real heads
        self.head_dim = config.head_dim
        self.num_stored_heads = config.total_heads  # real + dummy, as in the checkpoint
        inner = self.num_stored_heads * self.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * inner, bias=config.qkv_bias)
        self.qk_normalization = config.qk_normalization
        if config.qk_normalization:
            self.q_norm = InternRMSNorm(inner, config.layer_norm_eps, variance_size=config.hidden_size)
            self.k_norm = InternRMSNorm(inner, config.layer_norm_eps, variance_size=config.hidden_size)
        self.proj = nn.Linear(inner, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, n, _ = x.shape
        heads = self.num_stored_heads
        qkv = self.qkv(x).view(t, n, 3, heads * self.head_dim)
        q, k, v = qkv.unbind(dim=2)  # each [T, N, H*D], heads in checkpoint order
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (s.view(t, n, heads, self.head_dim).transpose(1, 2) for s in (q, k, v))  # [T, H, N, D]
        out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5, as the reference
        return self.proj(out.transpose(1, 2).reshape(t, n, heads * self.head_dim))

    def dummy_heads_are_inert(self) -> bool:
        """True when the dummy heads' `proj` columns are all zero, so they add exactly nothing."""
        if self.num_stored_heads == self.num_heads:
            return True
        real = self.num_heads * self.head_dim
        return not bool(self.proj.weight[:, real:].any())

    @torch.no_grad()
    def drop_dummy_heads(self) -> None:
        """Slice the dummy heads away (callers check `dummy_heads_are_inert()` first)."""
        if self.num_stored_heads == self.num_heads:
            return
        real = self.num_heads * self.head_dim
        stored = self.num_stored_heads * self.head_dim
        keep = torch.cat([torch.arange(i * stored, i * stored + real) for i in range(3)]).to(self.qkv.weight.device)
        self.qkv.weight = nn.Parameter(self.qkv.weight[keep].clone(), requires_grad=False)
        if self.qkv.bias is not None:
            self.qkv.bias = nn.Parameter(self.qkv.bias[keep].clone(), requires_grad=False)
        self.qkv.out_features = 3 * real
        if self.qk_normalization:
            # Over the real channels only, the variance is the same one the padded norm took.
            for norm in (self.q_norm, self.k_norm):
                norm.weight = nn.Parameter(norm.weight[:real].clone(), requires_grad=False)
        self.proj.weight = nn.Parameter(self.proj.weight[:, :real].clone(), requires_grad=False)
        self.proj.in_features = real
        self.num_stored_heads = self.num_heads


class InternMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.norm1 = _norm(config, config.hidden_size)
        self.attn = InternAttention(config)
        self.ls1 = nn.Parameter(torch.ones(config.hidden_size))
        self.norm2 = _norm(config, config.hidden_size)
        self.mlp = InternMLP(config)
        self.ls2 = nn.Parameter(torch.ones(config.hidden_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.norm1(h)) * self.ls1
        return h + self.mlp(self.norm2(h)) * self.ls2


class InternVisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(InternVisionEncoderLayer(config) for _ in range(config.num_hidden_layers))


class InternVisionModel(nn.Module):
    """Tiles [T, 3, 448, 448] -> patch features [T, 1024, C] of layer `select_layer`, CLS dropped."""

    def __init__(self, config: VisionConfig, select_layer: int = -1) -> None:
        super().__init__()
        self.config = config
        self.select_layer = select_layer
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.embeddings(pixel_values)
        # select_layer -1 is the last layer's output; -2 the one before, and so on. The layers
        # after the selected one are never run.
        last = len(self.encoder.layers) + self.select_layer
        for layer in self.encoder.layers[: last + 1]:
            h = layer(h)
        return h[:, 1:, :]  # [T, 1024, C]

    def drop_dummy_heads(self) -> bool:
        """Remove inert dummy heads from every layer; returns whether they were removed.

        Heads are only removed when every layer's dummy `proj` columns are exactly zero, so the
        output is bit-for-bit the padded model's up to float summation order.
        """
        layers = list(self.encoder.layers)
        if all(layer.attn.num_stored_heads == layer.attn.num_heads for layer in layers):
            return False
        if not all(layer.attn.dummy_heads_are_inert() for layer in layers):
            logger.warning("vision dummy heads have non-zero proj columns; keeping them (slower, still exact)")
            return False
        for layer in layers:
            layer.attn.drop_dummy_heads()
        return True
