"""Tensor parallelism of the Qwen2 decoder layers: what each rank holds, and reading only that.

Megatron-style sharding over `tp` ranks (one process each, `tp_executor.py` runs them):

- column-parallel (rows of the weight split, so each rank computes a slice of the outputs):
  `q_proj`, `k_proj`, `v_proj` (weights and biases, split by head: rank r holds query heads
  `r*H/tp ..` and KV heads `r*H_kv/tp ..`, so each query head keeps its own KV head) and
  `gate_proj`, `up_proj` (split by intermediate block);
- row-parallel (columns split, each rank multiplies its slice of the inputs): `o_proj` and
  `down_proj`. Their partial outputs are summed by one all-reduce each (`decoder._layers` calls
  `model.tp_reduce`); neither has a bias in Qwen2, so nothing is added twice;
- replicated: the two RMSNorm weights of each layer.

Attention needs no communication: every head's keys and values stay on its rank, so the KV
cache is sharded by KV head too. The vision tower (25 heads: not divisible) and the projector
are replicated whole on every rank: the tiles of a request are split into contiguous slices, one
per rank (`tile_counts`), and the image tokens gathered on rank 0. The embeddings, the final
norm and the LM head stay whole on rank 0 only (the workers never hold them): the workers
receive the layer inputs as hidden states, and rank 0 computes the logits and samples. Against a vocab-parallel head this costs
rank 0 the head's memory (2.5 GB in bf16 for 152k x 8192) and saves a gather per step, and
sampling (penalties, grammars, top-p over the whole vocabulary) stays where it is.

Every rank builds its model on `meta` with the shard shapes (a Qwen2 config with heads / tp,
KV heads / tp, intermediate / tp and an explicit `head_dim`) and reads only its slice of each
tensor (`safe_open(...).get_slice(name)[...]`), and the whole vision tower and projector: peak
host memory per rank is what it holds plus one tensor.

Shards, quantized (`quantization=` "bnb-8bit", "bnb-4bit", or "fp8" on CUDA 8.9+): each rank
quantizes its own shard of each of the seven decoder linears as soon as the shard's weight (and
bias) are read (`quantization.QuantizingLoader.quantize_if_loaded`), with the kernels of the
one-process engine (`Linear8bitLt`, `Linear4bit`, `Fp8Linear`) applied to a smaller matrix, so
one linear at a time is held in full precision. A column-parallel shard holds whole output rows:
its LLM.int8() and FP8 row scales are the whole matrix's, and its NF4 blocks too wherever a
shard's size is a multiple of the 64-value block. A row-parallel shard (`o_proj`, `down_proj`)
holds part of every row, so its row scales are the absmax over the shard's columns only, and
its NF4 blocks (and their double-quantized statistics) are formed over the shard: a different
rounding from quantizing the whole matrix, not a coarser one (a scale over fewer values is never
larger). Quantized logits at tp > 1 are therefore close to, not equal to, those of one process.
Knows checkpoints and module names; knows nothing of processes or requests.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import TensorInfo
from .config import LLMConfig, NVLMConfig
from .errors import CheckpointError, TensorParallelOptionsError
from .quantization import QuantizationScheme, QuantizingLoader, stored_bytes

LAYER_PREFIX = "language_model.model.layers."
VISION_PREFIXES = ("vision_model.", "mlp1.")  # held whole by every rank
_LAYER_NAME = re.compile(r"language_model\.model\.layers\.\d+\.(.+)")
# Which dimension of each decoder-layer tensor is split across ranks (None: replicated).
SPLIT_DIM: dict[str, int | None] = {
    "self_attn.q_proj.weight": 0, "self_attn.q_proj.bias": 0,
    "self_attn.k_proj.weight": 0, "self_attn.k_proj.bias": 0,
    "self_attn.v_proj.weight": 0, "self_attn.v_proj.bias": 0,
    "mlp.gate_proj.weight": 0, "mlp.up_proj.weight": 0,
    "self_attn.o_proj.weight": 1, "mlp.down_proj.weight": 1,
    "input_layernorm.weight": None, "post_attention_layernorm.weight": None,
}


def check_tp_size(llm: LLMConfig, tp: int) -> None:
    """`tp` must divide the query heads, the KV heads and the intermediate size.

    Raises:
        TensorParallelOptionsError: it does not (or it is not a positive int).
    """
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise TensorParallelOptionsError(f"tensor_parallel must be a positive int, got {tp!r}; use 1, 2, 4 or 8.")
    sizes = {"num_attention_heads": llm.num_attention_heads, "num_key_value_heads": llm.num_key_value_heads,
             "intermediate_size": llm.intermediate_size}
    bad = [f"{name} {value}" for name, value in sizes.items() if value % tp]
    if bad:
        fits = [n for n in range(1, llm.num_key_value_heads + 1) if not any(v % n for v in sizes.values())]
        raise TensorParallelOptionsError(
            f"tensor_parallel={tp} does not divide this model's {', '.join(bad)}; each rank must hold whole "
            f"heads and an equal share. Use one of {fits}.")


def split_dim(name: str) -> int | None:
    """The dimension of checkpoint tensor `name` split across ranks; None: held whole.

    Raises:
        CheckpointError: a decoder-layer tensor this sharding does not know (it could not be
            placed correctly, e.g. a bias on a row-parallel linear).
    """
    match = _LAYER_NAME.fullmatch(name)
    if match is None:
        return None
    try:
        return SPLIT_DIM[match.group(1)]
    except KeyError as e:
        raise CheckpointError(
            f"{name} is not a Qwen2 decoder tensor tensor parallelism knows how to split; load this "
            "checkpoint without tensor_parallel.") from e


def shard_transformers_config(llm: LLMConfig, context_length: int, tp: int) -> Any:
    """A `Qwen2Config` of one rank's share: heads / tp, KV heads / tp, intermediate / tp.

    `head_dim` is set explicitly: transformers would otherwise derive it as hidden / heads,
    which is `tp` times too wide for a shard.
    """
    check_tp_size(llm, tp)
    config = llm.to_transformers(context_length)
    config.head_dim = llm.head_dim
    config.num_attention_heads = llm.num_attention_heads // tp
    config.num_key_value_heads = llm.num_key_value_heads // tp
    config.intermediate_size = llm.intermediate_size // tp
    return config


def shard_shape(name: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """The shape rank `r` of `tp` holds of a tensor stored as `shape`."""
    dim = split_dim(name)
    if dim is None:
        return shape
    return tuple(n // tp if i == dim else n for i, n in enumerate(shape))


def build_rank0_model(config: NVLMConfig, context_length: int, tp: int) -> nn.Module:
    """Rank 0's model on `meta`: the whole NVLM-D, its decoder layers shard-sized."""
    from transformers import Qwen2ForCausalLM

    from .model import NVLMModel

    with torch.device("meta"):
        model = NVLMModel(config, context_length=context_length)
        model.language_model = Qwen2ForCausalLM(shard_transformers_config(config.llm, context_length, tp))
    return model


class WorkerModel(nn.Module):
    """A worker rank's model: the shard-sized decoder layers, the rotary table, the vision tower and projector.

    `language_model.model.layers` and `.rotary_emb` are what `decoder._layers` reads; the
    embeddings, final norm and LM head are dropped (rank 0 alone holds them). `vision_model` and
    `mlp1` are whole (checkpoint names), for this rank's slice of the tiles (`model.encode_tiles`).
    """

    def __init__(self, config: NVLMConfig, context_length: int, tp: int) -> None:
        super().__init__()
        from transformers import Qwen2ForCausalLM

        from .model import build_projector
        from .vision import InternVisionModel

        self.config = config
        with torch.device("meta"):
            lm = Qwen2ForCausalLM(shard_transformers_config(config.llm, context_length, tp))
            self.vision_model = InternVisionModel(config.vision, select_layer=config.select_layer)
            self.mlp1 = build_projector(config)
        lm.model.embed_tokens = nn.Identity()
        lm.model.norm = nn.Identity()
        lm.lm_head = nn.Identity()
        self.language_model = lm
        self.tp_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.tp_link = None


def fill_shards(model: nn.Module, infos: Mapping[str, TensorInfo], *, rank: int, tp: int, device: torch.device,
                dtype: torch.dtype, check: Callable[[], None] | None = None,
                quantization: QuantizationScheme | None = None) -> None:
    """Read rank `rank`'s slice of every decoder-layer tensor in `infos` into `model` (on `meta`).

    One shard file open at a time, one tensor slice in memory at a time beyond the model.
    `check` is called before each tensor (rank 0 raises there when a worker has died). With
    `quantization`, each decoder linear's shard is quantized on `device` once its weight and bias
    are read (bitsandbytes: staged on the CPU first, as in one process); see "Shards, quantized".
    """
    from safetensors import SafetensorError, safe_open

    loader = QuantizingLoader(model, quantization, lambda _: device, dtype) if quantization else None
    by_file: dict[Path, list[str]] = {}
    for name, info in infos.items():
        by_file.setdefault(info.shard, []).append(name)
    for path in sorted(by_file):
        if path.suffix != ".safetensors":
            raise TensorParallelOptionsError(
                f"{path.name} is not a safetensors file; tensor parallelism reads slices of safetensors "
                "shards only. Convert the checkpoint to safetensors, or load it without tensor_parallel.")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in by_file[path]:
                    if check is not None:
                        check()
                    piece = _slice(f.get_slice(name), split_dim(name), rank, tp)
                    target = dtype if piece.is_floating_point() else piece.dtype
                    place = loader.device_of(name) if loader else device
                    # A copy: no view of the file's memory map outlives the read.
                    _set_tensor(model, name, piece.to(device=place, dtype=target, copy=True).contiguous())
                    del piece
                    if loader is not None:
                        loader.quantize_if_loaded(name)
        except SafetensorError as e:
            raise CheckpointError(f"Reading {path.name} failed ({e}); re-download it and check its sha256.") from e
    if loader is not None:
        loader.finish()


def _slice(piece: Any, dim: int | None, rank: int, tp: int) -> torch.Tensor:
    """Rank `rank`'s share of a safetensors slice handle (the whole tensor when `dim` is None)."""
    shape = piece.get_shape()
    if dim is None:
        return piece[:]
    size = shape[dim] // tp
    part = slice(rank * size, (rank + 1) * size)
    return piece[part] if dim == 0 else piece[:, part]


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    expected = (module._parameters | module._buffers).get(attr)
    if expected is not None and expected.shape != value.shape:  # the shard model's shape is the contract
        raise AssertionError(f"{name}: rank slice {tuple(value.shape)} != shard shape {tuple(expected.shape)}")
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise AssertionError(f"no parameter or buffer {name}")


def rebuild_rotary(model: nn.Module, device: torch.device) -> None:
    """The rotary table is computed, not stored: build it on `device` from the shard config."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    lm = model.language_model
    lm.model.rotary_emb = Qwen2RotaryEmbedding(config=lm.config).to(device)


def layer_infos(infos: Mapping[str, TensorInfo]) -> dict[str, TensorInfo]:
    """The decoder-layer tensors of a checkpoint (what every rank reads a slice of)."""
    return {n: i for n, i in infos.items() if n.startswith(LAYER_PREFIX)}


def vision_infos(infos: Mapping[str, TensorInfo]) -> dict[str, TensorInfo]:
    """The vision tower's and projector's tensors (every rank reads them whole)."""
    return {n: i for n, i in infos.items() if n.startswith(VISION_PREFIXES)}


def tile_counts(tiles: int, tp: int) -> list[int]:
    """How many of `tiles` image tiles each rank encodes: contiguous slices, rank 0 first, the
    first `tiles % tp` ranks one more (5 over 2 ranks: [3, 2]; 1 over 2: [1, 0])."""
    return [tiles // tp + (rank < tiles % tp) for rank in range(tp)]


def tensor_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes each parameter and buffer of `model` holds in memory, by name (what a rank resides).

    A bitsandbytes weight counts its quantization statistics too (`quantization.stored_bytes`),
    so a quantized weight's entry equals the planner's `Footprint.tensor_size` of its shard.
    """
    return {n: stored_bytes(t) for n, t in [*model.named_parameters(), *model.named_buffers()]
            if t.device.type != "meta"}


def rank_devices(device_map: Any, tp: int) -> list[torch.device]:
    """One device per rank: all "cpu", or `cuda:0..tp-1` ("auto"/"cuda"/None with GPUs), or a list.

    Raises:
        TensorParallelOptionsError: a device map tensor parallelism does not take, too few GPUs,
            or two ranks on one GPU.
    """
    if isinstance(device_map, (str, torch.device)) or device_map is None:
        text = str(device_map or "auto")
        if text == "cpu":
            return [torch.device("cpu")] * tp
        if text in ("auto", "cuda"):
            if not torch.cuda.is_available():
                return [torch.device("cpu")] * tp
            if torch.cuda.device_count() < tp:
                raise TensorParallelOptionsError(
                    f"tensor_parallel={tp} needs {tp} GPUs, one per rank; {torch.cuda.device_count()} are visible. "
                    "Lower tensor_parallel, or use device_map='cpu'.")
            return [torch.device("cuda", i) for i in range(tp)]
        raise TensorParallelOptionsError(
            f"device_map={device_map!r} cannot be used with tensor_parallel={tp}: use 'auto', 'cuda', 'cpu', or "
            f"a list of {tp} devices (one per rank).")
    if isinstance(device_map, (list, tuple)) and len(device_map) == tp:
        devices = [torch.device(d) for d in device_map]
        cuda = [d for d in devices if d.type == "cuda"]
        if cuda and (len(cuda) != tp or len(set(cuda)) != tp or any(d.index is None for d in cuda)):
            raise TensorParallelOptionsError(
                f"device_map={device_map!r}: with tensor_parallel each rank needs its own GPU ('cuda:0', 'cuda:1', ...) "
                "or every rank the CPU.")
        if not cuda and any(d.type != "cpu" for d in devices):
            raise TensorParallelOptionsError(f"device_map={device_map!r}: devices must be 'cpu' or 'cuda:N'.")
        return devices
    raise TensorParallelOptionsError(
        f"device_map={device_map!r} cannot be used with tensor_parallel={tp}: use 'auto', 'cuda', 'cpu', or a "
        f"list of {tp} devices (one per rank). Explicit module maps and 'card' are for the layer split.")
