"""When a placement does not fit: the error that says by how much, and the settings that would fit.

`plan_error` words the shortfall (the pinned modules on the first device, or the decoder layers
no device has room for); `suggest_settings` searches nearby settings (more GPUs of the largest
kind listed, bf16 instead of fp32, a quantized format, a shorter context, batch size 1). It
tries them through a `FitsCheck` the planner hands in, so it never imports the planner. Each
suggestion is worded for Python users and also kept as data (`PlanError.fixes`) that command
lines turn into flags. FP8 is never suggested for GPUs known to predate compute capability 8.9.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .placement_plan import DeviceSpec, PlanError
from .placement_sizes import FIRST_DEVICE_MODULES, Footprint, format_gib
from .quantization import get_scheme

__all__ = ["FitsCheck", "Suggestion", "plan_error", "suggest_settings"]

FitsCheck = Callable[[Footprint, Sequence[DeviceSpec], int, int], bool]
"""(footprint, devices, context_length, batch_size) -> whether a plan fits, the other settings as asked."""


@dataclass(frozen=True)
class Suggestion:
    """One setting that would fit: in words, and as {argument: value} (see `PlanError.fixes`)."""

    text: str
    fix: Mapping[str, object]


def plan_error(footprint: Footprint, devices: Sequence[DeviceSpec], *, fixed: Sequence[int], caps: Sequence[int],
               layer_cost: int, context_length: int, batch_size: int, fits: FitsCheck | None) -> PlanError:
    """The `PlanError` for a placement that does not fit: what is short, by how much, and what would fit.

    Args:
        footprint: the sizes that were planned.
        devices: every device that may take layers, the first device first.
        fixed: per device, its reserves before any decoder layer (overhead, activations, and
            on the first device the pinned modules).
        caps: per device, how many whole decoder layers fit beside those reserves.
        layer_cost: what one decoder layer takes with its KV cache.
        context_length, batch_size: what was asked.
        fits: tries other settings for the suggestions; None lists none.
    """
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
    found = suggest_settings(footprint, devices, context_length, batch_size, fits) if fits else []
    problem = message
    if found:
        message += " What would fit: " + "; ".join(s.text for s in found) + "."
    elif fits is not None:
        message += " Nothing close to these settings fits: use more or larger GPUs."
    return PlanError(message, shortfall_bytes=shortfall, required_bytes=required, available_bytes=available,
                     suggestions=[s.text for s in found], fixes=[s.fix for s in found], problem=problem)


def suggest_settings(footprint: Footprint, devices: Sequence[DeviceSpec], context_length: int, batch_size: int,
                     fits: FitsCheck) -> list[Suggestion]:
    """Settings close to the asked ones that fit: more GPUs, smaller formats, a shorter context or batch.

    A format the GPUs cannot run is not suggested: FP8 only when no GPU is known to be older than
    compute capability 8.9 (with a note when their capability is unknown).
    """
    found: list[Suggestion] = []
    gpus = [d for d in devices if not d.is_cpu]
    if gpus:
        model = max(gpus, key=lambda d: d.memory_bytes)
        for extra in range(1, 9):
            memories = [d.memory_bytes for d in gpus] + [model.memory_bytes] * extra
            more = [DeviceSpec(f"cuda:{i}", m) for i, m in enumerate(memories)]
            if fits(footprint, more, context_length, batch_size):
                label = model.label or format_gib(model.memory_bytes)
                found.append(Suggestion(f"{len(more)} GPUs ({extra} more of {label})", {"gpus": len(more)}))
                break
    if footprint.dtype.itemsize > 2 and fits(footprint.resized(dtype=torch.bfloat16), devices, context_length,
                                              batch_size):
        found.append(Suggestion("dtype='bfloat16'", {"dtype": "bfloat16"}))
    current = footprint.quantization.linear_bytes(64, 64) if footprint.quantization else None
    capabilities = [d.capability for d in gpus]
    for name in ("bnb-8bit", "fp8", "bnb-4bit"):
        scheme = get_scheme(name)
        assert scheme is not None
        if current is not None and scheme.linear_bytes(64, 64) >= current:
            continue
        if any(c is not None and c < scheme.min_capability for c in capabilities):
            continue  # e.g. FP8 on an A100 (8.0): it cannot run there
        smaller = footprint.resized(quantization=scheme)
        if fits(smaller, devices, context_length, batch_size):
            unknown = name == "fp8" and (not capabilities or None in capabilities)
            note = " (CUDA compute capability 8.9+: L4, L40, H100, H200, B200; not A100)" if unknown else ""
            found.append(Suggestion(f"quantization='{name}'{note}: {format_gib(smaller.total_bytes)} of weights",
                                    {"quantization": name}))
    steps = (context_length - 1) // 1024  # the longest shorter context, in steps of 1024 tokens
    if steps >= 1 and fits(footprint, devices, 1024, batch_size):
        low, high = 1, steps
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if fits(footprint, devices, mid * 1024, batch_size) else (low, mid - 1)
        found.append(Suggestion(f"context_length <= {low * 1024:,}", {"context_length": low * 1024}))
    if batch_size > 1 and fits(footprint, devices, context_length, 1):
        found.append(Suggestion("batch_size=1", {"batch_size": 1}))
    return found
