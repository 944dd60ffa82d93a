"""Where each part of the model lives and in which dtype: decided here, once.

A device map is a dict from a module-name prefix (`"vision_model"`, `"language_model.model.layers.3"`)
to a `torch.device`; the longest matching prefix of a tensor's name wins (`device_for`) and `""`
matches everything. `resolve_placement()` turns what a user passes into such a map:

- `"cpu"`, `"cuda:1"`: everything on that device (a GPU is checked to hold the model first);
- `"auto"`: every visible GPU (or those in `max_memory`), placed by the planner (`placement.py`)
  from the memory each has free; the CPU when there is no GPU;
- `"card"`: the same GPUs, split exactly as the model card's `split_model()` (`placement_card.py`);
- a list of devices: the planner over those, in that order (a `"cpu"` entry is an explicit
  offload target for layers the GPUs cannot hold);
- an explicit `{prefix: device}` map (the model card's `split_model()` output works as is):
  checked, not re-planned: every module must be covered, and the vision tower, the projector
  and each decoder layer must each sit whole on one device.

The forward pass moves activations between devices itself (`NVLMModel.forward_llm`), so applying
a plan is nothing more than loading each tensor onto the device this map names: no hooks.
This module also reads GPU lists for the planner CLI: `"4x80GB"`, `"2xH200"`, `"80GB,80GB,40GB"`;
a named GPU also brings its compute capability (`GPU_CAPABILITY`: FP8 needs 8.9+).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import NVLMError
from .placement import GIB, DeviceSpec, Footprint, Plan, PlanError, format_gib, plan_placement, unit_of
from .quantization import QuantizationScheme

logger = logging.getLogger(__name__)

DeviceMapLike = str | torch.device | Sequence[str | torch.device] | Mapping[str, str | torch.device | int]
MaxMemory = Mapping[str | int, int | str]

# Memory of common GPUs as nvidia-smi reports it (MiB), so "2xH200" plans like the real card.
GPU_PRESETS_MIB = {
    "A100-40GB": 40960, "A100": 81920, "A100-80GB": 81920, "H100": 81559, "H100-80GB": 81559,
    "H100-NVL": 95830, "H100-94GB": 95830, "H200": 143771, "H20": 97871, "B200": 183359,
    "L40S": 46068, "L40": 46068, "A40": 46068, "A6000": 49140, "RTX6000ADA": 49140,
    "L4": 23034, "A10G": 23028, "RTX4090": 24564, "RTX3090": 24576,
}

# CUDA compute capability of the GPUs above (Ampere 8.0/8.6, Ada 8.9, Hopper 9.0, Blackwell 10.0).
GPU_CAPABILITY = {
    "A100-40GB": (8, 0), "A100": (8, 0), "A100-80GB": (8, 0), "H100": (9, 0), "H100-80GB": (9, 0),
    "H100-NVL": (9, 0), "H100-94GB": (9, 0), "H200": (9, 0), "H20": (9, 0), "B200": (10, 0),
    "L40S": (8, 9), "L40": (8, 9), "A40": (8, 6), "A6000": (8, 6), "RTX6000ADA": (8, 9),
    "L4": (8, 9), "A10G": (8, 6), "RTX4090": (8, 9), "RTX3090": (8, 6),
}


class DeviceMapError(NVLMError):
    """The device map or dtype cannot be used as given."""


@dataclass(frozen=True)
class Placement:
    """The outcome of `resolve_placement`: the map the loader applies, the compute dtype, the plan."""

    device_map: dict[str, torch.device]
    dtype: torch.dtype
    plan: Plan | None  # None when everything is on the CPU or the user gave an explicit map


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The compute dtype.

    None/"auto": bfloat16 on a GPU (the checkpoint's dtype, what the reference runs) and
    float32 on the CPU, where bfloat16 matmuls are slow and less accurate.
    """
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}
    try:
        return names[str(dtype).lower()]
    except KeyError as e:
        raise DeviceMapError(f"Unknown dtype {dtype!r}; use one of bfloat16, float16, float32 or 'auto'.") from e


def resolve_placement(
    device_map: DeviceMapLike | None,
    model: nn.Module,
    *,
    dtype: str | torch.dtype | None = None,
    max_memory: MaxMemory | None = None,
    context_length: int,
    batch_size: int = 1,
    quantization: QuantizationScheme | None = None,
    stored_dtypes: Mapping[str, str] | None = None,
    vision_replicas: bool = False,
) -> Placement:
    """Decide the device of every module of `model` (built on `meta`) and the compute dtype.

    `vision_replicas`: plan a copy of the vision tower on every GPU (see `plan_placement`).

    Raises:
        DeviceMapError: a device or map that cannot be used. PlanError: the model does not fit.
    """
    split = "card" if isinstance(device_map, str) and device_map == "card" else "balanced"
    if split == "card":
        device_map = "auto"
        if not local_gpus(max_memory):
            raise DeviceMapError("device_map='card' splits the model over the GPUs as the model card's split_model() "
                                 "does, and no GPU is visible here (or listed in max_memory); use 'cpu' or 'auto'.")
    if isinstance(device_map, Mapping):
        mapping = validate_device_map(device_map, _units(model))
        compute_dtype = resolve_dtype(dtype, mapping[""])
        footprint = Footprint.from_model(model, dtype=compute_dtype, quantization=quantization,
                                         stored_dtypes=dict(stored_dtypes or {}))
        _check_weights_fit(footprint, mapping)
        return Placement(mapping, compute_dtype, None)
    specs = _device_specs(device_map, max_memory)
    compute_dtype = resolve_dtype(dtype, torch.device(specs[0].name) if specs else torch.device("cpu"))
    if not specs:  # the CPU alone: its memory is the operating system's business
        return Placement({"": torch.device("cpu")}, compute_dtype, None)
    footprint = Footprint.from_model(model, dtype=compute_dtype, quantization=quantization,
                                     stored_dtypes=dict(stored_dtypes or {}))
    plan = plan_placement(footprint, specs, context_length=context_length, batch_size=batch_size, split=split,
                          vision_replicas=vision_replicas)
    for warning in plan.warnings:
        logger.warning(warning)
    logger.info("placement: %s", "; ".join(
        f"{d.device.name}: {len(d.layers)} layers, {format_gib(d.weight_bytes)} weights" for d in plan.devices))
    return Placement(plan.device_map(), compute_dtype, plan)


def validate_device_map(mapping: Mapping[str, str | torch.device | int], units: Sequence[str]) -> dict[str, torch.device]:
    """Check an explicit {prefix: device} map against the model's placement units.

    Prefixes that name nothing in NVLM-D (the card's map has InternLM names such as
    `language_model.output`) are ignored with a log line. Every unit must be covered (or a
    `""` default given), and no unit may be split between devices. Integer devices are GPUs.
    """
    kept: dict[str, torch.device] = {}
    for prefix, value in mapping.items():
        prefix = str(prefix)
        known = prefix == "" or any(u == prefix or u.startswith(prefix + ".") or prefix.startswith(u + ".") for u in units)
        if known:
            kept[prefix] = _device(value)
        else:
            logger.info("device_map entry %r names no NVLM-D module; ignored", prefix)
    uncovered = [u for u in units if _lookup(u, kept) is None]
    if uncovered:
        raise DeviceMapError(
            f"device_map does not place {len(uncovered)} module(s): {', '.join(uncovered[:8])}"
            f"{', ...' if len(uncovered) > 8 else ''}. Add them, or a default entry {{'': device}}, or pass "
            "device_map='auto' / a list of devices and let the planner place everything."
        )
    for unit in units:
        devices = {_lookup(unit, kept)} | {d for p, d in kept.items() if p.startswith(unit + ".")}
        if len(devices) > 1:
            raise DeviceMapError(
                f"device_map splits {unit} across {sorted(map(str, devices))}; the vision tower, the projector and "
                "each decoder layer must sit whole on one device. Map the whole prefix to one device."
            )
    if "" not in kept:  # every unit is covered; the default only serves names outside the units
        kept[""] = _lookup("vision_model", kept) or next(iter(kept.values()))
    return kept


def device_for(name: str, device_map: Mapping[str, torch.device]) -> torch.device:
    """The device of tensor/module `name`: the longest prefix of `name` in the map wins."""
    device = _lookup(name, device_map)
    if device is None:
        raise DeviceMapError(f"device_map places nothing for {name!r} and has no '' default.")
    return device


def local_gpus(max_memory: MaxMemory | None = None) -> list[DeviceSpec]:
    """The visible GPUs with their free memory; with `max_memory`, only the GPUs it lists, at those budgets."""
    if not torch.cuda.is_available():
        return []
    specs = []
    for index in range(torch.cuda.device_count()):
        device = torch.device("cuda", index)
        budget = memory_budget(max_memory, device) if max_memory else None
        if max_memory and budget is None:
            continue
        free, _total = torch.cuda.mem_get_info(index)
        specs.append(DeviceSpec(str(device), budget if budget is not None else free, torch.cuda.get_device_name(index),
                                _capability(index)))
    return specs


def parse_gpu_spec(text: str) -> list[DeviceSpec]:
    """GPUs from a short description: "4x80GB", "2xH200", "80GB,80GB,40GB", "2xA100-80GB,1xL40S".

    Sizes are GPU memory as labelled, which is binary: "80GB" is 80 GiB (nvidia-smi's 81920 MiB).
    "GiB", "MiB" and "TB" work too. Named GPUs use the memory nvidia-smi reports for them and
    carry their compute capability ("1xA100" is 8.0, so no FP8); a size alone leaves it unknown.
    """
    specs: list[DeviceSpec] = []
    for item in (part.strip() for part in text.split(",")):
        match = re.fullmatch(r"(?:(\d+)\s*[x*×]\s*)?(.+)", item, flags=re.IGNORECASE)
        if not item or match is None:
            raise DeviceMapError(f"GPU list {text!r} has an empty entry; write e.g. '4x80GB' or '80GB,80GB,40GB'.")
        count = int(match.group(1) or 1)
        memory, label = _gpu_memory(match.group(2).strip())
        for _ in range(count):
            specs.append(DeviceSpec(f"cuda:{len(specs)}", memory, label, GPU_CAPABILITY.get(label)))
    if not specs:
        raise DeviceMapError(f"GPU list {text!r} names no GPU.")
    return specs


def parse_bytes(value: int | str) -> int:
    """A byte count from 123, "70GiB" or "80GB" (GB = 10^9 bytes, GiB = 2^30, as in accelerate)."""
    if isinstance(value, int):
        return value
    text = value.strip().upper().replace(" ", "")
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3,
             "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * factor)
            except ValueError:
                break
    if text.isdigit():
        return int(text)
    raise DeviceMapError(f"{value!r} is not a size like '70GiB' or '80GB'.")


# --- helpers -----------------------------------------------------------------------------


def _device_specs(device_map: DeviceMapLike | None, max_memory: MaxMemory | None) -> list[DeviceSpec]:
    """The devices to plan over, GPUs first; [] means "everything on the CPU"."""
    if device_map is None or device_map == "auto":
        specs = local_gpus(max_memory)
        if specs and max_memory and memory_budget(max_memory, torch.device("cpu")) is not None:
            specs.append(_cpu_spec(max_memory))  # offload asked for, accelerate-style
        return specs
    devices = [_device(device_map)] if isinstance(device_map, (str, torch.device, int)) else [_device(d) for d in device_map]
    if not devices:
        raise DeviceMapError("device_map is an empty list; give at least one device.")
    if all(d.type == "cpu" for d in devices):
        return []
    gpus = [d for d in devices if d.type == "cuda"]
    if gpus and devices[0].type == "cpu":
        raise DeviceMapError(f"device_map {[str(d) for d in devices]} starts with the CPU; list the GPUs first "
                             "(the first device holds the vision tower and the LM head).")
    by_index = {spec.name: spec for spec in local_gpus()}
    specs = []
    for device in devices:
        if device.type == "cpu":
            specs.append(_cpu_spec(max_memory))
            continue
        name = str(torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device()))
        budget = memory_budget(max_memory, torch.device(name)) if max_memory else None
        specs.append(DeviceSpec(name, budget, by_index[name].label) if budget is not None else by_index[name])
    return specs


def _check_weights_fit(footprint: Footprint, mapping: Mapping[str, torch.device]) -> None:
    """An explicit map is used as given, but loading must not run out of GPU memory halfway."""
    totals: dict[torch.device, int] = {}
    for name, size in footprint.tensor_bytes.items():
        device = device_for(name, mapping)
        totals[device] = totals.get(device, 0) + size
    free = {torch.device(spec.name): spec.memory_bytes for spec in local_gpus()}
    for device, total in totals.items():
        if device.type == "cuda" and total > free.get(device, total):
            raise PlanError(
                f"device_map puts {format_gib(total)} of weights on {device}, which has {format_gib(free[device])} "
                "free. Move modules to other devices, or pass device_map='auto' to let the planner place them."
            )


def _cpu_spec(max_memory: MaxMemory | None) -> DeviceSpec:
    budget = memory_budget(max_memory, torch.device("cpu")) if max_memory else None
    if budget is None:  # what the operating system reports as available now
        budget = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return DeviceSpec("cpu", budget, "host memory")


def _units(model: nn.Module) -> list[str]:
    names = {unit_of(name) for name in model.state_dict(keep_vars=True)}
    ordered = [u for u in ("vision_model", "mlp1", "language_model.model.embed_tokens") if u in names]
    layers = sorted((u for u in names if u and u.startswith("language_model.model.layers.")), key=lambda u: int(u.split(".")[-1]))
    rest = [u for u in ("language_model.model.norm", "language_model.lm_head") if u in names]
    return [*ordered, *layers, *rest, "language_model.model.rotary_emb"]


def _lookup(name: str, device_map: Mapping[str, torch.device]) -> torch.device | None:
    best: str | None = None
    for prefix in device_map:
        if (prefix == "" or name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
            best = prefix
    return None if best is None else device_map[best]


def _device(value: str | torch.device | int) -> torch.device:
    if isinstance(value, int):
        value = torch.device("cuda", value)
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise DeviceMapError(f"{value!r} is not a device; use 'cpu', 'cuda', 'cuda:N' or 'auto'.") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceMapError(f"device {value!r} was asked for but CUDA is not available here; use 'cpu'.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceMapError(f"device {value!r} does not exist: {torch.cuda.device_count()} GPU(s) visible.")
    elif device.type != "cpu":
        raise DeviceMapError(f"device {value!r}: NVLM-D runs on CUDA GPUs and the CPU only.")
    return device


def memory_budget(max_memory: MaxMemory | None, device: torch.device) -> int | None:
    """The bytes `max_memory` allows `device` (keys: "cpu", a GPU index, "cuda:N"); None: not listed."""
    if not max_memory:
        return None
    keys = ("cpu",) if device.type == "cpu" else (device.index, str(device), f"cuda:{device.index}")
    for key in keys:
        if key in max_memory:
            return parse_bytes(max_memory[key])
    return None


def _capability(index: int) -> tuple[int, int] | None:
    """GPU `index`'s compute capability, or None when the driver cannot tell (the planner then assumes nothing)."""
    try:
        major, minor = torch.cuda.get_device_capability(index)
    except (RuntimeError, AssertionError):
        return None
    return int(major), int(minor)


def _gpu_memory(text: str) -> tuple[int, str]:
    """(bytes, label) of one GPU entry: a preset name or a labelled size."""
    key = text.upper().replace(" ", "").replace("_", "-")
    presets = {name.replace("-", ""): (name, mib) for name, mib in GPU_PRESETS_MIB.items()}
    preset = presets.get(key.replace("-", "")) or presets.get(key.removeprefix("NVIDIA").replace("-", ""))
    if preset is not None:
        return preset[1] * 2**20, preset[0]
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(TB|TIB|GB|GIB|G|MB|MIB)", key)
    if match is None:
        raise DeviceMapError(
            f"{text!r} is neither a GPU size like '80GB' nor a known GPU ({', '.join(sorted(GPU_PRESETS_MIB))})."
        )
    number, unit = float(match.group(1)), match.group(2)
    factor = {"TB": 2**40, "TIB": 2**40, "GB": GIB, "GIB": GIB, "G": GIB, "MB": 2**20, "MIB": 2**20}[unit]
    return int(number * factor), f"{number:g}GB"


__all__ = [
    "GPU_CAPABILITY",
    "GPU_PRESETS_MIB",
    "DeviceMapError",
    "DeviceMapLike",
    "Placement",
    "PlanError",
    "device_for",
    "local_gpus",
    "parse_bytes",
    "parse_gpu_spec",
    "resolve_dtype",
    "resolve_placement",
    "validate_device_map",
]
