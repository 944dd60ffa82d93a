"""Quantization of the decoder linears: bitsandbytes on the CPU, FP8 numerics, typed refusals, sizes.

bitsandbytes (0.50+) runs its 8-bit and NF4 linears on the CPU, so `quantization="bnb-8bit"` and
`"bnb-4bit"` (alias "bnb-nf4") are loaded, generated with and compared with the fp32 model here;
those tests skip, saying so, when bitsandbytes is not installed. `torch._scaled_mm` (the FP8
matmul) also runs on the CPU, so the FP8 module and the quantize-while-loading path are tested
for real, though the engine refuses FP8 without a GPU of compute capability 8.9+. FP8 on real
tensor cores is timed by `bench/gpu_check.py`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nvlm_engine import NVLMEngine, quantization
from nvlm_engine.checkpoint import check_tensors, fill_model, find_weight_files, infer_dummy_heads, read_tensor_infos
from nvlm_engine.config import NVLMConfig
from nvlm_engine.model import NVLMModel
from nvlm_engine.placement import Footprint, layer_unit
from nvlm_engine.quantization import (
    FP8_MAX,
    Fp8Linear,
    QuantizationError,
    QuantizingLoader,
    check_runtime,
    get_scheme,
    is_quantized_module,
    is_quantized_weight,
    quantize_model,
)
from nvlm_engine.reference_decode import decode_one, prefill

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
needs_bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="bitsandbytes is not installed: pip install 'nvlm-langchain[quant]' to run the bnb-8bit/bnb-4bit CPU tests",
)


def test_scheme_names() -> None:
    assert get_scheme(None) is None and get_scheme("none") is None
    assert get_scheme("NF4").name == "bnb-4bit" and get_scheme("int8").name == "bnb-8bit"
    assert get_scheme("bnb-nf4").name == "bnb-4bit" and get_scheme("bnb_int8").name == "bnb-8bit"
    assert get_scheme("fp8").uses_bitsandbytes is False
    with pytest.raises(QuantizationError, match="bnb-8bit, bnb-4bit, fp8"):
        get_scheme("gptq")


def test_only_decoder_linears_are_quantized() -> None:
    assert is_quantized_module("language_model.model.layers.0.self_attn.q_proj")
    assert is_quantized_module("language_model.model.layers.79.mlp.down_proj")
    assert is_quantized_weight("language_model.model.layers.3.mlp.up_proj.weight")
    assert not is_quantized_weight("language_model.model.layers.3.self_attn.q_proj.bias")
    for name in ("vision_model.encoder.layers.0.mlp.fc1", "mlp1.1", "language_model.lm_head",
                 "language_model.model.embed_tokens", "language_model.model.layers.0.input_layernorm"):
        assert not is_quantized_module(name), name


@no_cuda
def test_engine_refuses_fp8_without_cuda(tiny_checkpoint: Path) -> None:
    with pytest.raises(QuantizationError, match=r"needs an NVIDIA GPU with CUDA compute capability 8\.9\+.*'bnb-8bit'"):
        NVLMEngine.from_pretrained(tiny_checkpoint, device_map="cpu", quantization="fp8")


def test_fp8_refusals_name_the_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    """With CUDA reported present: layers on the CPU, then an Ampere GPU (8.6), then an Ada one (8.9)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(QuantizationError, match="runs on CUDA GPUs only.*cpu"):
        check_runtime(get_scheme("fp8"), [torch.device("cpu")])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10")
    with pytest.raises(QuantizationError, match=r"compute capability 8\.9\+.*use 'bnb-8bit'.*NVIDIA A10\) has 8\.6"):
        check_runtime(get_scheme("fp8"), [torch.device("cuda", 0)])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    check_runtime(get_scheme("fp8"), [torch.device("cuda", 0)])  # L4 / L40S / RTX 4090: FP8 tensor cores


def _without_bitsandbytes(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))


@pytest.mark.parametrize("scheme", ["bnb-8bit", "bnb-nf4"])
def test_bnb_refused_without_bitsandbytes(tiny_checkpoint: Path, scheme: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _without_bitsandbytes(monkeypatch)
    with pytest.raises(QuantizationError, match=r"needs the bitsandbytes package: pip install 'nvlm-langchain\[quant\]"):
        NVLMEngine.from_pretrained(tiny_checkpoint, device_map="cpu", quantization=scheme)


def test_bnb_refusals_name_the_device_and_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # "installed"
    monkeypatch.setattr(quantization, "_installed_version", lambda package: (0, 45, 1))
    with pytest.raises(QuantizationError, match=r"on the CPU needs bitsandbytes 0\.50\+.*0\.45\.1 is installed"):
        check_runtime(get_scheme("bnb-8bit"), [torch.device("cpu")])
    with pytest.raises(QuantizationError, match="runs on CUDA GPUs and the CPU here, not on mps"):
        check_runtime(get_scheme("bnb-4bit"), [torch.device("mps")])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    check_runtime(get_scheme("bnb-4bit"), [torch.device("cuda", 0)])  # old bitsandbytes is fine on GPUs


# --- bitsandbytes on the CPU ---------------------------------------------------------------

# Relative error of the last-position logits against the fp32 model, ||q - f|| / ||f||.
# Per linear, LLM.int8() rounds each weight to 1/127 of its row's absmax (the output's relative
# error is below 1/127: 0.6% measured on the tiny model), and NF4 rounds to one of 16 levels
# spread over each 64-weight block's absmax, an RMS error of about 0.1 of the weights' spread
# (8-9% measured). The errors of the 7 * layers quantized linears are independent, so they add
# about in quadrature: bound = sqrt(7 * layers) * per-linear error, times 1.5 for int8, whose
# bf16 run adds bf16's own rounding (0.8% alone). Tiny model (14 linears): int8 0.044
# (measured 1.8-2.3%, fp32 or bf16), NF4 0.37 (measured 20-23%). Broken quantizers measured far
# above: one linear zeroed 0.55, every weight 25% too large 0.51, square weights transposed 0.81.
# Greedy tokens are not compared: with the real tokenizer's prompt the fp32 top-2 logits of the
# random tiny model come within int8's error by the 4th token, so even bnb-8bit may pick another.
PER_LINEAR_ERROR = {"bnb-8bit": 1.5 / 127, "bnb-4bit": 0.1}


def _logit_bound(scheme: str, layers: int) -> float:
    return math.sqrt(len(quantization.QUANTIZED_LINEARS) * layers) * PER_LINEAR_ERROR[get_scheme(scheme).name]


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected).norm() / expected.norm()).item()


@pytest.fixture(scope="module")
def bnb_engine(tiny_checkpoint: Path) -> Callable[[str, str], NVLMEngine]:
    """Engines loaded through the real loader with bitsandbytes quantization, one per (scheme, dtype)."""
    loaded: dict[tuple[str, str], NVLMEngine] = {}

    def load(scheme: str, dtype: str = "float32") -> NVLMEngine:
        if (scheme, dtype) not in loaded:
            loaded[scheme, dtype] = NVLMEngine.from_pretrained(tiny_checkpoint, device_map="cpu", dtype=dtype,
                                                               quantization=scheme)
        return loaded[scheme, dtype]

    return load


PROMPT = [{"role": "user", "content": "Describe the weather."}]


@needs_bnb
@pytest.mark.parametrize("scheme", ["bnb-8bit", "bnb-nf4"])
def test_bnb_loads_every_decoder_linear_quantized_on_the_cpu(bnb_engine: Callable[..., NVLMEngine],
                                                             scheme: str) -> None:
    import bitsandbytes as bnb

    model = bnb_engine(scheme).model
    kind, stored = (bnb.nn.Linear8bitLt, torch.int8) if scheme == "bnb-8bit" else (bnb.nn.Linear4bit, torch.uint8)
    swapped = {n: m for n, m in model.named_modules() if isinstance(m, kind)}
    assert sorted(swapped) == sorted(n for n, _ in model.named_modules() if is_quantized_module(n))
    assert len(swapped) == 7 * model.config.llm.num_hidden_layers
    for name, module in swapped.items():
        assert module.weight.device.type == "cpu" and module.weight.dtype == stored, name
        if scheme == "bnb-nf4":  # two 4-bit codes per byte
            assert module.weight.numel() == module.in_features * module.out_features // 2, name
    # bitsandbytes' linears subclass nn.Linear: the untouched ones are exactly nn.Linear, in fp32
    head = model.language_model.lm_head
    assert type(head) is nn.Linear and head.weight.dtype == torch.float32
    assert type(model.vision_model.encoder.layers[0].mlp.fc1) is nn.Linear


@needs_bnb
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("scheme", ["bnb-8bit", "bnb-nf4"])
def test_bnb_logits_stay_close_to_fp32(bnb_engine: Callable[..., NVLMEngine], fp32_model: NVLMEngine,
                                       scheme: str, dtype: str) -> None:
    engine = bnb_engine(scheme, dtype)
    request = fp32_model.prepare(PROMPT)
    full, _, _ = prefill(fp32_model.model, [request], fp32_model.token_ids)
    quantized, _, _ = prefill(engine.model, [request], engine.token_ids)
    error = _relative_error(quantized, full)
    bound = _logit_bound(scheme, engine.config.llm.num_hidden_layers)
    assert 0 < error < bound, (error, bound)  # 0 would mean nothing was quantized
    result = engine.generate(PROMPT, max_new_tokens=6)
    assert 0 < result.usage.completion_tokens <= 6


@needs_bnb
@pytest.mark.parametrize("scheme", ["bnb-8bit", "bnb-nf4"])
def test_bnb_logit_bound_rejects_a_broken_quantizer(tiny_checkpoint: Path, fp32_model: NVLMEngine, scheme: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The closeness bound is tight enough to catch weights 25% off (a wrong absmax scale)."""
    quantize = quantization.quantize_linear

    def off_by_a_quarter(linear: nn.Linear, *args: object) -> nn.Module:
        linear.weight.data.mul_(1.25)
        return quantize(linear, *args)

    monkeypatch.setattr(quantization, "quantize_linear", off_by_a_quarter)
    broken = NVLMEngine.from_pretrained(tiny_checkpoint, device_map="cpu", dtype="float32", quantization=scheme)
    request = fp32_model.prepare(PROMPT)
    full, _, _ = prefill(fp32_model.model, [request], fp32_model.token_ids)
    wrong, _, _ = prefill(broken.model, [request], broken.token_ids)
    assert _relative_error(wrong, full) > _logit_bound(scheme, broken.config.llm.num_hidden_layers)


@needs_bnb
@pytest.mark.parametrize("scheme", ["bnb-8bit", "bnb-nf4"])
def test_bnb_cached_decoding_equals_a_full_forward(bnb_engine: Callable[..., NVLMEngine], scheme: str) -> None:
    """The KV cache invariant with quantized linears: prefill + cached steps == prefill of the longer prompt."""
    engine = bnb_engine(scheme)
    request = engine.prepare(PROMPT)
    logits, step, valid = prefill(engine.model, [request], engine.token_ids)
    tokens = request.prompt_ids
    for _ in range(3):
        token = logits.argmax(-1)  # [1]
        tokens = [*tokens, int(token)]
        logits, valid = decode_one(engine.model, token, step, valid)
        longer = dataclasses.replace(request, prompt_ids=tokens)
        uncached, _, _ = prefill(engine.model, [longer], engine.token_ids)
        torch.testing.assert_close(logits, uncached, rtol=1e-4, atol=1e-4)


# --- FP8 ---------------------------------------------------------------------------------


def test_fp8_linear_matches_the_full_precision_linear() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=True)
    fp8 = Fp8Linear.from_linear(linear)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight_scale.shape == (1, 96)
    # e4m3 keeps 3 mantissa bits: every weight within 1/16 of itself (relative), zeros exact
    w = linear.weight.detach()
    assert ((fp8.dequantized_weight() - w).abs() <= w.abs() / 16 + 1e-6).all()
    x = torch.randn(2, 5, 256)
    expected = F.linear(x, w, linear.bias)
    got = fp8(x)
    assert got.shape == (2, 5, 96) and got.dtype == x.dtype
    relative = (got - expected).norm() / expected.norm()
    assert relative < 0.05, relative  # weight and activation rounding (plus a bf16 output)
    assert torch.allclose(fp8(torch.zeros(1, 256)), linear.bias.detach().to(torch.bfloat16).float(), atol=1e-2)


def test_fp8_weight_round_trip_keeps_every_row_to_3_mantissa_bits() -> None:
    """Per-channel scales: rows 6 decades apart all keep e4m3's relative precision.

    One scale for the whole tensor would flush the smallest rows to zero (their values would sit
    below e4m3's smallest subnormal, 2^-9 of the scale unit).
    """
    torch.manual_seed(0)
    weight = torch.randn(24, 128) * torch.logspace(-4, 2, 24)[:, None]  # [out, in]
    linear = nn.Linear(128, 24, bias=False)
    linear.weight.data.copy_(weight)
    fp8 = Fp8Linear.from_linear(linear)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight_scale.shape == (1, 24)
    # each row's absmax maps to e4m3's largest finite value, so nothing saturates
    assert torch.equal(fp8.weight.float().abs().amax(dim=1), torch.full((24,), FP8_MAX))
    restored = fp8.dequantized_weight()
    # round to nearest with 3 mantissa bits: within 1/16 relative; subnormals: half their 2^-9 step
    scale = fp8.weight_scale.t()  # [out, 1]
    assert ((restored - weight).abs() <= weight.abs() / 16 + scale * 2**-10).all()
    row_error = (restored - weight).norm(dim=1) / weight.norm(dim=1)
    assert (row_error < 0.04).all(), row_error  # RMS of the rounding error, 2^-4 / sqrt(3) = 0.036 at worst


@pytest.fixture(scope="module")
def fp32_model(tiny_checkpoint: Path) -> NVLMEngine:
    return NVLMEngine.from_pretrained(tiny_checkpoint, device_map="cpu", dtype="float32")


def _load_quantized(folder: Path) -> tuple[NVLMModel, QuantizingLoader]:
    """The engine's loading path (stage, swap after each shard) with the CPU as the FP8 device."""
    infos = read_tensor_infos(find_weight_files(folder))
    config = infer_dummy_heads(NVLMConfig.from_folder(folder), infos)
    with torch.device("meta"):
        model = NVLMModel(config)
    check_tensors(model, infos)
    loader = QuantizingLoader(model, get_scheme("fp8"), lambda name: torch.device("cpu"), torch.float32)
    shards_seen = []

    def after_shard(shard: Path, number: int, count: int) -> None:
        loader.quantize_loaded()
        shards_seen.append(loader.quantized)

    fill_model(model, infos, device_of=loader.device_of, dtype=torch.float32, progress=after_shard)
    loader.finish()
    from nvlm_engine.loading import _rebuild_rotary

    _rebuild_rotary(model, torch.device("cpu"))
    model.prepare_for_inference()
    assert shards_seen[0] < shards_seen[-1]  # linears are swapped as their shards complete
    return model, loader


def test_quantize_while_loading_swaps_only_decoder_linears(tiny_checkpoint: Path, fp32_model: NVLMEngine) -> None:
    model, loader = _load_quantized(tiny_checkpoint)
    layers = model.config.llm.num_hidden_layers
    assert loader.quantized == 7 * layers and not loader.pending
    swapped = [n for n, m in model.named_modules() if isinstance(m, Fp8Linear)]
    assert len(swapped) == 7 * layers and all(is_quantized_module(n) for n in swapped)
    assert isinstance(model.language_model.lm_head, nn.Linear) and model.language_model.lm_head.weight.dtype == torch.float32
    assert isinstance(model.mlp1[1], nn.Linear) and isinstance(model.vision_model.encoder.layers[0].mlp.fc1, nn.Linear)

    engine = fp32_model
    request = engine.prepare([{"role": "user", "content": "Describe the weather."}])
    full, _, _ = prefill(engine.model, [request], engine.token_ids)
    quantized, _, _ = prefill(model, [request], engine.token_ids)
    similarity = F.cosine_similarity(full, quantized).item()
    assert similarity > 0.99, similarity


def test_planner_sizes_equal_the_quantized_tensors(tiny_checkpoint: Path, fp32_model: NVLMEngine) -> None:
    model, _ = _load_quantized(tiny_checkpoint)
    with torch.device("meta"):
        reference = NVLMModel(model.config)
    footprint = Footprint.from_model(reference, dtype=torch.float32, quantization=get_scheme("fp8"))
    for i in range(model.config.llm.num_hidden_layers):
        layer = model.language_model.model.layers[i]
        actual = sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()])
        assert actual == footprint.unit_bytes[layer_unit(i)]


def test_quantize_model_in_memory(fp32_model: NVLMEngine, tiny_checkpoint: Path) -> None:
    fresh = NVLMEngine.from_pretrained(tiny_checkpoint, device_map="cpu", dtype="float32")
    assert quantize_model(fresh.model, get_scheme("fp8"), torch.float32) == 7 * fresh.config.llm.num_hidden_layers
    result = fresh.generate([{"role": "user", "content": "hi"}], max_new_tokens=3)
    assert result.usage.completion_tokens <= 3


# --- real GPUs ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scheme", ["bnb-8bit", "bnb-4bit", "fp8"])
def test_quantized_engine_on_gpu(tiny_checkpoint: Path, scheme: str) -> None:
    if get_scheme(scheme).uses_bitsandbytes and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed (pip install 'nvlm-langchain[quant]')")
    if torch.cuda.get_device_capability() < get_scheme(scheme).min_capability:
        pytest.skip(f"{scheme} needs a newer GPU")
    full = NVLMEngine.from_pretrained(tiny_checkpoint, device_map="cuda:0", dtype="bfloat16")
    quantized = NVLMEngine.from_pretrained(tiny_checkpoint, device_map="cuda:0", dtype="bfloat16", quantization=scheme)
    request = full.prepare([{"role": "user", "content": "Describe the weather."}])
    a, _, _ = prefill(full.model, [request], full.token_ids)
    b, _, _ = prefill(quantized.model, [request], quantized.token_ids)
    assert F.cosine_similarity(a, b).item() > 0.98
