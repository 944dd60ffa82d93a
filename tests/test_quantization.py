"""Quantization of the decoder linears: typed refusals without CUDA, FP8 numerics, load-time swapping, sizes.

`torch._scaled_mm` (the FP8 matmul) also runs on the CPU, so the FP8 module and the
quantize-while-loading path are tested here for real; the engine itself refuses FP8 and
bitsandbytes without CUDA. bitsandbytes' own modules need a GPU and are exercised by the
`gpu`-marked test and `bench/gpu_check.py`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nvlm_engine import NVLMEngine
from nvlm_engine.checkpoint import check_tensors, fill_model, find_weight_files, infer_dummy_heads, read_tensor_infos
from nvlm_engine.config import NVLMConfig
from nvlm_engine.generation import prefill
from nvlm_engine.model import NVLMModel
from nvlm_engine.placement import Footprint, layer_unit
from nvlm_engine.quantization import (
    Fp8Linear,
    QuantizationError,
    QuantizingLoader,
    get_scheme,
    is_quantized_module,
    is_quantized_weight,
    quantize_model,
)

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")


def test_scheme_names() -> None:
    assert get_scheme(None) is None and get_scheme("none") is None
    assert get_scheme("NF4").name == "bnb-4bit" and get_scheme("int8").name == "bnb-8bit"
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
@pytest.mark.parametrize("scheme", ["bnb-8bit", "bnb-4bit", "fp8"])
def test_engine_refuses_quantization_without_cuda(tiny_checkpoint: Path, scheme: str) -> None:
    with pytest.raises(QuantizationError, match="needs an NVIDIA GPU with CUDA"):
        NVLMEngine.from_pretrained(tiny_checkpoint, device_map="cpu", quantization=scheme)


def test_refusals_name_what_is_missing(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With CUDA reported present: layers on the CPU, bitsandbytes absent, a pre-Hopper GPU for FP8."""
    from nvlm_engine.quantization import check_runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(QuantizationError, match="runs on CUDA GPUs only.*cpu"):
        check_runtime(get_scheme("fp8"), [torch.device("cpu")])
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(QuantizationError, match=r"pip install 'nvlm-langchain\[quant\]'"):
            check_runtime(get_scheme("bnb-4bit"), [torch.device("cuda", 0)])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(QuantizationError, match="compute capability 9.0.*use 'bnb-8bit'"):
        check_runtime(get_scheme("fp8"), [torch.device("cuda", 0)])


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
    from nvlm_engine.engine import _rebuild_rotary

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
