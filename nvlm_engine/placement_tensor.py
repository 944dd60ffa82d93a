"""Tensor-parallel placement of NVLM-D, planned before a single weight is read, and whether to choose it.

`plan_tensor_parallel()` is the tensor-parallel counterpart of `placement.plan_placement()`: the
same inputs (a `Footprint`, the GPUs and what each may use, the context length and batch to hold
KV cache for) and the same reserves per device (fixed overhead, the prefill activation estimate,
the vision tower's on the device that runs it). It returns a `TensorParallelPlan`: per rank the
bytes of weights, KV cache and reserves (`DevicePlan`s), and how many tokens of KV cache each
rank has room for (`kv_tokens`), which is what a loader sizes each rank's cache from.

What each rank holds is the engine's sharding (`tensor_parallel.py`, `tp_executor.py`):
1. every rank: its 1/tp share of each decoder tensor split across ranks (q/k/v and gate/up by
   output rows, o/down by input columns; `tensor_parallel.shard_shape`) and a whole copy of each
   replicated one (the two RMSNorms of every layer); quantized linears as the scheme stores a
   shard of that shape (`Footprint.tensor_size`: every rank quantizes its own shards, so a
   row-parallel shard has its own row scales);
2. every rank: the vision tower (its 25 heads are not split) and the projector, whole: the tiles
   of a request are split across the ranks, so each runs the tower (and reserves its activations);
   rank 0 also: the embeddings, the final norm and the LM head, whole;
3. every rank: KV cache for its own KV heads, 1/tp of a token's KV cache, for the same tokens;
4. tp is the number of GPUs, one rank each, and must split the 64 query heads, the 8 KV heads
   and the MLP evenly (2, 4 or 8 for NVLM-D-72B); the GPUs must be alike, since every rank gets
   the same share and the smallest would bound them all (the layer split weighs GPUs instead).

`estimate_decode()` compares the two splits at batch 1, where decode reads every weight once per
token and is bound by memory bandwidth, and `choose_split()` says which to run and why.
Knows sizes, GPU bandwidths and the engine's rules; knows nothing of click or text layout
(`plan_report` words it) and loads nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import TensorParallelOptionsError
from .placement import PlanError, check_plan_inputs, plan_placement
from .placement_failure import suggest_settings
from .placement_plan import DevicePlan, DeviceSpec
from .placement_sizes import (
    DEFAULT_OVERHEAD_BYTES,
    FIRST_DEVICE_MODULES,
    LAYERS,
    Footprint,
    activation_reserve,
    format_gib,
    layer_unit,
    max_tokens_that_fit,
    unit_of,
)
from .quantization import QuantizationError
from .tensor_parallel import check_tp_size, shard_shape

__all__ = [
    "ALL_REDUCE_LATENCY_S",
    "GPU_BANDWIDTH",
    "NVLINK_GPUS",
    "VISION_MODULES",
    "DecodeEstimate",
    "SplitChoice",
    "TensorParallelPlan",
    "choose_split",
    "estimate_decode",
    "layer_share",
    "plan_tensor_parallel",
    "tensor_parallel_sizes",
]

# Small-message all-reduce latency over NVLink, per call. An assumption, not measured here: NCCL's
# own benchmark (github.com/NVIDIA/nccl-tests, `all_reduce_perf`) on NVLink/NVSwitch-connected
# A100/H100 nodes, as NVIDIA and others publish its output, reports roughly 10-20 us for messages
# of a few to tens of KiB; one token's hidden state at batch 1 is 8192 bf16 values = 16 KiB. We
# take the upper end to be conservative. Two per decoder layer (after o_proj and after down_proj).
ALL_REDUCE_LATENCY_S = 20e-6

# HBM bandwidth in bytes/s, from NVIDIA's datasheets (the SXM part where a GPU comes in two forms),
# for the GPU names `devices.GPU_PRESETS_MIB` knows (a test keeps the two tables' names equal).
GPU_BANDWIDTH: dict[str, float] = {
    "A100-40GB": 1.555e12, "A100": 2.039e12, "A100-80GB": 2.039e12, "H100": 3.35e12, "H100-80GB": 3.35e12,
    "H100-NVL": 3.9e12, "H100-94GB": 3.9e12, "H200": 4.8e12, "H20": 4.0e12, "B200": 8.0e12,
    "L40S": 0.864e12, "L40": 0.864e12, "A40": 0.696e12, "A6000": 0.768e12, "RTX6000ADA": 0.96e12,
    "L4": 0.3e12, "A10G": 0.6e12, "RTX4090": 1.008e12, "RTX3090": 0.936e12,
}

# GPUs that come joined by NVLink (SXM boards with NVSwitch; H100 NVL in bridged pairs). The others
# are PCIe cards: their all-reduce latency is not modelled, so tensor parallelism is not advised.
NVLINK_GPUS = frozenset({"A100-40GB", "A100", "A100-80GB", "H100", "H100-80GB", "H100-NVL", "H100-94GB", "H200",
                         "H20", "B200"})

# What every rank holds whole besides its layer share (rule 2): the tiles of a request are split across ranks.
VISION_MODULES = ("vision_model", "mlp1")

@dataclass(frozen=True)
class TensorParallelPlan:
    """What every rank of a tensor-parallel NVLM-D holds, rank 0 first.

    Attributes:
        tp: the number of ranks (one GPU each).
        ranks: per rank its `DevicePlan`: `layers` are all decoder layers (it holds a 1/tp shard of
            each), `kv_bytes_per_token` its share of one token's KV cache (its KV heads).
        footprint: the sizes the plan was made from.
        context_length, batch_size: what the KV cache and activation reserves are sized for.
        layer_share_bytes: one rank's share of the decoder layers (split tensors / tp + replicated).
        rank0_extra_bytes: what rank 0 holds besides: vision tower, projector, embeddings, final norm, LM head.
        vision_bytes: the vision tower and projector, which every other rank holds too (in
            `rank0_extra_bytes` for rank 0).
    """

    tp: int
    ranks: tuple[DevicePlan, ...]
    footprint: Footprint
    context_length: int
    batch_size: int
    layer_share_bytes: int
    rank0_extra_bytes: int
    vision_bytes: int = 0

    @property
    def kv_tokens(self) -> tuple[int, ...]:
        """Per rank, the tokens (all sequences together) its KV room holds; the engine can use the smallest."""
        return tuple(max(0, r.kv_room_bytes) // r.kv_bytes_per_token for r in self.ranks)

    @property
    def max_context_tokens(self) -> int | None:
        """The longest context (per sequence, at the planned batch size) every rank can hold."""
        limits = [r.max_tokens for r in self.ranks if r.max_tokens is not None]
        return min(limits) if limits else None


def tensor_parallel_sizes(footprint: Footprint) -> tuple[int, ...]:
    """The tensor-parallel sizes above 1 the engine can split this model into (2, 4, 8 for NVLM-D-72B)."""
    llm = footprint.config.llm
    sizes = []
    for tp in range(2, llm.num_key_value_heads + 1):
        try:
            check_tp_size(llm, tp)
        except TensorParallelOptionsError:
            continue
        sizes.append(tp)
    return tuple(sizes)


def layer_share(footprint: Footprint, tp: int) -> tuple[int, int]:
    """(bytes, tensor count) of one rank's share of all decoder layers: 1/tp of each split tensor, the rest whole."""
    total = count = 0
    for name, shape in footprint.shapes.items():
        if name.startswith(LAYERS + "."):
            total += footprint.tensor_size(name, shard_shape(name, tuple(shape), tp))
            count += 1
    return total, count


def plan_tensor_parallel(
    footprint: Footprint,
    devices: Sequence[DeviceSpec],
    *,
    context_length: int,
    batch_size: int = 1,
    tp: int | None = None,
    overhead_bytes: int = DEFAULT_OVERHEAD_BYTES,
    activation_bytes: int | None = None,
    suggest: bool = True,
) -> TensorParallelPlan:
    """Plan `tp` ranks of NVLM-D, one per GPU of `devices` (rank r on `devices[r]`); see the module docstring.

    Args:
        footprint: tensor sizes in the compute dtype / quantization.
        devices: the GPUs, alike, with the memory the model may use on each (free memory or max_memory).
        context_length: tokens per sequence (prompt + answer) to reserve KV cache for.
        batch_size: sequences decoded together.
        tp: the number of ranks; None: one per device. It must equal `len(devices)`.
        overhead_bytes: fixed reserve per GPU.
        activation_bytes: working memory to reserve per GPU; None estimates it as the layer split does.
        suggest: on failure, try other settings and list those that fit.

    Raises:
        TensorParallelOptionsError: `tp` is not a size the model splits into, differs from the GPU
            count, the GPUs differ, or a CPU is listed.
        PlanError: a rank does not fit (with its shortfall and what would fit), or invalid inputs.
        QuantizationError: an FP8 plan on a GPU known to be older than compute capability 8.9.
    """
    check_plan_inputs(footprint, devices, context_length, batch_size)
    tp = _check_devices(footprint, devices, tp)
    share, share_count = layer_share(footprint, tp)
    pinned = sum(footprint.unit_bytes[u] for u in FIRST_DEVICE_MODULES)
    pinned_count = sum(1 for name in footprint.shapes if unit_of(name) in FIRST_DEVICE_MODULES)
    vision = sum(footprint.unit_bytes[u] for u in VISION_MODULES)
    vision_count = sum(1 for name in footprint.shapes if unit_of(name) in VISION_MODULES)
    kv_per_token = footprint.kv_bytes_per_token // tp  # rank r holds KV heads r*8/tp.. of every layer
    layers = tuple(range(footprint.num_layers))
    ranks = []
    for rank, device in enumerate(devices):
        first = rank == 0
        weight = share + (pinned if first else vision)
        ranks.append(DevicePlan(
            device=device, modules=(*(FIRST_DEVICE_MODULES if first else VISION_MODULES), *map(layer_unit, layers)),
            layers=layers, weight_bytes=weight, kv_bytes=kv_per_token * context_length * batch_size,
            activation_bytes=activation_reserve(footprint, context_length=context_length, batch_size=batch_size,
                                                activation_bytes=activation_bytes, vision=True),
            overhead_bytes=overhead_bytes, kv_bytes_per_token=kv_per_token,
            tensor_count=share_count + (pinned_count if first else vision_count),
            max_tokens=max_tokens_that_fit(footprint, device.memory_bytes, weight, kv_per_token, overhead_bytes,
                                           activation_bytes, batch_size, first=True),  # every rank runs the tower
        ))
    plan = TensorParallelPlan(tp=tp, ranks=tuple(ranks), footprint=footprint, context_length=context_length,
                              batch_size=batch_size, layer_share_bytes=share, rank0_extra_bytes=pinned,
                              vision_bytes=vision)
    if any(r.used_bytes > r.device.memory_bytes for r in plan.ranks):
        raise _failure(plan, overhead_bytes, activation_bytes, suggest)
    return plan


def _check_devices(footprint: Footprint, devices: Sequence[DeviceSpec], tp: int | None) -> int:
    """The rank count: `tp` (or the GPU count) checked against the model's heads and the GPUs (rule 4)."""
    sizes = tensor_parallel_sizes(footprint)
    valid = ", ".join(map(str, sizes[:-1])) + f" or {sizes[-1]}" if len(sizes) > 1 else "".join(map(str, sizes))
    if any(d.is_cpu for d in devices):
        raise TensorParallelOptionsError(
            "Tensor-parallel plans are for GPUs only (CPU offload is the layer split's); drop the CPU device.")
    tp = len(devices) if tp is None else tp
    if tp not in sizes:
        llm = footprint.config.llm
        raise TensorParallelOptionsError(
            f"tensor_parallel={tp} does not split NVLM-D evenly: its {llm.num_attention_heads} query heads, "
            f"{llm.num_key_value_heads} KV heads and MLP width {llm.intermediate_size:,} must each divide by it. "
            + (f"Use {valid}, one GPU per rank, or the layer split (any number of GPUs)." if valid else
               "No size above 1 does: use the layer split."))
    if tp != len(devices):
        raise TensorParallelOptionsError(
            f"tensor_parallel={tp} needs {tp} GPUs, one per rank, and {len(devices)} are listed; list {tp} GPUs, "
            f"or use {valid} ranks with as many GPUs, or the layer split.")
    kinds = sorted({_kind(d) for d in devices})
    if len(kinds) > 1:
        raise TensorParallelOptionsError(
            f"The GPUs differ ({', '.join(kinds)}): tensor parallelism gives every rank the same share of every "
            "layer, so the smallest GPU bounds them all. Use the layer split, which weighs each GPU by its memory.")
    return tp


def _kind(device: DeviceSpec) -> str:
    return f"{device.label} {format_gib(device.memory_bytes)}" if device.label else format_gib(device.memory_bytes)


def _failure(plan: TensorParallelPlan, overhead_bytes: int, activation_bytes: int | None, suggest: bool) -> PlanError:
    """The `PlanError` of a plan a rank does not fit: which rank, by how much, and settings that fit."""
    fp = plan.footprint
    worst = max(plan.ranks, key=lambda r: r.used_bytes - r.device.memory_bytes)
    rank = plan.ranks.index(worst)
    shortfall = worst.used_bytes - worst.device.memory_bytes
    extra = (f" + {format_gib(plan.rank0_extra_bytes)} of vision tower, projector, embeddings and LM head"
             if rank == 0 else f" + {format_gib(plan.vision_bytes)} of vision tower and projector")
    form = fp.quantization.name if fp.quantization else str(fp.dtype).removeprefix("torch.")
    problem = (
        f"tensor_parallel={plan.tp} does not fit on {plan.tp} x {_kind(worst.device)} as {form} with a "
        f"{plan.context_length:,}-token context x batch {plan.batch_size}: rank {rank} ({worst.device.name}) needs "
        f"{format_gib(worst.used_bytes)} (weights {format_gib(worst.weight_bytes)}: 1/{plan.tp} of the decoder layers "
        f"{format_gib(plan.layer_share_bytes)}{extra}; KV cache {format_gib(worst.kv_bytes)}; reserves "
        f"{format_gib(worst.activation_bytes + worst.overhead_bytes)}) and has {format_gib(worst.device.memory_bytes)}, "
        f"short by {format_gib(shortfall)}."
    )
    texts: list[str] = []
    fixes: list[dict[str, object]] = []
    if suggest:
        devices = [r.device for r in plan.ranks]

        def fits(footprint: Footprint, gpus: Sequence[DeviceSpec], context_length: int, batch_size: int) -> bool:
            try:
                plan_tensor_parallel(footprint, gpus, context_length=context_length, batch_size=batch_size,
                                     overhead_bytes=overhead_bytes, activation_bytes=activation_bytes, suggest=False)
            except (PlanError, QuantizationError, TensorParallelOptionsError):
                return False
            return True

        for found in suggest_settings(fp, devices, plan.context_length, plan.batch_size, fits):
            texts.append(found.text)
            fixes.append({**found.fix, "tensor_parallel": found.fix["gpus"]} if "gpus" in found.fix else dict(found.fix))
        try:
            plan_placement(fp, devices, context_length=plan.context_length, batch_size=plan.batch_size,
                           overhead_bytes=overhead_bytes, activation_bytes=activation_bytes, suggest=False)
            texts.append("tensor_parallel=1: the layer split fits these GPUs")
            fixes.append({"tensor_parallel": 1})
        except (PlanError, QuantizationError):
            pass
    message = problem + (" What would fit: " + "; ".join(texts) + "." if texts else "")
    available = sum(r.device.memory_bytes for r in plan.ranks)
    return PlanError(message, shortfall_bytes=shortfall, required_bytes=sum(r.used_bytes for r in plan.ranks),
                     available_bytes=available, suggestions=texts, fixes=fixes, problem=problem)


@dataclass(frozen=True)
class DecodeEstimate:
    """Tokens per second of one sequence decoding at batch 1, bound by memory bandwidth.

    Per token the layer split reads every weight it uses once, one GPU at a time: the decoder layers,
    the LM head, the final norm and one embedding row, plus the KV cache of `cache_tokens` tokens, at
    one GPU's bandwidth. The tensor split reads 1/tp of the layers and of the KV cache on every GPU
    at once (rank 0 also the LM head: it is the slowest), plus 2 all-reduces per decoder layer at
    `ALL_REDUCE_LATENCY_S` each. Compute, kernel launches and the layer split's hidden-state hops
    between GPUs (a few microseconds, once per GPU boundary) are not counted: these are upper bounds.

    Attributes:
        gpu: the GPU name the bandwidth is for.
        bandwidth: bytes/s of its memory.
        tp: the ranks of the tensor split.
        cache_tokens: tokens already in the KV cache of the sequence.
        layer_tokens_per_s: the layer split's bound.
        tensor_tokens_per_s: the tensor split's bound; None when the GPUs are not joined by NVLink.
        all_reduce_s: the time of the all-reduces in one tensor-parallel token.
    """

    gpu: str
    bandwidth: float
    tp: int
    cache_tokens: int
    layer_tokens_per_s: float
    tensor_tokens_per_s: float | None
    all_reduce_s: float


def estimate_decode(footprint: Footprint, gpu: str, *, tp: int, cache_tokens: int) -> DecodeEstimate | None:
    """Both splits' decode bounds on `tp` GPUs named `gpu` (see `DecodeEstimate`); None for a GPU of unknown bandwidth."""
    bandwidth = GPU_BANDWIDTH.get(gpu)
    if bandwidth is None:
        return None
    units = footprint.unit_bytes
    vocab = footprint.shapes["language_model.model.embed_tokens.weight"][0]
    head = (units["language_model.lm_head"] + units["language_model.model.norm"]
            + units["language_model.model.embed_tokens"] // vocab)  # one embedding row per token
    layers = sum(units[layer_unit(i)] for i in range(footprint.num_layers))
    kv = footprint.kv_bytes_per_token * cache_tokens
    layer_s = (layers + head + kv) / bandwidth
    all_reduce_s = 2 * footprint.num_layers * ALL_REDUCE_LATENCY_S
    tensor = None
    if gpu in NVLINK_GPUS:
        tensor_s = (layer_share(footprint, tp)[0] + head + kv / tp) / bandwidth + all_reduce_s
        tensor = 1 / tensor_s
    return DecodeEstimate(gpu=gpu, bandwidth=bandwidth, tp=tp, cache_tokens=cache_tokens,
                          layer_tokens_per_s=1 / layer_s, tensor_tokens_per_s=tensor, all_reduce_s=all_reduce_s)


@dataclass(frozen=True)
class SplitChoice:
    """Which split to run on GPUs the layer split fits, and why.

    Attributes:
        tensor: True to run the tensor split (`tensor_parallel=tp`), False the layer split.
        tp: the tensor split's rank count (the number of GPUs).
        reason: why, in one sentence.
        plan: the tensor plan when it fits.
        estimate: both splits' decode bounds, when the GPUs' bandwidth is known.
    """

    tensor: bool
    tp: int
    reason: str
    plan: TensorParallelPlan | None = None
    estimate: DecodeEstimate | None = None


def choose_split(footprint: Footprint, gpus: Sequence[DeviceSpec], *, context_length: int, batch_size: int = 1,
                 overhead_bytes: int = DEFAULT_OVERHEAD_BYTES, activation_bytes: int | None = None) -> SplitChoice:
    """The tensor split when the GPUs are alike, it fits and it decodes faster; else the layer split.

    For GPUs the layer split fits (the caller plans that first); the speed is `estimate_decode` with
    the KV cache of a full `context_length` (the slowest token).
    """
    tp = len(gpus)
    try:
        plan = plan_tensor_parallel(footprint, gpus, context_length=context_length, batch_size=batch_size,
                                    overhead_bytes=overhead_bytes, activation_bytes=activation_bytes, suggest=False)
    except (TensorParallelOptionsError, PlanError, QuantizationError) as e:
        return SplitChoice(False, tp, str(e))  # it cannot be used here, or does not fit: says which and why
    label = gpus[0].label
    estimate = estimate_decode(footprint, label, tp=tp, cache_tokens=context_length)
    if estimate is None:
        return SplitChoice(False, tp, f"there is no speed estimate for {label or 'these'} GPUs (memory bandwidth "
                                      "unknown); the layer split is the default", plan, None)
    if estimate.tensor_tokens_per_s is None:
        return SplitChoice(False, tp, f"{label} GPUs are not known to be joined by NVLink, which the tensor "
                                      f"split's {2 * footprint.num_layers} all-reduces per token need", plan, estimate)
    if estimate.tensor_tokens_per_s > estimate.layer_tokens_per_s:
        return SplitChoice(True, tp, "the tensor split decodes faster", plan, estimate)
    return SplitChoice(False, tp, "the layer split decodes as fast or faster", plan, estimate)
