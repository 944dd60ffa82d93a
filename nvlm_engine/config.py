"""Configuration of an NVLM-D checkpoint, parsed from its published `config.json`.

Knows the schema of the NVLM-D Hugging Face config and its quirks; knows nothing of weights,
tokenizers or devices. The dataclasses are plain and validated in `__post_init__`; the LLM part
converts itself to a `transformers.Qwen2Config` because the LLM *is* transformers' Qwen2.

Quirks of the published file, each handled here once:
- `llm_config.model_type` is `"llama"` although the LLM is Qwen2 (`architectures` says so);
- `llm_config.rope_scaling` is `{"type": "dynamic", "factor": 3}`: plain RoPE up to
  `max_position_embeddings` (32,768) and dynamic NTK scaling only beyond, so within the default
  context we use plain RoPE (identical numbers, and no per-step device sync for the check);
- `llm_config.top_p` is `0` and `top_k` is `1`: not usable sampling settings, never passed on;
- the vision tower's attention is padded with dummy heads (25 real + 7 zero heads in the 72B
  checkpoint) which `config.json` does not mention: the count is derived, see `VisionConfig`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config_json import JsonFields, check_range, read_json_object
from .errors import CheckpointError

logger = logging.getLogger(__name__)

# Megatron trained InternViT with tensor parallelism 8 and so padded the head count up to a
# multiple of 8 with zero heads (SPEC section 2).
_DUMMY_HEAD_MULTIPLE = 8

# Upper bounds for a config.json: generous (7x or more the 72B values in the comments) but finite, so
# that a hostile file fails here in microseconds instead of building a 10**7-layer model on
# `meta` (97 s, 3 GB) or overflowing a storage size (vision width 10**9). The loader also checks
# the sizes against the shard headers before building anything (`checkpoint.check_config`).
MAX_LAYERS = 1024  # 80 LLM, 45 vision
MAX_WIDTH = 1 << 16  # hidden sizes 8192, 3200
MAX_INTERMEDIATE = 1 << 18  # 29568, 12800
MAX_HEADS = 1024  # 64 (8 KV), 25 (+7 dummy)
MAX_VOCAB = 1 << 20  # 152,064
MAX_POSITIONS = 1 << 24  # 32,768
MAX_IMAGE_SIZE = 4096  # 448
MAX_CHANNELS = 16  # 3
MAX_TILES = 256  # max_dynamic_patch 6
MAX_ROPE_FACTOR = 1024.0  # 3
MAX_CONFIG_BYTES = 1 << 20  # the published config.json is 3.7 KB


@dataclass(frozen=True)
class VisionConfig:
    """InternViT (the vision tower), as in `config.json`'s `vision_config`."""

    hidden_size: int = 3200
    intermediate_size: int = 12800
    num_attention_heads: int = 25
    num_hidden_layers: int = 45
    patch_size: int = 14
    image_size: int = 448
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    norm_type: str = "rms_norm"
    qk_normalization: bool = True
    qkv_bias: bool = False
    hidden_act: str = "gelu"
    # Zero heads appended to the real ones in the checkpoint. None: derive as Megatron did
    # (pad to a multiple of 8); the loader overrides it from the tensor shapes it reads.
    num_dummy_heads: int | None = None

    def __post_init__(self) -> None:
        # Ranges first: every division below then has a positive divisor.
        where = "vision_config"
        check_range(where, "hidden_size", self.hidden_size, 1, MAX_WIDTH)
        check_range(where, "intermediate_size", self.intermediate_size, 1, MAX_INTERMEDIATE)
        check_range(where, "num_attention_heads", self.num_attention_heads, 1, min(MAX_HEADS, self.hidden_size))
        check_range(where, "num_hidden_layers", self.num_hidden_layers, 1, MAX_LAYERS)
        check_range(where, "image_size", self.image_size, 1, MAX_IMAGE_SIZE)
        check_range(where, "patch_size", self.patch_size, 1, self.image_size)
        check_range(where, "num_channels", self.num_channels, 1, MAX_CHANNELS)
        check_range(where, "layer_norm_eps", self.layer_norm_eps, 0.0, 1.0, open_low=True)
        if self.num_dummy_heads is not None:
            check_range(where, "dummy heads (from the qkv shape)", self.num_dummy_heads, 0, MAX_HEADS)
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(
                f"vision_config.hidden_size ({self.hidden_size}) is not divisible by "
                f"num_attention_heads ({self.num_attention_heads}); this is not an InternViT config."
            )
        if self.image_size % self.patch_size:
            raise CheckpointError(
                f"vision_config.image_size ({self.image_size}) is not a multiple of patch_size ({self.patch_size})."
            )
        if self.norm_type not in ("rms_norm", "layer_norm"):
            raise CheckpointError(f"vision_config.norm_type must be 'rms_norm' or 'layer_norm', got {self.norm_type!r}.")
        if self.hidden_act != "gelu":
            raise CheckpointError(f"vision_config.hidden_act must be 'gelu', got {self.hidden_act!r}.")
        if self.num_dummy_heads is None:
            padded = math.ceil(self.num_attention_heads / _DUMMY_HEAD_MULTIPLE) * _DUMMY_HEAD_MULTIPLE
            object.__setattr__(self, "num_dummy_heads", padded - self.num_attention_heads)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def total_heads(self) -> int:
        """Heads stored in the checkpoint: real plus dummy."""
        assert self.num_dummy_heads is not None
        return self.num_attention_heads + self.num_dummy_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class LLMConfig:
    """The Qwen2 language model, as in `config.json`'s `llm_config`."""

    vocab_size: int = 152064
    hidden_size: int = 8192
    intermediate_size: int = 29568
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    rope_scaling_type: str | None = "dynamic"
    rope_scaling_factor: float = 3.0
    tie_word_embeddings: bool = False
    eos_token_id: int = 151645

    def __post_init__(self) -> None:
        # Ranges first: every division below then has a positive divisor.
        where = "llm_config"
        check_range(where, "vocab_size", self.vocab_size, 1, MAX_VOCAB)
        check_range(where, "hidden_size", self.hidden_size, 1, MAX_WIDTH)
        check_range(where, "intermediate_size", self.intermediate_size, 1, MAX_INTERMEDIATE)
        check_range(where, "num_hidden_layers", self.num_hidden_layers, 1, MAX_LAYERS)
        check_range(where, "num_attention_heads", self.num_attention_heads, 1, min(MAX_HEADS, self.hidden_size))
        check_range(where, "num_key_value_heads", self.num_key_value_heads, 1, self.num_attention_heads)
        check_range(where, "max_position_embeddings", self.max_position_embeddings, 1, MAX_POSITIONS)
        check_range(where, "rms_norm_eps", self.rms_norm_eps, 0.0, 1.0, open_low=True)
        check_range(where, "rope_theta", self.rope_theta, 0.0, 1e12, open_low=True)
        check_range(where, "rope_scaling.factor", self.rope_scaling_factor, 0.0, MAX_ROPE_FACTOR, open_low=True)
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(
                f"llm_config.hidden_size ({self.hidden_size}) is not divisible by "
                f"num_attention_heads ({self.num_attention_heads})."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"llm_config.num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        if self.rope_scaling_type not in (None, "dynamic"):
            raise CheckpointError(
                f"llm_config.rope_scaling type {self.rope_scaling_type!r} is not supported; "
                "NVLM-D uses 'dynamic' (or none)."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def max_context_length(self) -> int:
        """The longest context the model supports: dynamic NTK stretches RoPE by `factor`."""
        if self.rope_scaling_type == "dynamic":
            return int(self.max_position_embeddings * self.rope_scaling_factor)
        return self.max_position_embeddings

    def to_transformers(self, context_length: int) -> Any:
        """A `transformers.Qwen2Config` for a model that will see at most `context_length` tokens.

        Within `max_position_embeddings`, dynamic NTK RoPE equals plain RoPE (the reference's
        numbers), so plain RoPE is used; beyond it, transformers' dynamic RoPE.
        """
        from transformers import Qwen2Config

        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if context_length > self.max_position_embeddings and self.rope_scaling_type == "dynamic":
            rope = {"rope_type": "dynamic", "rope_theta": self.rope_theta, "factor": self.rope_scaling_factor}
        config = Qwen2Config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=rope,
            tie_word_embeddings=self.tie_word_embeddings,
            use_sliding_window=False,
            eos_token_id=self.eos_token_id,
        )
        config._attn_implementation = "sdpa"
        return config


@dataclass(frozen=True)
class NVLMConfig:
    """The whole NVLM-D model: vision tower, pixel shuffle + projector, LLM, image tiling."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    downsample_ratio: float = 0.5
    ps_version: str = "v2"
    select_layer: int = -1
    max_dynamic_patch: int = 6
    min_dynamic_patch: int = 1
    use_thumbnail: bool = True
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.ps_version not in ("v1", "v2"):
            raise CheckpointError(f"ps_version must be 'v1' or 'v2', got {self.ps_version!r}.")
        check_range("config.json", "downsample_ratio", self.downsample_ratio, 1 / 64, 1.0)
        check_range("config.json", "max_dynamic_patch", self.max_dynamic_patch, 1, MAX_TILES)
        grid = self.vision.image_size // self.vision.patch_size
        scale = int(round(1 / self.downsample_ratio))
        if scale * self.downsample_ratio != 1 or grid % scale:
            raise CheckpointError(
                f"downsample_ratio {self.downsample_ratio} does not divide the {grid}x{grid} patch grid."
            )
        if not -self.vision.num_hidden_layers <= self.select_layer < 0:
            raise CheckpointError(
                f"select_layer {self.select_layer} must be negative and within the "
                f"{self.vision.num_hidden_layers} vision layers."
            )
        if not 1 <= self.min_dynamic_patch <= self.max_dynamic_patch:
            raise CheckpointError(
                f"min_dynamic_patch ({self.min_dynamic_patch}) and max_dynamic_patch "
                f"({self.max_dynamic_patch}) must satisfy 1 <= min <= max."
            )

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens per 448x448 tile after pixel shuffle (256 for NVLM-D)."""
        return int(self.vision.num_patches * self.downsample_ratio**2)

    @property
    def projector_in_features(self) -> int:
        return int(self.vision.hidden_size / self.downsample_ratio**2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NVLMConfig:
        """Parse the published `config.json` content. Unknown keys are ignored.

        Every field read is type-checked (a JSON string where an integer belongs, an array where
        an object belongs, ...) and range-checked by the dataclasses; both are `CheckpointError`s
        that name the field.
        """
        top = JsonFields(data, "config.json")
        architectures = top.texts("architectures")
        model_type = top.text("model_type", "")
        if model_type != "NVLM_D" and "NVLM_D" not in architectures:
            raise CheckpointError(
                f"config.json describes model_type={model_type!r} "
                f"(architectures={architectures}), not NVLM-D; point the engine at an NVLM-D checkpoint "
                "such as nvidia/NVLM-D-72B."
            )
        for section in ("vision_config", "llm_config"):
            if section not in data:
                raise CheckpointError(f"config.json has no {section!r} section; it is not an NVLM-D config.")
        vision, llm = JsonFields(data["vision_config"], "vision_config"), JsonFields(data["llm_config"], "llm_config")
        llm_arch = (llm.texts("architectures") or ["Qwen2ForCausalLM"])[0]
        if llm_arch != "Qwen2ForCausalLM":
            # The published file says model_type "llama"; architectures is what the reference reads.
            raise CheckpointError(f"llm_config.architectures is {llm_arch!r}; only Qwen2ForCausalLM is supported.")
        return cls(
            vision=_parse_vision(vision),
            llm=_parse_llm(llm),
            downsample_ratio=top.number("downsample_ratio", 0.5),
            ps_version=top.text("ps_version", "v2"),
            select_layer=top.integer("select_layer", -1),
            max_dynamic_patch=top.integer("max_dynamic_patch", 6),
            min_dynamic_patch=top.integer("min_dynamic_patch", 1),
            use_thumbnail=top.flag("use_thumbnail", True),
            torch_dtype=top.text("torch_dtype", "bfloat16"),
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> NVLMConfig:
        """Read `config.json` of a checkpoint folder."""
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise CheckpointError(
                f"No config.json in {Path(folder)}: expected an NVLM-D checkpoint folder "
                "(config.json, model.safetensors.index.json, *.safetensors, tokenizer files)."
            )
        return cls.from_dict(read_json_object(path, max_bytes=MAX_CONFIG_BYTES))


def _parse_vision(raw: JsonFields) -> VisionConfig:
    defaults = VisionConfig()
    return VisionConfig(
        hidden_size=raw.integer("hidden_size", defaults.hidden_size),
        intermediate_size=raw.integer("intermediate_size", defaults.intermediate_size),
        num_attention_heads=raw.integer("num_attention_heads", defaults.num_attention_heads),
        num_hidden_layers=raw.integer("num_hidden_layers", defaults.num_hidden_layers),
        patch_size=raw.integer("patch_size", defaults.patch_size),
        image_size=raw.integer("image_size", defaults.image_size),
        num_channels=raw.integer("num_channels", defaults.num_channels),
        layer_norm_eps=raw.number("layer_norm_eps", defaults.layer_norm_eps),
        norm_type=raw.text("norm_type", defaults.norm_type),
        qk_normalization=raw.flag("qk_normalization", defaults.qk_normalization),
        qkv_bias=raw.flag("qkv_bias", defaults.qkv_bias),
        hidden_act=raw.text("hidden_act", defaults.hidden_act),
    )


def _parse_llm(raw: JsonFields) -> LLMConfig:
    defaults = LLMConfig()
    scaling = raw.section("rope_scaling")
    scaling_type = None
    factor = 1.0
    if scaling is not None and scaling.raw:
        scaling_type = scaling.text("type", "") or scaling.text("rope_type", "") or None
        factor = scaling.number("factor", 1.0)
    eos = raw.raw.get("eos_token_id")
    if isinstance(eos, list) and eos:  # transformers allows a list of end tokens; the first is ours
        eos = eos[0]
    eos = raw.integer("eos_token_id", defaults.eos_token_id, value=eos)
    # The generation fields (top_k 1, top_p 0, do_sample false) are deliberately not read: they
    # describe greedy decoding in a form OpenAI-style samplers reject (top_p 0). The engine's
    # own defaults are greedy, like the model card.
    if raw.raw.get("top_p") == 0:
        logger.debug("ignoring llm_config.top_p=0 from config.json (greedy is the engine default)")
    heads = raw.integer("num_attention_heads", defaults.num_attention_heads)
    config = LLMConfig(
        vocab_size=raw.integer("vocab_size", defaults.vocab_size),
        hidden_size=raw.integer("hidden_size", defaults.hidden_size),
        intermediate_size=raw.integer("intermediate_size", defaults.intermediate_size),
        num_hidden_layers=raw.integer("num_hidden_layers", defaults.num_hidden_layers),
        num_attention_heads=heads,
        # Absent or null means one KV head per query head (transformers' rule); 0 is an error.
        num_key_value_heads=raw.integer("num_key_value_heads", heads),
        rms_norm_eps=raw.number("rms_norm_eps", defaults.rms_norm_eps),
        rope_theta=raw.number("rope_theta", defaults.rope_theta),
        max_position_embeddings=raw.integer("max_position_embeddings", defaults.max_position_embeddings),
        rope_scaling_type=scaling_type,
        rope_scaling_factor=factor,
        tie_word_embeddings=raw.flag("tie_word_embeddings", False),
        eos_token_id=eos,
    )
    # Here rather than in __post_init__: test configs are built with a small vocabulary first
    # and get the tokenizer's end token afterwards.
    check_range("llm_config", "eos_token_id", config.eos_token_id, 0, config.vocab_size - 1)
    return config
