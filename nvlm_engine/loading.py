"""Loading a checkpoint: from a folder or hub id to a model on its devices, ready to decode.

The steps, in order: arguments that fail without reading anything; config, tokenizer and tensor
headers (the model built on `meta` and checked against them); the placement plan; every tensor
straight to its device (quantized decoder linears through a staging copy); the rotary table, the
vision copies asked for, and the KV cache budget the plan leaves. `NVLMEngine.from_pretrained`
documents the arguments.

Knows checkpoints, placement and quantization; knows nothing of prompts or requests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .checkpoint import check_tensors, fill_model, find_weight_files, infer_dummy_heads, read_tensor_infos
from .config import NVLMConfig
from .cores import DecodeSettings
from .devices import DeviceMapLike, Placement, device_for, resolve_dtype, resolve_placement
from .errors import ContextLengthError
from .hub import display_name, resolve_checkpoint
from .load_progress import LoadProgress, ProgressCallback, check_progress, hub_progress, shard_progress
from .model import NVLMModel
from .quantization import QuantizationScheme, QuantizingLoader, check_runtime, get_scheme
from .tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What loading produced: the placed model, its tokenizer and the settings derived on the way."""

    model: NVLMModel
    tokenizer: Any
    context_length: int
    name: str
    decoding: DecodeSettings


def load_checkpoint(
    path: str | Path,
    *,
    revision: str | None,
    download: bool,
    device_map: DeviceMapLike | None,
    dtype: str | torch.dtype | None,
    max_memory: Mapping[str | int, int | str] | None,
    context_length: int | None,
    batch_size: int,
    quantization: str | QuantizationScheme | None,
    allow_pickle: bool,
    progress: LoadProgress,
    decoding: DecodeSettings | None,
    vision_replicas: bool,
    tensor_parallel: int = 1,
) -> LoadedCheckpoint:
    """Load and place a checkpoint (see `NVLMEngine.from_pretrained` for every argument and error)."""
    # 1. Arguments that fail without reading anything.
    if tensor_parallel != 1:
        _check_tensor_parallel(tensor_parallel, device_map, max_memory=max_memory,
                               vision_replicas=vision_replicas)
    scheme = get_scheme(quantization)
    if scheme is not None:
        check_runtime(scheme, [])  # CUDA (and bitsandbytes) present at all
    check_progress(progress)
    folder = resolve_checkpoint(path, revision=revision, download=download, progress=hub_progress(progress))
    started = time.perf_counter()
    # 2. Config, tokenizer, tensor headers; the model on `meta`, checked against the headers.
    config = NVLMConfig.from_folder(folder)
    weight_files = find_weight_files(folder, allow_pickle=allow_pickle)
    infos = read_tensor_infos(weight_files, allow_pickle=allow_pickle)
    config = infer_dummy_heads(config, infos)  # also checks config.json's sizes against the headers
    # After the sizes are checked: the tokenizer may not have more tokens than embedding rows.
    tokenizer = load_tokenizer(folder, max_tokens=config.llm.vocab_size)
    limit = config.llm.max_context_length()
    context_length = context_length or config.llm.max_position_embeddings
    if not 0 < context_length <= limit:
        raise ContextLengthError(
            f"context_length {context_length} is outside 1..{limit} (RoPE supports up to "
            f"{config.llm.max_position_embeddings} x {config.llm.rope_scaling_factor} with dynamic scaling).",
            prompt_tokens=0, max_new_tokens=0, context_length=limit,
        )
    with torch.device("meta"):
        model = NVLMModel(config, context_length=context_length)
    check_tensors(model, infos)
    if tensor_parallel != 1:  # every rank reads its slice of the layers (tp_startup.py); no layer split plan
        return _load_tensor_parallel(model, folder, infos, tokenizer, name=display_name(path, folder),
                                     tp=tensor_parallel, device_map=device_map, max_memory=max_memory, dtype=dtype,
                                     context_length=context_length, batch_size=batch_size, decoding=decoding,
                                     scheme=scheme)
    # 3. The placement plan, from the real tensor shapes and stored dtypes.
    placement = resolve_placement(
        device_map, model, dtype=dtype, max_memory=max_memory, context_length=context_length,
        batch_size=batch_size, quantization=scheme, stored_dtypes={n: i.dtype for n, i in infos.items()},
        vision_replicas=vision_replicas,
    )
    devices, compute_dtype = placement.device_map, placement.dtype
    if scheme is not None:
        check_runtime(scheme, _layer_devices(config, devices))
    # 4. Each tensor straight to its device (quantized decoder linears via a staging copy).
    head = "language_model.lm_head.weight"
    # CPU GEMM kernels read a column-major [hidden, vocab] LM head much faster for small
    # decode batches (measured 1.2x at batch 1, 1.7x at batch 8 with a 152k vocabulary).
    column_major = frozenset({head}) if device_for(head, devices).type == "cpu" else frozenset()
    loader = QuantizingLoader(model, scheme, lambda n: device_for(n, devices), compute_dtype) if scheme else None
    name = display_name(path, folder)
    with shard_progress(progress, weight_files, title=name) as report:
        fill_model(model, infos, device_of=loader.device_of if loader else (lambda n: device_for(n, devices)),
                   dtype=compute_dtype, column_major=column_major, progress=_with_quantization(report, loader))
    if loader is not None:
        loader.finish()
    _rebuild_rotary(model, device_for("language_model.model.rotary_emb", devices))
    model.prepare_for_inference()
    logger.info("loaded %s in %.1fs on %s as %s%s", folder, time.perf_counter() - started,
                sorted({str(d) for d in devices.values()}), compute_dtype,
                f" ({scheme.name} decoder linears)" if scheme else "")
    decoding = decoding or DecodeSettings()
    if decoding.kv_tokens is None:
        decoding = replace(decoding, kv_tokens=_kv_token_budget(placement, context_length, batch_size))
    if vision_replicas and placement.plan is not None and len(placement.plan.vision_devices) > 1:
        model.replicate_vision([torch.device(n) for n in placement.plan.vision_devices])
    return LoadedCheckpoint(model, tokenizer, context_length, name, decoding)




def _check_tensor_parallel(tp: int, device_map: DeviceMapLike | None, *,
                           max_memory: Mapping[str | int, int | str] | None, vision_replicas: bool) -> None:
    """Refuse, before reading anything, what `tensor_parallel > 1` cannot be combined with.

    Quantization is not refused here: every rank quantizes its own shards (`tensor_parallel.py`),
    and `quantization.check_runtime` refuses, as in one process, a scheme the ranks' devices
    cannot run (FP8 without CUDA compute capability 8.9+, bitsandbytes missing or too old).
    `max_memory` budgets the ranks' GPUs (`tp_startup.check_rank_budgets`).
    """
    from .errors import TensorParallelOptionsError
    from .tensor_parallel import rank_devices
    from .tp_startup import check_rank_budgets

    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise TensorParallelOptionsError(f"tensor_parallel must be a positive int, got {tp!r}; use 1, 2, 4 or 8.")
    if vision_replicas:
        raise TensorParallelOptionsError(
            f"tensor_parallel={tp} cannot be combined with vision_replicas: every rank already holds the vision "
            f"tower and encodes its share of a request's tiles. Drop vision_replicas.")
    devices = rank_devices(device_map, tp)  # the device map's form, and enough GPUs
    if max_memory:
        check_rank_budgets(max_memory, devices)


def _load_tensor_parallel(model: NVLMModel, folder: Path, infos: dict, tokenizer: Any, *, name: str, tp: int,
                          device_map: DeviceMapLike | None, max_memory: Mapping[str | int, int | str] | None,
                          dtype: str | torch.dtype | None, context_length: int,
                          batch_size: int, decoding: DecodeSettings | None,
                          scheme: QuantizationScheme | None) -> LoadedCheckpoint:
    """`load_checkpoint` with `tensor_parallel > 1`, from the model on `meta` and the checked tensor headers.

    With `scheme`, every rank's devices are checked to run it first, and the plan sizes each
    rank's linear shards as that scheme stores them.

    On CUDA every rank's memory is planned before any worker starts (`tp_startup.rank_kv_tokens`:
    a rank that does not fit raises `PlanError`), and the KV cache is sized from the tightest
    rank's room; on the CPU nothing is planned and the cache is not bounded, as in one process.
    """
    from .devices import local_gpus
    from .placement_sizes import Footprint
    from .quantization import check_linear_shapes
    from .tensor_parallel import rank_devices, shard_shape
    from .tp_startup import load_tensor_parallel, rank_gpu_specs, rank_kv_tokens

    devices = rank_devices(device_map, tp)
    if scheme is not None:
        check_runtime(scheme, devices)
        check_linear_shapes(scheme, {n: shard_shape(n, i.shape, tp) for n, i in infos.items()}, devices)
    gpus = rank_gpu_specs(devices, local_gpus() if devices[0].type == "cuda" else [], max_memory)
    kv_tokens = None
    if gpus:
        footprint = Footprint.from_model(model, dtype=resolve_dtype(dtype, devices[0]), quantization=scheme,
                                         stored_dtypes={n: i.dtype for n, i in infos.items()})
        kv_tokens = rank_kv_tokens(footprint, gpus, context_length=context_length, batch_size=batch_size)
    loaded = load_tensor_parallel(folder, model.config, infos, tp=tp, device_map=device_map, dtype=dtype,
                                  context_length=context_length, quantization=scheme)
    decoding = decoding or DecodeSettings()
    if decoding.kv_tokens is None and kv_tokens is not None:
        decoding = replace(decoding, kv_tokens=kv_tokens)
    return LoadedCheckpoint(loaded, tokenizer, context_length, name, decoding)


def _layer_devices(config: NVLMConfig, devices: Mapping[str, torch.device]) -> set[torch.device]:
    """The devices holding decoder layers (where quantized linears would run)."""
    return {device_for(f"language_model.model.layers.{i}", devices) for i in range(config.llm.num_hidden_layers)}


def _kv_token_budget(placement: Placement, context_length: int, batch_size: int) -> int | None:
    """KV cache tokens (all sequences) the devices can hold: the plan's KV room on its tightest device.

    Without a plan, GPUs reserve what was asked (`batch_size` sequences of `context_length`)
    and the CPU is not bounded here (its memory is the operating system's business).
    """
    if placement.plan is not None:
        rooms = [d.kv_room_bytes // d.kv_bytes_per_token for d in placement.plan.devices if d.kv_bytes_per_token]
        return max(min(rooms), context_length) if rooms else None
    if any(d.type == "cuda" for d in placement.device_map.values()):
        return context_length * max(batch_size, 1)
    return None


def _with_quantization(progress: ProgressCallback | None, loader: QuantizingLoader | None) -> ProgressCallback | None:
    """The loader's per-shard callback: quantize the linears that shard completed, then report."""
    if loader is None:
        return progress

    def after_shard(shard: Path, number: int, count: int) -> None:
        loader.quantize_loaded()
        if progress is not None:
            progress(shard, number, count)

    return after_shard


def _rebuild_rotary(model: NVLMModel, device: torch.device) -> None:
    """The rotary table is computed, not stored: build it on its device after the meta init."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    lm = model.language_model
    lm.model.rotary_emb = Qwen2RotaryEmbedding(config=lm.config).to(device)
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    assert not leftovers, f"tensors left on meta after loading: {leftovers[:5]}"
