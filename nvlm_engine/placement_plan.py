"""A placement plan as data: the devices it may use, and what each one ends up holding.

`DeviceSpec` is a device and the memory the model may fill on it; `Plan` (made by
`placement.plan_placement`) is the device of every placement unit, with per device a
`DevicePlan` of its bytes of weights, KV cache and reserves; `Plan.device_map()` is what the
loader applies. `PlanError` is what a plan that cannot fit raises.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .errors import NVLMError
from .placement_sizes import Footprint

__all__ = ["DevicePlan", "DeviceSpec", "Plan", "PlanError"]


class PlanError(NVLMError):
    """The model does not fit on the given devices as asked.

    Attributes:
        shortfall_bytes: how much more memory the plan needs.
        required_bytes: everything the plan needs (weights, KV cache, reserves), all devices.
        available_bytes: the memory of the devices, all together.
        suggestions: settings that would fit, in words ("quantization='bnb-8bit'", ...).
        fixes: the same settings as data, one dict per suggestion, keyed by `from_pretrained`
            argument names ({"quantization": "bnb-8bit"}, {"context_length": 10240},
            {"batch_size": 1}, {"dtype": "bfloat16"}), or {"gpus": 3} for more GPUs of the
            largest kind listed: what command lines turn into flags.
        problem: the message without its suggestions.
    """

    def __init__(self, message: str, *, shortfall_bytes: int = 0, required_bytes: int = 0,
                 available_bytes: int = 0, suggestions: Sequence[str] = (),
                 fixes: Sequence[Mapping[str, object]] = (), problem: str | None = None) -> None:
        super().__init__(message)
        self.shortfall_bytes = shortfall_bytes
        self.required_bytes = required_bytes
        self.available_bytes = available_bytes
        self.suggestions = list(suggestions)
        self.fixes = [dict(fix) for fix in fixes]
        self.problem = problem if problem is not None else message


@dataclass(frozen=True)
class DeviceSpec:
    """A device and the memory the model may use on it.

    Attributes:
        name: a torch device string: "cuda:0", "cpu".
        memory_bytes: what the plan may fill (free memory, or the user's max_memory).
        label: a model name for tables ("H200", "A100-80GB"); optional.
        capability: its CUDA compute capability, (8, 0) for an A100, when known (FP8 needs 8.9).
    """

    name: str
    memory_bytes: int
    label: str = ""
    capability: tuple[int, int] | None = None

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
        split: "balanced" (the planner's split by memory) or "card" (the model card's `split_model()`).
        vision_devices: with vision replicas, every device holding a vision tower (the first one
            and the GPUs given a copy); empty otherwise.
    """

    devices: tuple[DevicePlan, ...]
    assignments: Mapping[str, str]
    footprint: Footprint
    context_length: int
    batch_size: int
    first_device_share: float
    warnings: tuple[str, ...] = ()
    split: str = "balanced"
    vision_devices: tuple[str, ...] = ()

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
