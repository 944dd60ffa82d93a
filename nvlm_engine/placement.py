"""Multi-device placement of NVLM-D, planned before a single weight is read.

`plan_placement()` is a pure function. Its inputs: the bytes every tensor takes once loaded (a
`Footprint`: the checkpoint's tensor list with shapes, sized in the compute dtype or quantized),
the devices with the memory the model may use on each, and the context length and batch size
to hold a KV cache for. It returns a `Plan`: the device of every module, and per device the
bytes of weights, KV cache, activation reserve and fixed overhead. `Plan.device_map()` is what
the loader applies. Nothing here touches a GPU, so `nvlm-engine plan` answers for hardware you
do not have.

Rules (the model card's `split_model`, SPEC section 8, generalized):
1. The first device holds the vision tower, projector, token embeddings, final norm, LM head,
   rotary table and the *last* decoder layer: image features meet the embeddings without a
   copy, and the logits, the sampled token and its next embedding stay on one device.
2. Decoder layers are never split. They go out in order: the first device takes layers 0..k,
   the next device the layers after, and so on, so hidden states cross each boundary once.
3. Each device's share of layers is proportional to its memory, the first device counted as
   half (`first_device_share`) because it also holds the 12 GB vision tower. Shares are rounded
   by largest remainder, so each device is within one layer of its ideal share.
4. A device never gets more layers than fit: weights + the KV cache of its layers for
   `context_length x batch_size` tokens + activation reserve + fixed overhead <= its memory.
   What a full device cannot take goes to the others in proportion to their shares.
5. CPU devices are offload targets: they get layers only when listed, and only the layers the
   GPUs cannot hold (a warning says how slow that is).
6. A plan that cannot fit raises `PlanError` with the shortfall and what would fit.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .config import NVLMConfig
from .errors import CheckpointTensorError, NVLMError
from .quantization import QuantizationScheme, get_scheme, is_quantized_weight

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


class PlanError(NVLMError):
    """The model does not fit on the given devices as asked.

    Attributes:
        shortfall_bytes: how much more memory the plan needs.
        required_bytes: everything the plan needs (weights, KV cache, reserves), all devices.
        available_bytes: the memory of the devices, all together.
        suggestions: settings that would fit, in words ("quantization='bnb-8bit'", ...).
    """

    def __init__(self, message: str, *, shortfall_bytes: int = 0, required_bytes: int = 0,
                 available_bytes: int = 0, suggestions: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.shortfall_bytes = shortfall_bytes
        self.required_bytes = required_bytes
        self.available_bytes = available_bytes
        self.suggestions = list(suggestions)


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


# --- sizes -------------------------------------------------------------------------------


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
        width = self.dtype.itemsize
        sizes: dict[str, int] = {}
        units: dict[str, int] = {u: 0 for u in self.units}
        for name, shape in self.shapes.items():
            numel = math.prod(shape)
            stored = self.stored_dtypes.get(name)
            if self.quantization is not None and is_quantized_weight(name):
                sizes[name] = self.quantization.linear_bytes(shape[0], shape[1])
            elif stored in _INTEGER_DTYPES:
                sizes[name] = numel * _INTEGER_DTYPES[stored]
            else:
                sizes[name] = numel * width
            unit = unit_of(name)
            if unit not in units:
                raise CheckpointTensorError(
                    f"Tensor {name!r} belongs to no NVLM-D module; the checkpoint does not match its config.json.",
                    unexpected=[name],
                )
            units[unit] += sizes[name]
        object.__setattr__(self, "tensor_bytes", sizes)
        object.__setattr__(self, "unit_bytes", units)

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

    def resized(self, *, dtype: torch.dtype | None = None, quantization: str | QuantizationScheme | None = "keep") -> Footprint:
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


# --- the plan ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceSpec:
    """A device and the memory the model may use on it.

    Attributes:
        name: a torch device string: "cuda:0", "cpu".
        memory_bytes: what the plan may fill (free memory, or the user's max_memory).
        label: a model name for tables ("H200", "A100-80GB"); optional.
    """

    name: str
    memory_bytes: int
    label: str = ""

    def __post_init__(self) -> None:
        try:
            device = torch.device(self.name)
        except (RuntimeError, TypeError) as e:
            raise PlanError(f"{self.name!r} is not a device name; use 'cuda:N' or 'cpu'.") from e
        if device.type not in ("cuda", "cpu"):
            raise PlanError(f"device {self.name!r}: only CUDA GPUs and the CPU can hold NVLM-D.")
        if self.memory_bytes <= 0:
            raise PlanError(f"device {self.name!r} has no memory to give ({self.memory_bytes} bytes).")

    @property
    def is_cpu(self) -> bool:
        return torch.device(self.name).type == "cpu"


@dataclass(frozen=True)
class DevicePlan:
    """One device's share of a plan.

    Attributes:
        device: the device and its memory.
        modules: the placement units it holds, in forward order.
        layers: the decoder layer indices among them.
        weight_bytes: its weights, once loaded.
        kv_bytes: KV cache reserved for its layers at the planned context x batch.
        activation_bytes: working memory reserved for a forward pass.
        overhead_bytes: fixed reserve (CUDA context, workspaces, fragmentation).
        kv_bytes_per_token: KV cache one token of one sequence takes on this device.
        tensor_count: checkpoint tensors it holds.
        max_tokens: the longest context (tokens per sequence, at the planned batch size) whose
            KV cache and activations fit next to its weights; None without decoder layers.
    """

    device: DeviceSpec
    modules: tuple[str, ...]
    layers: tuple[int, ...]
    weight_bytes: int
    kv_bytes: int
    activation_bytes: int
    overhead_bytes: int
    kv_bytes_per_token: int
    tensor_count: int
    max_tokens: int | None

    @property
    def used_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.activation_bytes + self.overhead_bytes

    @property
    def kv_room_bytes(self) -> int:
        """Memory left for the KV cache once weights, activations and overhead are counted."""
        return self.device.memory_bytes - self.weight_bytes - self.activation_bytes - self.overhead_bytes


@dataclass(frozen=True)
class Plan:
    """Where every module goes, and what each device then holds.

    Attributes:
        devices: one entry per device used, first device first.
        assignments: placement unit (module prefix) -> device name.
        footprint: the sizes the plan was made from.
        context_length, batch_size: what the KV cache and activation reserves are sized for.
        first_device_share: the first device's weight in the layer split (0.5: half a GPU).
        warnings: things the user should know (CPU offload is slow).
    """

    devices: tuple[DevicePlan, ...]
    assignments: Mapping[str, str]
    footprint: Footprint
    context_length: int
    batch_size: int
    first_device_share: float
    warnings: tuple[str, ...] = ()

    def device_map(self) -> dict[str, torch.device]:
        """{module prefix: device} for the loader; "" (anything else) is the first device."""
        mapping = {"": torch.device(self.devices[0].device.name)}
        mapping.update({unit: torch.device(name) for unit, name in self.assignments.items()})
        return mapping

    @property
    def max_context_tokens(self) -> int | None:
        """The longest context (per sequence, at the planned batch size) every device can hold."""
        limits = [d.max_tokens for d in self.devices if d.max_tokens is not None]
        return min(limits) if limits else None


def plan_placement(
    footprint: Footprint,
    devices: Sequence[DeviceSpec],
    *,
    context_length: int,
    batch_size: int = 1,
    first_device_share: float = 0.5,
    overhead_bytes: int = DEFAULT_OVERHEAD_BYTES,
    activation_bytes: int | None = None,
    suggest: bool = True,
) -> Plan:
    """Place every module of NVLM-D on `devices` (see the module docstring for the rules).

    Args:
        footprint: tensor sizes in the compute dtype / quantization.
        devices: GPUs in the order layers should follow (the first holds the vision tower), and
            optionally CPU devices to offload layers to when the GPUs are full.
        context_length: tokens per sequence (prompt + answer) to reserve KV cache for.
        batch_size: sequences decoded together.
        first_device_share: the first device's weight in the layer split relative to its memory.
        overhead_bytes: fixed reserve per device.
        activation_bytes: working memory to reserve per device; None estimates it
            (`estimate_activation_bytes`) for prefilling `context_length x batch_size` tokens.
        suggest: on failure, try other settings and list those that fit (set False internally).

    Raises:
        PlanError: it does not fit (with shortfall and suggestions), or the inputs are invalid.
    """
    _check_inputs(footprint, devices, context_length, batch_size, first_device_share)
    gpus = [d for d in devices if not d.is_cpu]
    primary = gpus or [d for d in devices if d.is_cpu][:1]
    offload = [d for d in devices if d.is_cpu] if gpus else []
    n = footprint.num_layers
    kv_layer = footprint.kv_bytes_per_token_per_layer * context_length * batch_size
    layer_cost = max(footprint.unit_bytes[layer_unit(i)] for i in range(n)) + kv_layer
    pinned = sum(footprint.unit_bytes[u] for u in FIRST_DEVICE_MODULES)

    def activation(first: bool) -> int:
        if activation_bytes is not None:
            return activation_bytes
        return estimate_activation_bytes(footprint.config, tokens=context_length, batch_size=batch_size,
                                         dtype=footprint.dtype, vision=first)

    # 1. What each device can take: fixed reserves first, then whole layers.
    fixed = [overhead_bytes + activation(i == 0) + (pinned if i == 0 else 0) for i in range(len(primary))]
    caps = [max(0, (d.memory_bytes - f) // layer_cost) for d, f in zip(primary, fixed)]
    offload_fixed = [overhead_bytes + activation(False) for _ in offload]
    offload_caps = [max(0, (d.memory_bytes - f) // layer_cost) for d, f in zip(offload, offload_fixed)]

    # 2. Split the layers: by memory with the first device counted as `first_device_share`,
    #    never above a device's capacity; the first device always keeps the last layer.
    def fail() -> PlanError:
        return _plan_error(footprint, [*primary, *offload], fixed=fixed + offload_fixed, caps=caps + offload_caps,
                           layer_cost=layer_cost, context_length=context_length, batch_size=batch_size,
                           suggest=suggest, settings=dict(first_device_share=first_device_share,
                                                          overhead_bytes=overhead_bytes, activation_bytes=activation_bytes))

    if caps[0] < 1:
        raise fail()
    weights = [float(d.memory_bytes) for d in primary]
    weights[0] *= first_device_share
    counts = _apportion(n, weights, caps) if sum(caps) >= n else list(caps)
    offload_counts = [0] * len(offload)
    rest = n - sum(counts)
    for i, cap in enumerate(offload_caps):
        offload_counts[i] = min(cap, rest)
        rest -= offload_counts[i]
    if rest > 0:
        raise fail()
    if counts[0] == 0:  # a zero share still keeps the pinned last layer
        counts[counts.index(max(counts))] -= 1
        counts[0] = 1

    # 3. Layers in order: the first device's come first, then each next device's; the last
    #    layer goes back to the first device (SPEC section 8).
    order = [*zip(primary, counts, fixed), *zip(offload, offload_counts, offload_fixed)]
    assignments: dict[str, str] = {unit: primary[0].name for unit in FIRST_DEVICE_MODULES}
    per_device: dict[str, list[int]] = {d.name: [] for d, _, _ in order}
    next_layer = 0
    for position, (device, count, _) in enumerate(order):
        take = count - 1 if position == 0 else count
        per_device[device.name].extend(range(next_layer, next_layer + take))
        next_layer += take
    per_device[primary[0].name].append(n - 1)
    assert next_layer == n - 1, (next_layer, n)
    for name, indices in per_device.items():
        for i in indices:
            assignments[layer_unit(i)] = name

    # 4. Totals per device.
    tensors_by_unit = Counter(unit_of(tensor) for tensor in footprint.shapes)
    plans = []
    for position, (device, count, _) in enumerate(order):
        if count == 0 and position > 0:
            continue
        layers = tuple(per_device[device.name])
        modules = (*(FIRST_DEVICE_MODULES if position == 0 else ()), *(layer_unit(i) for i in layers))
        weight = sum(footprint.unit_bytes[u] for u in modules)
        act = activation(position == 0)
        per_token = footprint.kv_bytes_per_token_per_layer * len(layers)
        plans.append(DevicePlan(
            device=device, modules=modules, layers=layers, weight_bytes=weight, kv_bytes=per_token * context_length * batch_size,
            activation_bytes=act, overhead_bytes=overhead_bytes, kv_bytes_per_token=per_token,
            tensor_count=sum(tensors_by_unit.get(u, 0) for u in modules),
            max_tokens=_max_tokens(footprint, device, weight, per_token, overhead_bytes, activation_bytes,
                                   batch_size, first=position == 0),
        ))
        assert plans[-1].used_bytes <= device.memory_bytes, plans[-1]
    warnings = tuple(
        f"{p.device.name} holds {len(p.layers)} decoder layers ({format_gib(p.weight_bytes)}): every token computes them on "
        "the CPU, typically 10-100x slower than on a GPU. Use more GPU memory or a quantized format to avoid it."
        for p in plans if p.device.is_cpu and gpus
    )
    return Plan(devices=tuple(plans), assignments=assignments, footprint=footprint, context_length=context_length,
                batch_size=batch_size, first_device_share=first_device_share, warnings=warnings)


def _check_inputs(footprint: Footprint, devices: Sequence[DeviceSpec], context_length: int, batch_size: int,
                  share: float) -> None:
    if not devices:
        raise PlanError("No devices to place the model on; give at least one GPU (or the CPU).")
    names = [d.name for d in devices]
    if len(set(names)) != len(names):
        raise PlanError(f"Devices listed twice: {names}; list each device once.")
    if devices[0].is_cpu and any(not d.is_cpu for d in devices):
        raise PlanError("List the GPUs first: the first device holds the vision tower and the LM head, and CPU "
                        "devices only take the decoder layers the GPUs cannot hold.")
    if context_length < 1 or batch_size < 1:
        raise PlanError(f"context_length ({context_length}) and batch_size ({batch_size}) must be >= 1.")
    limit = footprint.config.llm.max_context_length()
    if context_length > limit:
        raise PlanError(f"context_length {context_length} is beyond what NVLM-D supports ({limit} tokens with dynamic RoPE).")
    if not 0 <= share <= 1:
        raise PlanError(f"first_device_share must be within 0..1 (0.5 counts the first GPU as half), got {share}.")


def _apportion(total: int, weights: Sequence[float], caps: Sequence[int]) -> list[int]:
    """Split `total` items in proportion to `weights`, each share at most its cap (sum(caps) >= total).

    Shares that would exceed their cap are fixed at the cap and the rest is split again among
    the others; the final shares are rounded by largest remainder (ties to the earlier device).
    """
    counts = [0] * len(weights)
    free = [i for i in range(len(weights)) if caps[i] > 0]
    remaining = total
    while remaining > 0 and free:
        weight = sum(weights[i] for i in free)
        ideal = {i: remaining * weights[i] / weight if weight > 0 else remaining / len(free) for i in free}
        full = [i for i in free if ideal[i] >= caps[i]]
        if full:
            for i in full:
                counts[i] = caps[i]
                remaining -= caps[i]
            free = [i for i in free if i not in full]
            continue
        base = {i: math.floor(ideal[i]) for i in free}
        for i in free:
            counts[i] = base[i]
        left = remaining - sum(base.values())
        for i in sorted(free, key=lambda i: (-(ideal[i] - base[i]), i))[:left]:
            counts[i] += 1
        remaining = 0
    assert remaining == 0, "sum(caps) must cover total"
    return counts


def _max_tokens(footprint: Footprint, device: DeviceSpec, weight: int, kv_per_token: int, overhead: int,
                activation_bytes: int | None, batch_size: int, *, first: bool) -> int | None:
    """Largest context whose KV cache (and, when estimated, prefill activations) fit on `device`."""
    if kv_per_token == 0:
        return None

    def fits(tokens: int) -> bool:
        act = activation_bytes if activation_bytes is not None else estimate_activation_bytes(
            footprint.config, tokens=tokens, batch_size=batch_size, dtype=footprint.dtype, vision=first)
        return weight + overhead + act + kv_per_token * tokens * batch_size <= device.memory_bytes

    low, high = 0, 1 << 24
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


# --- when it does not fit ----------------------------------------------------------------


def _plan_error(footprint: Footprint, devices: Sequence[DeviceSpec], *, fixed: Sequence[int], caps: Sequence[int],
                layer_cost: int, context_length: int, batch_size: int, suggest: bool,
                settings: dict[str, object]) -> PlanError:
    n = footprint.num_layers
    available = sum(d.memory_bytes for d in devices)
    required = sum(fixed) + n * layer_cost
    if caps[0] < 1:
        shortfall = fixed[0] + layer_cost - devices[0].memory_bytes
        pinned = sum(footprint.unit_bytes[u] for u in FIRST_DEVICE_MODULES)
        what = (f"the first device ({devices[0].name}) cannot hold what is pinned to it (vision tower, projector, "
                f"embeddings, LM head: {format_gib(pinned)}) plus the last decoder layer and its reserves")
    else:
        unplaced = n - sum(caps)
        slack = max(0, max(d.memory_bytes - f - c * layer_cost for d, f, c in zip(devices, fixed, caps)))
        shortfall = max(required - available, unplaced * layer_cost - slack)
        what = f"{unplaced} decoder layer(s) ({format_gib(unplaced * layer_cost)} with their KV cache) have no room"
    form = footprint.quantization.name if footprint.quantization else str(footprint.dtype).removeprefix("torch.")
    listing = ", ".join(f"{d.name} {format_gib(d.memory_bytes)}" for d in devices)
    kv_total = footprint.kv_bytes_per_token * context_length * batch_size
    message = (
        f"NVLM-D does not fit on {len(devices)} device(s) ({listing}) as {form} with a {context_length:,}-token "
        f"context x batch {batch_size}: it needs about {format_gib(required)} ({format_gib(footprint.total_bytes)} of "
        f"weights, {format_gib(kv_total)} of KV cache, the rest activation and overhead reserves) and they offer "
        f"{format_gib(available)}; {what}, short by {format_gib(shortfall)}."
    )
    suggestions = _suggestions(footprint, devices, context_length, batch_size, settings) if suggest else []
    if suggestions:
        message += " What would fit: " + "; ".join(suggestions) + "."
    elif suggest:
        message += " Nothing close to these settings fits: use more or larger GPUs."
    return PlanError(message, shortfall_bytes=shortfall, required_bytes=required, available_bytes=available,
                     suggestions=suggestions)


def _fits(footprint: Footprint, devices: Sequence[DeviceSpec], context_length: int, batch_size: int,
          settings: dict[str, object]) -> bool:
    try:
        plan_placement(footprint, devices, context_length=context_length, batch_size=batch_size, suggest=False,
                       **settings)  # type: ignore[arg-type]
    except PlanError:
        return False
    return True


def _suggestions(footprint: Footprint, devices: Sequence[DeviceSpec], context_length: int, batch_size: int,
                 settings: dict[str, object]) -> list[str]:
    """Settings close to the asked ones that fit: more GPUs, smaller formats, a shorter context or batch."""
    found: list[str] = []
    gpus = [d for d in devices if not d.is_cpu]
    if gpus:
        model = max(gpus, key=lambda d: d.memory_bytes)
        for extra in range(1, 9):
            memories = [d.memory_bytes for d in gpus] + [model.memory_bytes] * extra
            more = [DeviceSpec(f"cuda:{i}", m) for i, m in enumerate(memories)]
            if _fits(footprint, more, context_length, batch_size, settings):
                label = model.label or format_gib(model.memory_bytes)
                found.append(f"{len(more)} GPUs ({extra} more of {label})")
                break
    if footprint.dtype.itemsize > 2 and _fits(footprint.resized(dtype=torch.bfloat16), devices, context_length,
                                              batch_size, settings):
        found.append("dtype='bfloat16'")
    current = footprint.quantization.linear_bytes(64, 64) if footprint.quantization else None
    for name in ("bnb-8bit", "fp8", "bnb-4bit"):
        scheme = get_scheme(name)
        assert scheme is not None
        if current is not None and scheme.linear_bytes(64, 64) >= current:
            continue
        smaller = footprint.resized(quantization=scheme)
        if _fits(smaller, devices, context_length, batch_size, settings):
            note = " (H100/H200/B200 only)" if name == "fp8" else ""
            found.append(f"quantization='{name}'{note}: {format_gib(smaller.total_bytes)} of weights")
    steps = (context_length - 1) // 1024  # the longest shorter context, in steps of 1024 tokens
    if steps >= 1 and _fits(footprint, devices, 1024, batch_size, settings):
        low, high = 1, steps
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if _fits(footprint, devices, mid * 1024, batch_size, settings) else (low, mid - 1)
        found.append(f"context_length <= {low * 1024:,}")
    if batch_size > 1 and _fits(footprint, devices, context_length, 1, settings):
        found.append("batch_size=1")
    return found
