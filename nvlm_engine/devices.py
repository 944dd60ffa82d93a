"""Where each part of the model lives and in which dtype: decided here, once.

A device map is a dict from a module-name prefix (`"vision_model"`, `"language_model.model.layers.3"`)
to a `torch.device`; the longest matching prefix of a tensor's name wins. This module turns what
a user passes (`"auto"`, `"cpu"`, `"cuda:1"`, a list of devices, or an explicit dict) into such a
map. For several GPUs, `split_layers()` reproduces the model card's `split_model` (SPEC section 8):
the first GPU counts as half a GPU because it also holds the vision tower, and it keeps the
vision tower, projector, embeddings, final norm, LM head, rotary table and the *last* decoder
layer, so logits and the next token's embedding are on one device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch

from .config import NVLMConfig
from .errors import NVLMError

logger = logging.getLogger(__name__)

DeviceMapLike = str | torch.device | Sequence[str | torch.device] | Mapping[str, str | torch.device | int]

# Modules pinned to the first device (SPEC section 8).
FIRST_DEVICE_MODULES = (
    "vision_model",
    "mlp1",
    "language_model.model.embed_tokens",
    "language_model.model.norm",
    "language_model.model.rotary_emb",
    "language_model.lm_head",
)


class DeviceMapError(NVLMError):
    """The device map or dtype cannot be used as given."""


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


def resolve_device_map(
    device_map: DeviceMapLike | None,
    config: NVLMConfig,
    max_memory: Mapping[str | int, int | str] | None = None,
) -> dict[str, torch.device]:
    """Turn what the user passed into a prefix -> device map (the empty prefix is the default)."""
    if device_map is None or device_map == "auto":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus == 0:
            return {"": torch.device("cpu")}
        devices = [torch.device("cuda", i) for i in range(gpus)]
        if max_memory:
            devices = [d for d in devices if _memory_for(max_memory, d) > 0]
        return split_layers(config, devices, max_memory) if len(devices) > 1 else {"": devices[0]}
    if isinstance(device_map, (str, torch.device)):
        return {"": _device(device_map)}
    if isinstance(device_map, Mapping):
        resolved = {str(prefix): _device(dev) for prefix, dev in device_map.items()}
        if "" not in resolved:
            first = _device(device_map.get("vision_model", next(iter(device_map.values()))))
            resolved[""] = first
        return resolved
    devices = [_device(d) for d in device_map]
    if not devices:
        raise DeviceMapError("device_map is an empty list; give at least one device.")
    return split_layers(config, devices, max_memory) if len(devices) > 1 else {"": devices[0]}


def split_layers(
    config: NVLMConfig, devices: Sequence[torch.device], max_memory: Mapping[str | int, int | str] | None = None
) -> dict[str, torch.device]:
    """The model card's split: decoder layers spread over `devices`, the first counted as half."""
    n_layers = config.llm.num_hidden_layers
    weights = [_memory_for(max_memory, d) if max_memory else 1.0 for d in devices]
    weights[0] *= 0.5
    total = sum(weights)
    counts = [math.floor(n_layers * w / total) for w in weights]
    # Hand out the rounding remainder to the devices with the largest fractional share.
    order = sorted(range(len(devices)), key=lambda i: n_layers * weights[i] / total - counts[i], reverse=True)
    for i in order[: n_layers - sum(counts)]:
        counts[i] += 1
    mapping: dict[str, torch.device] = {"": devices[0]}
    layer = 0
    for device, count in zip(devices, counts):
        for _ in range(count):
            mapping[f"language_model.model.layers.{layer}"] = device
            layer += 1
    mapping[f"language_model.model.layers.{n_layers - 1}"] = devices[0]  # logits and next embedding together
    for name in FIRST_DEVICE_MODULES:
        mapping[name] = devices[0]
    return mapping


def device_for(name: str, device_map: Mapping[str, torch.device]) -> torch.device:
    """The device of tensor/module `name`: the longest prefix of `name` in the map wins."""
    best = ""
    for prefix in device_map:
        if len(prefix) > len(best) and (name == prefix or name.startswith(prefix + ".")):
            best = prefix
    return device_map[best]


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
    if device.type == "meta":
        raise DeviceMapError("the meta device cannot hold weights for inference.")
    return device


def _memory_for(max_memory: Mapping[str | int, int | str] | None, device: torch.device) -> float:
    if not max_memory:
        return 1.0
    for key in (device.index, str(device), f"{device.type}:{device.index}"):
        if key in max_memory:
            return float(_parse_bytes(max_memory[key]))
    return 0.0


def _parse_bytes(value: int | str) -> int:
    if isinstance(value, int):
        return value
    text = value.strip().upper().replace(" ", "")
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * factor)
            except ValueError:
                break
    raise DeviceMapError(f"max_memory value {value!r} is not a size like '70GiB' or '80GB'.")
