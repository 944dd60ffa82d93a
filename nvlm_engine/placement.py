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

`split="card"` replaces rules 2-4 by the model card's own `split_model()` (`placement_card`): the
same pinned modules, GPU 0 counted as half a GPU, every share rounded up, GPUs of any size
treated alike; the plan is still checked to fit, and GPUs only (no CPU offload).

This module is the planner. What the model takes in memory is counted in `placement_sizes`,
the plan's data types are in `placement_plan`, and the error for a plan that cannot fit, with
its suggestions, is worded in `placement_failure`; their public names are importable from here.
The tensor-parallel plan (every layer split over equal GPUs) is `placement_tensor.plan_tensor_parallel`,
which reuses these sizes, reserves and input checks.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from .placement_card import card_layer_owners
from .placement_failure import plan_error
from .placement_plan import DevicePlan, DeviceSpec, Plan, PlanError
from .placement_sizes import (
    DEFAULT_OVERHEAD_BYTES,
    FIRST_DEVICE_MODULES,
    GIB,
    LAYERS,
    VISION_CHUNK_TILES,
    Footprint,
    activation_reserve,
    estimate_activation_bytes,
    format_gib,
    layer_unit,
    max_tokens_that_fit,
    unit_of,
)
from .quantization import QuantizationError

# The public names of the placement modules, importable from here as they always were.
__all__ = [
    "DEFAULT_OVERHEAD_BYTES",
    "FIRST_DEVICE_MODULES",
    "GIB",
    "LAYERS",
    "VISION_CHUNK_TILES",
    "DevicePlan",
    "DeviceSpec",
    "Footprint",
    "Plan",
    "PlanError",
    "check_plan_inputs",
    "estimate_activation_bytes",
    "format_gib",
    "layer_unit",
    "plan_placement",
    "unit_of",
]


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
    split: str = "balanced",
    vision_replicas: bool = False,
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
        split: "balanced" (rules 2-4) or "card" (the model card's `split_model()`, GPUs only;
            `first_device_share` does not apply).
        vision_replicas: reserve room for a copy of the vision tower and projector on every
            GPU that holds layers, so the tiles of a batch are encoded on all of them
            (`Plan.vision_devices`); each copy costs its weights and the vision activations.

    Raises:
        PlanError: it does not fit (with shortfall and suggestions), or the inputs are invalid.
        QuantizationError: an FP8 plan on a GPU known to be older than compute capability 8.9.
    """
    check_plan_inputs(footprint, devices, context_length, batch_size, first_device_share)
    sizing = _Sizing(footprint, context_length, batch_size, overhead_bytes, activation_bytes, vision_replicas)
    room = _room(sizing, devices)  # 1. what each device can take
    if split == "card":
        return _card_plan(sizing, room)
    if split != "balanced":
        raise PlanError(f"split={split!r} is not a split; use 'balanced' (the planner's) or 'card' (the model card's).")
    counts = _split_layers(room, footprint.num_layers, first_device_share)  # 2. how many layers each
    if counts is None:
        raise _failure(sizing, room, first_device_share, suggest)
    layers = _order_layers(counts, footprint.num_layers)  # 3. which layers each
    plans = _device_plans(sizing, room, layers)  # 4. totals per device
    return Plan(devices=plans, assignments=_assignments(room, layers), footprint=footprint,
                context_length=context_length, batch_size=batch_size, first_device_share=first_device_share,
                warnings=_offload_warnings(plans), vision_devices=_vision_devices(sizing, plans))


@dataclass(frozen=True)
class _Sizing:
    """What one planning call reserves besides weights: KV cache, activations, fixed overhead."""

    footprint: Footprint
    context_length: int
    batch_size: int
    overhead_bytes: int
    activation_bytes: int | None  # None: estimated per device
    vision_replicas: bool = False  # every GPU holds a copy of the vision tower and projector

    def runs_vision(self, position: int, device: DeviceSpec) -> bool:
        """Whether the device at `position` holds a vision tower (the first, or a GPU with a copy)."""
        return position == 0 or (self.vision_replicas and not device.is_cpu)

    def replica_bytes(self, position: int, device: DeviceSpec) -> int:
        """Weights of the vision copy on a device other than the first (0 without one)."""
        if position == 0 or not self.runs_vision(position, device):
            return 0
        return self.footprint.unit_bytes["vision_model"] + self.footprint.unit_bytes["mlp1"]

    def activation(self, first: bool) -> int:
        """Working memory reserved on a device; `first`: it also runs the vision tower."""
        return activation_reserve(self.footprint, context_length=self.context_length, batch_size=self.batch_size,
                                  activation_bytes=self.activation_bytes, vision=first)

    @property
    def layer_cost(self) -> int:
        """What one more decoder layer takes on a device: the largest layer and its KV cache."""
        fp = self.footprint
        kv = fp.kv_bytes_per_token_per_layer * self.context_length * self.batch_size
        return max(fp.unit_bytes[layer_unit(i)] for i in range(fp.num_layers)) + kv


@dataclass(frozen=True)
class _Room:
    """The devices that may take layers, first device first, then any CPU offload targets.

    Attributes:
        devices: the GPUs (or the first CPU when no GPU is listed), then the CPUs behind GPUs.
        offloads: how many of `devices`, at the end, are CPU offload targets.
        fixed: per device, the reserves before any layer (overhead, activations, and the pinned
            modules on the first device).
        caps: per device, how many whole decoder layers fit beside them.
    """

    devices: tuple[DeviceSpec, ...]
    offloads: int
    fixed: tuple[int, ...]
    caps: tuple[int, ...]


def _room(sizing: _Sizing, devices: Sequence[DeviceSpec]) -> _Room:
    """Step 1: fixed reserves first, then as many whole layers as fit (rules 1, 4, 5)."""
    gpus = [d for d in devices if not d.is_cpu]
    primary = gpus or [d for d in devices if d.is_cpu][:1]
    offload = [d for d in devices if d.is_cpu] if gpus else []
    pinned = sum(sizing.footprint.unit_bytes[u] for u in FIRST_DEVICE_MODULES)
    fixed = [sizing.overhead_bytes + sizing.activation(sizing.runs_vision(i, d)) + (pinned if i == 0 else 0)
             + sizing.replica_bytes(i, d) for i, d in enumerate(primary)]
    fixed += [sizing.overhead_bytes + sizing.activation(False) for _ in offload]
    listed, layer_cost = [*primary, *offload], sizing.layer_cost
    caps = [max(0, (d.memory_bytes - f) // layer_cost) for d, f in zip(listed, fixed)]
    return _Room(devices=tuple(listed), offloads=len(offload), fixed=tuple(fixed), caps=tuple(caps))


def _split_layers(room: _Room, n: int, first_device_share: float) -> list[int] | None:
    """Step 2: layers per device in `room` order, or None when they do not fit (rules 3-5).

    The primary devices (the GPUs, or the CPU when it is all there is) share the layers by memory,
    the first counted as `first_device_share`, each at most its capacity; offload CPUs take what
    the GPUs cannot, in order. The first device always keeps the last layer.
    """
    split = len(room.devices) - room.offloads
    primary, caps, offload_caps = room.devices[:split], list(room.caps[:split]), room.caps[split:]
    if caps[0] < 1:
        return None
    weights = [float(d.memory_bytes) for d in primary]
    weights[0] *= first_device_share
    counts = _apportion(n, weights, caps) if sum(caps) >= n else caps
    offload_counts: list[int] = []
    rest = n - sum(counts)
    for cap in offload_caps:
        offload_counts.append(min(cap, rest))
        rest -= offload_counts[-1]
    if rest > 0:
        return None
    if counts[0] == 0:  # a zero share still keeps the pinned last layer
        counts[counts.index(max(counts))] -= 1
        counts[0] = 1
    return [*counts, *offload_counts]


def _card_plan(sizing: _Sizing, room: _Room) -> Plan:
    """The model card's `split_model()` on these GPUs, checked to fit (see `placement_card`)."""
    if room.offloads or room.devices[0].is_cpu:
        raise PlanError("The model card's split places layers on GPUs only; drop the CPU devices (CPU offload), "
                        "or use the balanced split, which can offload.")
    n = sizing.footprint.num_layers
    owners = card_layer_owners(n, len(room.devices))
    layers = [tuple(i for i in range(n) if owners[i] == gpu) for gpu in range(len(room.devices))]
    over = [(d, len(ls), cap) for d, ls, cap in zip(room.devices, layers, room.caps) if len(ls) > cap]
    if over:
        device, count, cap = over[0]
        pinned = " beside the vision tower, embeddings and LM head" if device is room.devices[0] else ""
        raise PlanError(
            f"The model card's split puts {count} decoder layers on {device.name}, which has room for {cap}{pinned} "
            f"with a {sizing.context_length:,}-token context x batch {sizing.batch_size}. Use the balanced split "
            "(it weighs GPUs by memory), a shorter context, or a quantized format."
        )
    plans = _device_plans(sizing, room, layers)
    return Plan(devices=plans, assignments=_assignments(room, layers), footprint=sizing.footprint,
                context_length=sizing.context_length, batch_size=sizing.batch_size, first_device_share=0.5,
                split="card", vision_devices=_vision_devices(sizing, plans))


def _order_layers(counts: Sequence[int], n: int) -> list[tuple[int, ...]]:
    """Step 3: the layer indices of each device (rule 2).

    The first device's come first, then each next device's; the last layer goes back to the
    first device (SPEC section 8).
    """
    per_device: list[list[int]] = [[] for _ in counts]
    next_layer = 0
    for position, count in enumerate(counts):
        take = count - 1 if position == 0 else count
        per_device[position].extend(range(next_layer, next_layer + take))
        next_layer += take
    per_device[0].append(n - 1)
    assert next_layer == n - 1, (next_layer, n)
    return [tuple(indices) for indices in per_device]


def _assignments(room: _Room, layers: Sequence[tuple[int, ...]]) -> dict[str, str]:
    """Placement unit -> device name: the pinned modules on the first device, each layer on its own."""
    assignments = {unit: room.devices[0].name for unit in FIRST_DEVICE_MODULES}
    for device, indices in zip(room.devices, layers):
        assignments.update({layer_unit(i): device.name for i in indices})
    return assignments


def _device_plans(sizing: _Sizing, room: _Room, layers: Sequence[tuple[int, ...]]) -> tuple[DevicePlan, ...]:
    """Step 4: the totals of every device that holds something (the first one always does)."""
    fp = sizing.footprint
    tensors_by_unit = Counter(unit_of(tensor) for tensor in fp.shapes)
    plans = []
    for position, (device, indices) in enumerate(zip(room.devices, layers)):
        if not indices and position > 0:
            continue
        first = position == 0
        vision = sizing.runs_vision(position, device)
        modules = (*(FIRST_DEVICE_MODULES if first else ()), *(layer_unit(i) for i in indices))
        weight = sum(fp.unit_bytes[u] for u in modules) + sizing.replica_bytes(position, device)
        per_token = fp.kv_bytes_per_token_per_layer * len(indices)
        plans.append(DevicePlan(
            device=device, modules=modules, layers=indices, weight_bytes=weight,
            kv_bytes=per_token * sizing.context_length * sizing.batch_size, activation_bytes=sizing.activation(vision),
            overhead_bytes=sizing.overhead_bytes, kv_bytes_per_token=per_token,
            tensor_count=sum(tensors_by_unit.get(u, 0) for u in modules),
            max_tokens=max_tokens_that_fit(fp, device.memory_bytes, weight, per_token, sizing.overhead_bytes,
                                           sizing.activation_bytes, sizing.batch_size, first=vision),
        ))
        assert plans[-1].used_bytes <= device.memory_bytes, plans[-1]
    return tuple(plans)


def _vision_devices(sizing: _Sizing, plans: Sequence[DevicePlan]) -> tuple[str, ...]:
    """The devices that hold a vision tower when copies were asked for (none asked: empty)."""
    if not sizing.vision_replicas:
        return ()
    return tuple(p.device.name for i, p in enumerate(plans) if sizing.runs_vision(i, p.device))


def _offload_warnings(plans: Sequence[DevicePlan]) -> tuple[str, ...]:
    """One warning per CPU holding layers behind GPUs (rule 5); none when the CPU is all there is."""
    if plans[0].device.is_cpu:
        return ()
    return tuple(
        f"{p.device.name} holds {len(p.layers)} decoder layers ({format_gib(p.weight_bytes)}): every token computes "
        "them on the CPU, typically 10-100x slower than on a GPU. Use more GPU memory or a quantized format to "
        "avoid it."
        for p in plans if p.device.is_cpu
    )


def _failure(sizing: _Sizing, room: _Room, first_device_share: float, suggest: bool) -> PlanError:
    """The `PlanError` for step 2's refusal; its suggestions are plans tried with the other settings as asked."""

    def fits(footprint: Footprint, devices: Sequence[DeviceSpec], context_length: int, batch_size: int) -> bool:
        try:
            plan_placement(footprint, devices, context_length=context_length, batch_size=batch_size,
                           first_device_share=first_device_share, overhead_bytes=sizing.overhead_bytes,
                           activation_bytes=sizing.activation_bytes, suggest=False)
        except (PlanError, QuantizationError):
            return False
        return True

    return plan_error(sizing.footprint, room.devices, fixed=room.fixed, caps=room.caps, layer_cost=sizing.layer_cost,
                      context_length=sizing.context_length, batch_size=sizing.batch_size,
                      fits=fits if suggest else None)


def check_plan_inputs(footprint: Footprint, devices: Sequence[DeviceSpec], context_length: int, batch_size: int,
                      share: float = 0.5) -> None:
    """Refuse inputs no plan can use: no or repeated devices, a CPU listed first, a context or batch out of
    range, a share outside 0..1, or a quantization a listed GPU cannot run.

    Raises:
        PlanError: the inputs are invalid. QuantizationError: FP8 on a GPU older than compute capability 8.9.
    """
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
        raise PlanError(f"context_length {context_length} is beyond what NVLM-D supports "
                        f"({limit} tokens with dynamic RoPE).")
    if not 0 <= share <= 1:
        raise PlanError(f"first_device_share must be within 0..1 (0.5 counts the first GPU as half), got {share}.")
    scheme = footprint.quantization
    if scheme is not None:
        old = [(d, d.capability) for d in devices if d.capability is not None and d.capability < scheme.min_capability]
        if old:
            (device, (major, minor)), need = old[0], ".".join(map(str, scheme.min_capability))
            raise QuantizationError(
                f"quantization={scheme.name!r} needs CUDA compute capability {need}+, and {device.name} "
                f"({device.label or 'this GPU'}) has {major}.{minor}; use 'bnb-8bit' or 'bnb-4bit' there."
            )


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
