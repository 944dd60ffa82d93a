"""What NVLM-D takes in memory, counted before any weight is read: the accounting the planner uses.

A `Footprint` is the bytes every checkpoint tensor takes once loaded, grouped by placement unit
(a module prefix placed whole: the vision tower, the projector, one decoder layer...), together
with the KV cache one token takes. `estimate_activation_bytes` is the working memory of one
forward pass, and `max_tokens_that_fit` the longest context a device can then hold.

It knows nothing about which device takes what: that is `placement.py`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .config import NVLMConfig
from .errors import CheckpointTensorError
from .quantization import QuantizationScheme, get_scheme, is_quantized_weight

__all__ = [
    "DEFAULT_OVERHEAD_BYTES",
    "FIRST_DEVICE_MODULES",
    "GIB",
    "LAYERS",
    "VISION_CHUNK_TILES",
    "Footprint",
    "activation_reserve",
    "estimate_activation_bytes",
    "format_gib",
    "layer_unit",
    "max_tokens_that_fit",
    "unit_of",
]

GIB = 2**30
DEFAULT_OVERHEAD_BYTES = 2 * GIB  # per device: CUDA context, cuBLAS workspaces, allocator slack
VISION_CHUNK_TILES = 16  # NVLMModel.encode_images runs the vision tower 16 tiles at a time

LAYERS = "language_model.model.layers"
# Pinned to the first device with the last decoder layer (SPEC section 8), in forward order.
FIRST_DEVICE_MODULES = ("vision_model", "mlp1", "language_model.model.embed_tokens", "language_model.model.norm",
                        "language_model.lm_head", "language_model.model.rotary_emb")

# safetensors dtype names that are not floating point (kept as stored, never cast).
_INTEGER_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8,
                   "bool": 1, "uint8": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8}


def layer_unit(index: int) -> str:
    return f"{LAYERS}.{index}"


def unit_of(name: str) -> str | None:
    """The placement unit (a module prefix placed whole) holding tensor `name`, or None."""
    if name.startswith(LAYERS + "."):
        return ".".join(name.split(".")[:4])
    for unit in FIRST_DEVICE_MODULES:
        if name == unit or name.startswith(unit + "."):
            return unit
    return None


def format_gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


@dataclass(frozen=True, eq=False)
class Footprint:
    """What every tensor of one NVLM-D checkpoint takes once loaded, grouped by placement unit.

    Floating tensors are sized in the compute dtype (the loader casts them: the published
    checkpoint stores some in fp32); integer tensors as stored; decoder linear weights in the
    quantized format when there is one.

    Attributes:
        config: the model's config.
        shapes: tensor name -> shape, every tensor of the checkpoint.
        dtype: the compute dtype.
        quantization: the scheme of the decoder linears, or None.
        stored_dtypes: tensor name -> dtype in the shard headers (empty when only the index is known).
        stored_bytes: the checkpoint's size on disk, when known.
    """

    config: NVLMConfig
    shapes: Mapping[str, tuple[int, ...]]
    dtype: torch.dtype = torch.bfloat16
    quantization: QuantizationScheme | None = None
    stored_dtypes: Mapping[str, str] = field(default_factory=dict)
    stored_bytes: int | None = None
    tensor_bytes: Mapping[str, int] = field(init=False)
    unit_bytes: Mapping[str, int] = field(init=False)

    def __post_init__(self) -> None:
        sizes: dict[str, int] = {}
        units: dict[str, int] = {u: 0 for u in self.units}
        for name, shape in self.shapes.items():
            sizes[name] = self.tensor_size(name, shape)
            unit = unit_of(name)
            if unit not in units:
                raise CheckpointTensorError(
                    f"Tensor {name!r} belongs to no NVLM-D module; the checkpoint does not match its config.json.",
                    unexpected=[name],
                )
            units[unit] += sizes[name]
        object.__setattr__(self, "tensor_bytes", sizes)
        object.__setattr__(self, "unit_bytes", units)

    def tensor_size(self, name: str, shape: Sequence[int]) -> int:
        """Bytes tensor `name` takes once loaded with `shape`: its stored shape, or a rank's shard of it.

        A quantized linear weight ([out, in]) in its scheme's format, scales included; an integer
        tensor as stored; any other in the compute dtype.
        """
        if self.quantization is not None and is_quantized_weight(name):
            return self.quantization.linear_bytes(shape[0], shape[1])
        width = _INTEGER_DTYPES.get(self.stored_dtypes.get(name, ""), self.dtype.itemsize)
        return math.prod(shape) * width

    @classmethod
    def from_model(cls, model: nn.Module, **kwargs: object) -> Footprint:
        """Shapes from a model (built on the `meta` device: no memory)."""
        shapes = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
        return cls(config=model.config, shapes=shapes, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_config(cls, config: NVLMConfig, names: Sequence[str] | None = None, **kwargs: object) -> Footprint:
        """Shapes from the model `config` describes; `names` (a checkpoint index) must match it."""
        from .model import NVLMModel

        with torch.device("meta"):
            model = NVLMModel(config)
        footprint = cls.from_model(model, **kwargs)
        if names is not None:
            missing = sorted(set(footprint.shapes) - set(names))
            unexpected = sorted(set(names) - set(footprint.shapes))
            if missing or unexpected:
                raise CheckpointTensorError(
                    f"The tensor index does not match config.json: {len(missing)} missing ({missing[:5]}), "
                    f"{len(unexpected)} unexpected ({unexpected[:5]}). Check that both come from the same download.",
                    missing=missing, unexpected=unexpected,
                )
        return footprint

    def resized(self, *, dtype: torch.dtype | None = None,
                quantization: str | QuantizationScheme | None = "keep") -> Footprint:
        """The same checkpoint in another compute dtype or quantization ("keep" keeps it)."""
        scheme = self.quantization if quantization == "keep" else get_scheme(quantization)
        return replace(self, dtype=dtype or self.dtype, quantization=scheme)

    @property
    def num_layers(self) -> int:
        return self.config.llm.num_hidden_layers

    @property
    def units(self) -> tuple[str, ...]:
        """Every placement unit, in forward order (rotary has no stored tensors but is placed)."""
        return (*FIRST_DEVICE_MODULES, *(layer_unit(i) for i in range(self.num_layers)))

    @property
    def total_bytes(self) -> int:
        return sum(self.tensor_bytes.values())

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        """Keys and values of one token in one decoder layer, in the compute dtype."""
        llm = self.config.llm
        return 2 * llm.num_key_value_heads * (llm.hidden_size // llm.num_attention_heads) * self.dtype.itemsize

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes_per_token_per_layer * self.num_layers

    def part_bytes(self) -> dict[str, int]:
        """Bytes of the vision tower, projector and LLM, for summaries."""
        vision, projector = self.unit_bytes["vision_model"], self.unit_bytes["mlp1"]
        return {"vision": vision, "projector": projector, "llm": self.total_bytes - vision - projector}


def estimate_activation_bytes(config: NVLMConfig, *, tokens: int, batch_size: int, dtype: torch.dtype,
                              vision: bool) -> int:
    """Peak working memory of one forward pass on a device, beyond its weights and KV cache.

    Prefill runs the whole prompt through each decoder layer in one pass (`generation.prefill`),
    so the peak is a decoder layer's MLP over `batch_size x tokens` positions: the gate, up and
    their product ([tokens, intermediate] each), plus the embeddings, residual and normed hidden
    states ([tokens, hidden] each): (3 x intermediate + 4 x hidden) values per position. A padded
    batch (batch_size > 1) also holds its boolean attention mask and SDPA's additive copy of it
    ([batch, tokens, tokens], 1 + 2 bytes each). The device with the vision tower also runs it on
    16 tiles at a time; that peak (MLP of 16 x 1025 patches, then the projector) counts when larger.
    """
    llm = config.llm
    width = dtype.itemsize
    peak = tokens * batch_size * (3 * llm.intermediate_size + 4 * llm.hidden_size) * width
    if batch_size > 1:
        peak += batch_size * tokens * tokens * 3
    if vision:
        v = config.vision
        patches = VISION_CHUNK_TILES * (v.num_patches + 1)
        tower = patches * (2 * v.intermediate_size + 4 * v.hidden_size) * width
        projector = VISION_CHUNK_TILES * config.tokens_per_tile * (
            config.projector_in_features + 2 * llm.intermediate_size + llm.hidden_size
        ) * width
        peak = max(peak, tower + projector)
    return int(peak)


def activation_reserve(footprint: Footprint, *, context_length: int, batch_size: int, activation_bytes: int | None,
                       vision: bool) -> int:
    """The working memory a plan reserves on a device: `activation_bytes` when given, else the estimate.

    `vision`: the device also runs the vision tower (the first device, or one with a copy).
    """
    if activation_bytes is not None:
        return activation_bytes
    return estimate_activation_bytes(footprint.config, tokens=context_length, batch_size=batch_size,
                                     dtype=footprint.dtype, vision=vision)


def max_tokens_that_fit(footprint: Footprint, memory_bytes: int, weight: int, kv_per_token: int, overhead: int,
                        activation_bytes: int | None, batch_size: int, *, first: bool) -> int | None:
    """Largest context whose KV cache (and, when estimated, prefill activations) fit in `memory_bytes`.

    Args:
        footprint: the sizes (config and compute dtype for the activation estimate).
        memory_bytes: what the device offers.
        weight: the weights it holds.
        kv_per_token: KV cache of one token of one sequence on it; 0 (no decoder layer) gives None.
        overhead: its fixed reserve.
        activation_bytes: a fixed activation reserve, or None to estimate it per context length.
        batch_size: sequences decoded together.
        first: whether it runs the vision tower (counts in the activation estimate).
    """
    if kv_per_token == 0:
        return None

    def fits(tokens: int) -> bool:
        act = activation_reserve(footprint, context_length=tokens, batch_size=batch_size,
                                 activation_bytes=activation_bytes, vision=first)
        return weight + overhead + act + kv_per_token * tokens * batch_size <= memory_bytes

    low, high = 0, 1 << 24
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low
