"""Quantized linear layers for the LLM's decoder: bitsandbytes 8-bit, bitsandbytes 4-bit NF4, FP8.

Only the seven linears of each decoder layer are quantized
(`language_model.model.layers.N.self_attn.{q,k,v,o}_proj` and `.mlp.{gate,up,down}_proj`, 96.5% of
NVLM-D-72B's LLM weights). The vision tower and projector stay in the compute dtype because
bitsandbytes 4-bit on InternViT-6B is known to produce nonsense; the token embeddings, final norm
and LM head stay too (3% of the weights, and the logits are what sampling sees).

This module knows two things: how many bytes each format stores (`QuantizationScheme.linear_bytes`,
which the placement planner sizes devices with), and how to swap an `nn.Linear` for its quantized
form while the checkpoint loads (`QuantizingLoader`), one linear at a time so that the full-precision
model never has to fit anywhere. Under tensor parallelism each rank quantizes its own shard of each
linear the same way (`tensor_parallel.fill_shards`, see "Shards" there). bitsandbytes is an optional extra (`pip install 'nvlm-langchain[quant]'`)
and is imported only when a bitsandbytes scheme is asked for.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import NVLMError

logger = logging.getLogger(__name__)

QUANTIZED_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_QUANTIZED_MODULE = re.compile(r"language_model\.model\.layers\.\d+\.(" + "|".join(map(re.escape, QUANTIZED_LINEARS)) + r")")

FP8_MAX = 448.0  # largest finite float8_e4m3fn value
NF4_BLOCK = 64  # bitsandbytes' default 4-bit block size (CUDA)
NF4_NESTED_BLOCK = 256  # block size of the double-quantized absmax statistics
BNB_INT8_THRESHOLD = 6.0  # LLM.int8() outlier threshold, transformers' default
BNB_CPU_VERSION = (0, 50)  # the oldest bitsandbytes whose CPU 8-bit and NF4 linears were run here
# bitsandbytes' CPU NF4 kernel (on AVX512-BF16 CPUs) repacks a weight's output rows in blocks of 32
# at its first call, and asserts on any other count (`functional._convert_weight_packed_for_cpu`).
NF4_CPU_ROWS = 32


class QuantizationError(NVLMError):
    """A quantization scheme cannot be used as asked (unknown name, no CUDA, no bitsandbytes, old GPU)."""


@dataclass(frozen=True)
class QuantizationScheme:
    """One storage format for the decoder linears.

    Attributes:
        name: "bnb-8bit", "bnb-4bit" or "fp8".
        summary: one line for tables and messages.
        uses_bitsandbytes: needs the optional `bitsandbytes` package.
        min_capability: the oldest CUDA compute capability that runs it.
    """

    name: str
    summary: str
    uses_bitsandbytes: bool
    min_capability: tuple[int, int]

    def linear_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes one quantized [out, in] weight takes on the GPU, scales and statistics included."""
        n = out_features * in_features
        if self.name == "bnb-8bit":
            return n + 4 * out_features  # int8 rows + one fp32 absmax per row (SCB)
        if self.name == "fp8":
            return n + 4 * out_features  # e4m3 + one fp32 scale per output row
        # NF4 with double quantization (bitsandbytes' compress_statistics=True): two weights per
        # byte; one uint8 absmax per 64-block; one fp32 absmax per 256 of those; the 256-entry
        # fp32 code of the nested quantization, the 16-entry NF4 code and the fp32 offset.
        blocks = math.ceil(n / NF4_BLOCK)
        return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + 4 * 256 + 4 * 16 + 4


SCHEMES: dict[str, QuantizationScheme] = {
    "bnb-8bit": QuantizationScheme("bnb-8bit", "bitsandbytes LLM.int8() (8-bit weights)", True, (7, 5)),
    "bnb-4bit": QuantizationScheme("bnb-4bit", "bitsandbytes NF4 (4-bit weights, double-quantized scales)", True, (7, 5)),
    # FP8 tensor cores (and torch._scaled_mm's row-wise scaling) start at Ada, compute capability 8.9.
    "fp8": QuantizationScheme("fp8", "FP8 e4m3 weights, per-channel scales, dynamic per-token activations", False, (8, 9)),
}


def get_scheme(name: str | QuantizationScheme | None) -> QuantizationScheme | None:
    """The scheme called `name` (None/"none" means no quantization)."""
    if name is None or isinstance(name, QuantizationScheme):
        return name
    key = str(name).strip().lower().replace("_", "-")
    aliases = {"none": None, "int8": "bnb-8bit", "8bit": "bnb-8bit", "bnb-int8": "bnb-8bit", "nf4": "bnb-4bit",
               "bnb-nf4": "bnb-4bit", "4bit": "bnb-4bit", "float8": "fp8"}
    key = aliases.get(key, key)  # type: ignore[assignment]
    if key is None:
        return None
    if key not in SCHEMES:
        raise QuantizationError(f"Unknown quantization {name!r}; use one of {', '.join(SCHEMES)} or None.")
    return SCHEMES[key]


def is_quantized_module(module_name: str) -> bool:
    """True for the decoder linears a scheme replaces (module names, not tensor names)."""
    return _QUANTIZED_MODULE.fullmatch(module_name) is not None


def is_quantized_weight(tensor_name: str) -> bool:
    """True for the `.weight` tensors a scheme stores quantized (their biases stay in the compute dtype)."""
    module, _, attr = tensor_name.rpartition(".")
    return attr == "weight" and is_quantized_module(module)


def check_runtime(scheme: QuantizationScheme, devices: Iterable[torch.device]) -> None:
    """Raise `QuantizationError` unless `scheme` can run on `devices` (those holding decoder layers).

    bitsandbytes runs its 8-bit and NF4 linears on CUDA GPUs and, in recent releases (0.50 tested),
    on the CPU (slowly: for tests and small models). FP8 needs FP8 tensor cores: CUDA compute capability 8.9+.
    """
    devices = list(devices)
    if scheme.uses_bitsandbytes:
        _check_bitsandbytes(scheme, devices)
        cuda_devices = {d for d in devices if d.type == "cuda"}
    else:
        if not torch.cuda.is_available():
            raise QuantizationError(
                f"quantization={scheme.name!r} needs an NVIDIA GPU with CUDA compute capability "
                f"{_version(scheme.min_capability)}+, and none is visible here. Load without quantization "
                "(bfloat16 on GPUs, float32 on the CPU), or use 'bnb-8bit', which also runs on the CPU."
            )
        off_gpu = sorted({str(d) for d in devices if d.type != "cuda"})
        if off_gpu:
            raise QuantizationError(
                f"quantization={scheme.name!r} runs on CUDA GPUs only, but decoder layers are placed on "
                f"{', '.join(off_gpu)}. Give more GPU memory (more GPUs, a shorter context_length) or use "
                "'bnb-8bit' instead of CPU offload."
            )
        cuda_devices = set(devices)
    for device in cuda_devices:
        capability = torch.cuda.get_device_capability(device)
        if capability < scheme.min_capability:
            hint = " (L4, L40S, RTX 4090, H100, H200, B200); on this GPU use 'bnb-8bit'" if scheme.name == "fp8" else ""
            raise QuantizationError(
                f"quantization={scheme.name!r} needs CUDA compute capability {_version(scheme.min_capability)}+{hint}; "
                f"{device} ({torch.cuda.get_device_name(device)}) has {capability[0]}.{capability[1]}."
            )


def check_linear_shapes(scheme: QuantizationScheme, shapes: Mapping[str, Sequence[int]],
                        devices: Iterable[torch.device]) -> None:
    """Raise `QuantizationError` for decoder linear weights (`shapes`: name -> [out, in], as each
    device holds it, e.g. a tensor-parallel shard) that `scheme`'s kernels cannot run on `devices`.

    The one such limit known here: bnb-4bit on the CPU needs output rows in multiples of
    `NF4_CPU_ROWS` (NVLM-D-72B's smallest shard, k_proj at tensor_parallel=8, has 128). CUDA
    kernels and bnb-8bit take any shape; FP8's `torch._scaled_mm` needs multiples of 16, which
    every shard of NVLM-D-72B is.
    """
    if scheme.name != "bnb-4bit" or not any(d.type == "cpu" for d in devices):
        return
    bad = [f"{name} {list(shape)}" for name, shape in shapes.items()
           if is_quantized_weight(name) and shape[0] % NF4_CPU_ROWS]
    if bad:
        raise QuantizationError(
            f"quantization='bnb-4bit' on the CPU needs every decoder linear's output rows in multiples of "
            f"{NF4_CPU_ROWS} (bitsandbytes' CPU NF4 kernel packs them so); {len(bad)} are not, e.g. "
            f"{', '.join(bad[:3])}. Use a smaller tensor_parallel, 'bnb-8bit', or GPUs.")


def _check_bitsandbytes(scheme: QuantizationScheme, devices: list[torch.device]) -> None:
    """bitsandbytes installed, new enough for the CPU if layers sit there, and only CPU/CUDA devices."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationError(
            f"quantization={scheme.name!r} needs the bitsandbytes package: pip install 'nvlm-langchain[quant]' "
            f"(bitsandbytes>={_version(BNB_CPU_VERSION)} to run them on the CPU)."
        )
    unsupported = sorted({str(d) for d in devices if d.type not in ("cpu", "cuda")})
    if unsupported:
        raise QuantizationError(
            f"quantization={scheme.name!r} runs on CUDA GPUs and the CPU here, not on {', '.join(unsupported)}. "
            "Place the decoder layers on cuda or cpu, or load without quantization."
        )
    if any(d.type == "cpu" for d in devices):
        installed = _installed_version("bitsandbytes")
        if installed < BNB_CPU_VERSION:
            raise QuantizationError(
                f"quantization={scheme.name!r} on the CPU needs bitsandbytes {_version(BNB_CPU_VERSION)}+ "
                f"(its CPU kernels); {_version(installed)} is installed. "
                f"Run pip install -U 'bitsandbytes>={_version(BNB_CPU_VERSION)}'."
            )


def _installed_version(package: str) -> tuple[int, ...]:
    from importlib.metadata import version

    return tuple(int(p) for p in re.findall(r"\d+", version(package))[:3])


def _version(numbers: tuple[int, ...]) -> str:
    return ".".join(map(str, numbers))


# --- FP8 ---------------------------------------------------------------------------------


class Fp8Linear(nn.Module):
    """y = x W^T + b with W stored as FP8 e4m3 and one fp32 scale per output row.

    Activations are quantized per token at run time (dynamic scaling) and the product runs on FP8
    tensor cores through `torch._scaled_mm` with row-wise scales: the "FP8 dynamic" recipe, which
    needs no calibration data. The output is computed in bfloat16 (what row-wise scaled matmuls
    produce) and cast to the input dtype.
    """

    weight: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # [out, in] float8_e4m3fn, row-major
        self.register_buffer("weight_scale", scale.reshape(1, -1).float().contiguous())  # [1, out]
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, device: torch.device | None = None) -> Fp8Linear:
        """Quantize `linear` (on `device`, default where its weight is)."""
        w = linear.weight.detach().to(device or linear.weight.device)
        scale = w.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX  # [out, 1]
        q = (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        bias = linear.bias.detach().to(w.device) if linear.bias is not None else None
        return cls(q, scale, bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W as stored, back in `dtype` (for tests and debugging)."""
        return (self.weight.float() * self.weight_scale.t()).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # [M, in]
        # Per-token scale, computed in the activation dtype so that the division below and the
        # rescaling inside the matmul use exactly the same number; few kernels, because at
        # decode time (M = batch) this runs 560 times per token and launches dominate.
        amax = torch.linalg.vector_norm(x2, ord=float("inf"), dim=1, keepdim=True)  # [M, 1]
        x_scale = (amax / FP8_MAX).clamp(min=torch.finfo(x.dtype).tiny)  # a zero row stays zero
        x_q = (x2 / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(
            x_q, self.weight.t(), scale_a=x_scale.float(), scale_b=self.weight_scale, out_dtype=torch.bfloat16
        )  # [M, out]
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# --- bitsandbytes ------------------------------------------------------------------------


def _bnb_linear(linear: nn.Linear, scheme: QuantizationScheme, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """bitsandbytes' own modules; their weight quantizes when it moves off the CPU staging copy
    (`Int8Params.to` / `Params4bit.to` quantize on any non-meta target, the CPU included)."""
    import bitsandbytes as bnb

    if scheme.name == "bnb-8bit" and dtype != torch.float16:
        _quiet_int8_cast_warning()

    has_bias = linear.bias is not None
    weight = linear.weight.detach().cpu()
    if scheme.name == "bnb-8bit":
        module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                     threshold=BNB_INT8_THRESHOLD, device="meta")
        module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(device)
    else:
        module = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=dtype,
                                   compress_statistics=True, quant_type="nf4", device="meta")
        module.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                          module=module).to(device)
    if has_bias:
        module.bias = nn.Parameter(linear.bias.detach().to(device=device, dtype=dtype), requires_grad=False)
    return module


def _drop_int8_cast_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _quiet_int8_cast_warning() -> None:
    """LLM.int8() quantizes activations from float16, so bitsandbytes logs a warning on *every*
    call with bf16/fp32 inputs (560 linears per token on the 72B model); say it once instead."""
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if _drop_int8_cast_warning not in bnb_logger.filters:
        bnb_logger.addFilter(_drop_int8_cast_warning)
        logger.info("bnb-8bit: activations are cast to float16 for LLM.int8() quantization")


def quantize_linear(linear: nn.Linear, scheme: QuantizationScheme, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The quantized replacement of `linear`, on `device`."""
    if scheme.name == "fp8":
        return Fp8Linear.from_linear(linear, device)
    return _bnb_linear(linear, scheme, device, dtype)


class QuantizingLoader:
    """Quantizes the decoder linears of a model while `checkpoint.fill_model` loads it.

    Use `device_of` as the loader's placement function and call `quantize_loaded()` after each
    shard (the loader's progress callback) and `finish()` at the end. A quantized linear's weight
    and bias are first loaded in the compute dtype to a staging device: the CPU for bitsandbytes
    (its parameters quantize as they move from there to their device, the CPU included), the
    target GPU for FP8. As soon as both are in, the `nn.Linear` is replaced by its quantized form
    on its target device and the full-precision copy is dropped, so at most one shard's worth of
    linears is ever held in full precision.
    """

    def __init__(
        self,
        model: nn.Module,
        scheme: QuantizationScheme,
        device_of: Callable[[str], torch.device],
        dtype: torch.dtype,
    ) -> None:
        self.model = model
        self.scheme = scheme
        self.dtype = dtype
        self._device_of = device_of
        self.pending = {name: device_of(f"{name}.weight") for name, _ in model.named_modules() if is_quantized_module(name)}
        self.quantized = 0

    def device_of(self, tensor_name: str) -> torch.device:
        target = self.pending.get(tensor_name.rpartition(".")[0])
        if target is None:
            return self._device_of(tensor_name)
        return torch.device("cpu") if self.scheme.uses_bitsandbytes else target

    def quantize_loaded(self) -> None:
        """Replace every pending linear whose tensors have all been loaded."""
        for name in [n for n in self.pending if _loaded(self.model.get_submodule(n))]:
            self._replace(name)

    def quantize_if_loaded(self, tensor_name: str) -> None:
        """Replace the linear `tensor_name` belongs to if this was its last tensor to load.

        What a loader reading one tensor at a time calls after each (the tensor-parallel shard
        reader): a linear is then held in full precision only until its weight and bias are in.
        """
        name = tensor_name.rpartition(".")[0]
        if name in self.pending and _loaded(self.model.get_submodule(name)):
            self._replace(name)

    def _replace(self, name: str) -> None:
        parent_name, _, child = name.rpartition(".")
        linear = self.model.get_submodule(name)
        assert isinstance(linear, nn.Linear), (name, type(linear))
        replacement = quantize_linear(linear, self.scheme, self.pending.pop(name), self.dtype)
        setattr(self.model.get_submodule(parent_name), child, replacement)
        self.quantized += 1

    def finish(self) -> None:
        self.quantize_loaded()
        assert not self.pending, f"linears never loaded: {sorted(self.pending)[:5]}"
        logger.info("quantized %d decoder linears as %s", self.quantized, self.scheme.name)


def quantize_model(model: nn.Module, scheme: QuantizationScheme, dtype: torch.dtype) -> int:
    """Quantize the decoder linears of an already loaded model in place, each on its own device.

    Returns how many linears were replaced. The engine quantizes while loading instead (see
    `QuantizingLoader`); this is for models built in memory (tests, benchmarks).
    """
    loader = QuantizingLoader(model, scheme, lambda name: model.get_parameter(name).device, dtype)
    loader.quantize_loaded()
    loader.finish()
    return loader.quantized


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes `tensor` holds in memory, a bitsandbytes weight's quantization statistics included.

    bitsandbytes keeps them outside the module's parameters and buffers: LLM.int8()'s per-row
    absmax on the weight (`Int8Params.SCB`), NF4's block absmax, its nested statistics and the
    code tables in `Params4bit.quant_state`. `QuantizationScheme.linear_bytes` counts the same.
    FP8's row scales are a buffer of their own (`Fp8Linear.weight_scale`).
    """
    total = tensor.numel() * tensor.element_size()
    scb = getattr(tensor, "SCB", None)
    if isinstance(scb, torch.Tensor):
        total += scb.numel() * scb.element_size()
    state = getattr(tensor, "quant_state", None)
    if state is not None:
        parts = [state.absmax, state.code]
        if state.nested:
            parts += [state.state2.absmax, state.state2.code]
            total += 4  # the fp32 offset of the nested absmax
        total += sum(t.numel() * t.element_size() for t in parts)
    return total


def _loaded(linear: nn.Module) -> bool:
    return all(t.device.type != "meta" for t in linear.parameters(recurse=False))


__all__ = [
    "SCHEMES",
    "Fp8Linear",
    "QuantizationError",
    "QuantizationScheme",
    "QuantizingLoader",
    "check_linear_shapes",
    "check_runtime",
    "get_scheme",
    "is_quantized_module",
    "is_quantized_weight",
    "quantize_linear",
    "quantize_model",
    "stored_bytes",
]
