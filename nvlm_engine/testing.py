"""Tiny random NVLM-D checkpoints in the exact published layout, written offline in seconds.

`build_tiny_checkpoint(folder)` writes what a user downloads from the hub, only small and random:
the published `config.json` schema with its quirks (`model_type: "llama"` LLM, `top_p: 0`,
dynamic RoPE x3), several safetensors shards with `model.safetensors.index.json`, tensors stored
in mixed dtypes (bf16 with some fp32, like the real checkpoint), the vision tower's zero dummy
heads, and tokenizer files: copied from a real NVLM-D folder when one is given, else a small
byte-level BPE tokenizer with the same special tokens. The output is noise; every code path
that reads, tiles, prompts and generates is real.

Its parts serve tests on their own too: `config_to_dict(config)` writes a config in the published
schema, `write_tiny_tokenizer(folder)` the tiny tokenizer's files. No library module imports
this one (only the CLI's `--demo`, lazily).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, pre_tokenizers, trainers
from tokenizers.models import BPE

from .config import LLMConfig, NVLMConfig, VisionConfig
from .model import NVLMModel
from .tokenizer import (
    ENDOFTEXT,
    IM_END,
    QWEN2_ADDED_TOKENS,
    QWEN2_CHAT_TEMPLATE,
    _set_qwen2_pipeline,  # the loader's own pipeline, so both sides agree
    load_tokenizer,
)

logger = logging.getLogger(__name__)

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
    (folder / "config.json").write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
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


def config_to_dict(config: NVLMConfig) -> dict[str, Any]:
    """`config` in the published `config.json` schema, quirks included (inverse of `NVLMConfig.from_dict`)."""
    v, m = config.vision, config.llm
    llm_config: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "llama",  # sic: the published quirk
        "attention_bias": True,
        "bos_token_id": 151643,
        "eos_token_id": m.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": m.hidden_size,
        "intermediate_size": m.intermediate_size,
        "max_position_embeddings": m.max_position_embeddings,
        "num_attention_heads": m.num_attention_heads,
        "num_hidden_layers": m.num_hidden_layers,
        "num_key_value_heads": m.num_key_value_heads,
        "rms_norm_eps": m.rms_norm_eps,
        "rope_theta": m.rope_theta,
        "rope_scaling": (
            {"factor": m.rope_scaling_factor, "type": m.rope_scaling_type} if m.rope_scaling_type else None
        ),
        "tie_word_embeddings": m.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "vocab_size": m.vocab_size,
        "do_sample": False,
        "top_k": 1,
        "top_p": 0,  # sic: the published quirk
        "temperature": 1.0,
        "repetition_penalty": 1.0,
    }
    vision_config: dict[str, Any] = {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_attention_heads": v.num_attention_heads,
        "num_hidden_layers": v.num_hidden_layers,
        "patch_size": v.patch_size,
        "image_size": v.image_size,
        "num_channels": v.num_channels,
        "layer_norm_eps": v.layer_norm_eps,
        "norm_type": v.norm_type,
        "qk_normalization": v.qk_normalization,
        "qkv_bias": v.qkv_bias,
        "hidden_act": v.hidden_act,
        "use_flash_attn": True,
        "torch_dtype": "bfloat16",
    }
    return {
        "architectures": ["NVLM_D"],
        "auto_map": {
            "AutoConfig": "configuration_nvlm_d.NVLM_D_Config",
            "AutoModel": "modeling_nvlm_d.NVLM_D_Model",
            "AutoModelForCausalLM": "modeling_nvlm_d.NVLM_D_Model",
        },
        "model_type": "NVLM_D",
        "downsample_ratio": config.downsample_ratio,
        "dynamic_image_size": True,
        "force_image_size": v.image_size,
        "llm_config": llm_config,
        "max_dynamic_patch": config.max_dynamic_patch,
        "min_dynamic_patch": config.min_dynamic_patch,
        "ps_version": config.ps_version,
        "select_layer": config.select_layer,
        "template": "chatml",
        "torch_dtype": "bfloat16",
        "use_thumbnail": config.use_thumbnail,
        "vision_config": vision_config,
    }


# --- tiny tokenizer ----------------------------------------------------------------------

# Training text for the tiny tokenizer: the words of NVLM prompts (roles, tile tags, task
# prompts) plus plain English, digits and punctuation. Every line appears twice in training,
# so min_frequency=2 admits each word's merges and the merge count is set by vocab size.
_TINY_CORPUS = (
    "Answer the questions.",
    "You are a helpful assistant. You are Qwen, created by Alibaba Cloud.",
    "system user assistant",
    "<image>\nWhat is in this image? Describe the image in detail.",
    "Image-1: <image>\nImage-2: <image>\nWhat is the difference between the two images?",
    "<Image><tile_1><tile_2><tile_3><tile_4><tile_5><tile_6><tile_global_thumbnail></Image>",
    "Answer the question using a single word, phrase, or number.",
    "Answer the question using a single word or phrase.",
    "Transcribe the document as plain text along with bounding boxes.",
    "Extract all texts and their bounding boxes from the given image using grounded OCR.",
    'Locate the text "total" in the image. Identify the text "date" and provide the coordinates.',
    "Recognize the text in this region: <ref>price</ref><box>(120,340),(567,890)</box>",
    "<quad>(10,20),(30,40),(50,60),(70,80)</quad>",
    "The quick brown fox jumps over the lazy dog.",
    "A cat is sitting on a red chair next to the window, looking outside at the birds.",
    "There are 3 people in the picture: two adults and one child, standing near a car.",
    "The chart shows sales from 2019 to 2024; revenue grew by 12.5% each year.",
    "Hello, world! How are you today? I'm fine, thanks. Let's go.",
    "It's a sunny day in the park, and children are playing football on the grass.",
    "The receipt lists: coffee $3.50, bread $2.25, milk $1.99 -- total $7.74.",
    "Please read the sign and tell me what it says about opening hours (9am-5pm).",
    "Which animal is larger, the elephant or the mouse? The elephant is much larger.",
    "def main():\n    print('hello')\n    return 0\n",
    "Question: how many apples are on the table? Answer: four apples.",
    "The document is a letter written in English; it has a title, a date and a signature.",
    "Count the objects, then list their colors: blue, green, yellow, orange, purple, white.",
    "The map of the city shows streets, a river, a bridge, the station and the museum.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 448 1024 2048 65536.",
    "Punctuation: . , ; : ! ? ' \" ( ) [ ] { } < > / \\ | - _ + = * & ^ % $ # @ ~ `",
    "Because the model answers questions about images, the prompt starts with the image.",
    "Thank you! Have a nice day, and see you tomorrow morning at the office.",
)
_TINY_VOCAB_SIZE = 768  # 256 byte tokens + 512 merges, before the 22 added tokens


def write_tiny_tokenizer(folder: Path) -> None:
    """Writes a small Qwen2-style tokenizer: `vocab.json`, `merges.txt`, `tokenizer_config.json`.

    A byte-level BPE is trained in-process (deterministically, in a few milliseconds, offline)
    on a built-in corpus, with the Qwen2 normalizer and pre-tokenizer; the 22 Qwen2.5 added
    tokens follow its base vocabulary in the same order, and the config carries the Qwen2.5
    chat template, so `load_tokenizer(folder)` takes the same path as for the real checkpoint.

    Args:
        folder: where to write; created if missing, files in it are overwritten.
    """
    backend = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    _set_qwen2_pipeline(backend)
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],  # the trainer would put them first; Qwen puts them after the vocabulary
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
    )
    backend.train_from_iterator(list(_TINY_CORPUS) * 2, trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    vocab: dict[str, int] = dict(sorted(model["vocab"].items(), key=lambda item: item[1]))
    # tokenizers >= 0.20 stores merges as pairs, older versions as "left right" strings.
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model["merges"]]

    added_tokens_decoder = {
        str(len(vocab) + offset): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for offset, (content, special) in enumerate(QWEN2_ADDED_TOKENS)
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": [c for c, special in QWEN2_ADDED_TOKENS if special and c != ENDOFTEXT],
        "bos_token": None,
        "chat_template": QWEN2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    folder.mkdir(parents=True, exist_ok=True)
    # Same layout as the real files: compact UTF-8 vocab, merges without a "#version" header.
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    (folder / "merges.txt").write_text("".join(f"{merge}\n" for merge in merges), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    logger.debug("wrote tiny tokenizer to %s: %d base tokens, %d merges", folder, len(vocab), len(merges))
