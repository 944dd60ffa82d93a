"""Tiny random NVLM-D checkpoints in the exact published layout, written offline in seconds.

`build_tiny_checkpoint(folder)` writes what a user downloads from the hub, only small and random:
the published `config.json` schema with its quirks (`model_type: "llama"` LLM, `top_p: 0`,
dynamic RoPE x3), several safetensors shards with `model.safetensors.index.json`, tensors stored
in mixed dtypes (bf16 with some fp32, like the real checkpoint), the vision tower's zero dummy
heads, and tokenizer files: copied from a real NVLM-D folder when one is given, else a small
byte-level BPE tokenizer with the same special tokens. The output is noise; every code path
that reads, tiles, prompts and generates is real.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from .config import LLMConfig, NVLMConfig, VisionConfig
from .model import NVLMModel
from .tokenizer import load_tokenizer, write_tiny_tokenizer

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.json")

# Stored in fp32, like the wider tensors of the published checkpoint; the rest is bf16.
_FP32_SUFFIXES = ("norm.weight", "mlp1.0.weight", "mlp1.0.bias", "ls1", "ls2", "class_embedding", "position_embedding")


def tiny_config(vocab_size: int = 152064, *, vision_width: int = 64, vision_heads: int = 4, vision_layers: int = 2,
                llm_width: int = 64, llm_layers: int = 2, llm_heads: int = 4, llm_kv_heads: int = 2) -> NVLMConfig:
    """A small NVLM-D config: full-size 448 px tiles and 256 tokens per tile, narrow and shallow.

    With 4 real vision heads the dummy-head rule (pad to a multiple of 8) adds 4 dummy heads,
    so the tiny model carries them like the 72B one carries 7.
    """
    vision = VisionConfig(
        hidden_size=vision_width,
        intermediate_size=vision_width * 4,
        num_attention_heads=vision_heads,
        num_hidden_layers=vision_layers,
    )
    llm = LLMConfig(
        vocab_size=vocab_size,
        hidden_size=llm_width,
        intermediate_size=llm_width * 3,
        num_hidden_layers=llm_layers,
        num_attention_heads=llm_heads,
        num_key_value_heads=llm_kv_heads,
    )
    return NVLMConfig(vision=vision, llm=llm)


def build_tiny_checkpoint(
    folder: str | Path,
    *,
    config: NVLMConfig | None = None,
    tokenizer_from: str | Path | None = None,
    num_shards: int = 3,
    seed: int = 0,
) -> Path:
    """Write a random-weight NVLM-D checkpoint in the published layout and return its folder.

    Args:
        folder: where to write (created if needed).
        config: the model shape; default `tiny_config()` with the tokenizer's vocabulary size.
        tokenizer_from: a folder with real NVLM-D tokenizer files to copy; None writes a small
            byte-level BPE tokenizer with the same special tokens.
        num_shards: how many safetensors shards to split the weights into.
        seed: weights are a pure function of (config, seed).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            source = Path(tokenizer_from) / name
            if source.is_file():
                shutil.copyfile(source, folder / name)
    else:
        write_tiny_tokenizer(folder)
    tokenizer = load_tokenizer(folder)
    vocab = _padded_vocab(len(tokenizer))
    if config is None:
        config = tiny_config(vocab_size=vocab)
    elif config.llm.vocab_size < vocab:
        config = replace(config, llm=replace(config.llm, vocab_size=vocab))
    # The end token id follows the tokenizer (151645 with the real one).
    config = replace(config, llm=replace(config.llm, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>")))

    state = random_state_dict(config, seed=seed)
    shards = _split(list(state), state, num_shards)
    weight_map: dict[str, str] = {}
    for number, names in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state[n].contiguous() for n in names}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return folder


@torch.no_grad()
def random_state_dict(config: NVLMConfig, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with checkpoint names, including zero vision dummy heads."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = NVLMModel(config)
    state: dict[str, torch.Tensor] = {}
    for name, meta in model.state_dict().items():
        shape = tuple(meta.shape)
        if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "mlp1.0.weight")):
            value = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif name.endswith(("ls1", "ls2")):
            value = 0.5 + 0.1 * torch.randn(shape, generator=generator)
        elif name.endswith("bias"):
            value = 0.02 * torch.randn(shape, generator=generator)
        elif "embeddings" in name or "embed_tokens" in name:
            value = 0.5 * torch.randn(shape, generator=generator)
        else:
            fan_in = shape[1] if len(shape) > 1 else shape[0]
            if len(shape) == 4:  # the patch-embedding conv
                fan_in = shape[1] * shape[2] * shape[3]
            value = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
        state[name] = value
    _zero_dummy_heads(config, state)
    return {n: t.to(torch.float32 if n.endswith(_FP32_SUFFIXES) else torch.bfloat16) for n, t in state.items()}


def _zero_dummy_heads(config: NVLMConfig, state: dict[str, torch.Tensor]) -> None:
    """Zero the dummy heads' qkv rows, norm weights and proj columns, as in the published checkpoint."""
    v = config.vision
    real, stored = v.num_attention_heads * v.head_dim, v.total_heads * v.head_dim
    if real == stored:
        return
    for layer in range(v.num_hidden_layers):
        prefix = f"vision_model.encoder.layers.{layer}.attn."
        for part in range(3):
            state[prefix + "qkv.weight"][part * stored + real : (part + 1) * stored] = 0
        for norm in ("q_norm.weight", "k_norm.weight"):
            if prefix + norm in state:
                state[prefix + norm][real:] = 0
        state[prefix + "proj.weight"][:, real:] = 0


def _split(names: list[str], state: dict[str, torch.Tensor], num_shards: int) -> list[list[str]]:
    sizes = [state[n].numel() * state[n].element_size() for n in names]
    target = sum(sizes) / max(1, num_shards)
    shards: list[list[str]] = [[]]
    filled = 0.0
    for name, size in zip(names, sizes):
        if shards[-1] and filled + size > target and len(shards) < num_shards:
            shards.append([])
            filled = 0.0
        shards[-1].append(name)
        filled += size
    return shards


def _padded_vocab(tokens: int) -> int:
    # Like the published 152,064 for 151,665 tokens: the embedding is padded to a multiple of 128.
    return max(152064 if tokens > 151000 else 0, math.ceil(tokens / 128) * 128)
