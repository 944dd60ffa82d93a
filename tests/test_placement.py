"""The placement planner with the real NVLM-D-72B config and tensor index, on the `meta` device.

Pure planning: no weights, no GPU. The sizes come from the model built on `meta` (shapes) and
the published index (names); the checks are the model card's rules (SPEC section 8), balance,
accounting of every tensor, and the typed failure with suggestions. The expected sizes are
numbers worked out by hand from the real config.json, not the byte formulas under test.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from nvlm_engine.config import NVLMConfig
from nvlm_engine.devices import DeviceMapError, parse_gpu_spec, resolve_placement
from nvlm_engine.model import NVLMModel
from nvlm_engine.placement import (
    FIRST_DEVICE_MODULES,
    GIB,
    DeviceSpec,
    Footprint,
    Plan,
    PlanError,
    _apportion,
    layer_unit,
    plan_placement,
    unit_of,
)
from nvlm_engine.quantization import get_scheme, is_quantized_weight

CONTEXT = 32768
N_LAYERS = 80

# Parameter counts from the real config.json: hidden 8192, intermediate 29568, 64 query and 8 KV
# heads of 128, vocabulary 152064, untied LM head; projector LayerNorm(12800) -> 12800x29568 ->
# 29568x8192; InternViT-6B with 45 layers of width 3200, stored with 25 real + 7 dummy heads.
# One decoder layer: q, o 8192x8192; k, v 1024x8192; gate, up 29568x8192; down 8192x29568
# (877,658,112) plus q/k/v biases (8192 + 1024 + 1024) and two RMSNorms of 8192 (26,624).
LAYER_PARAMS = 877_684_736
LAYER_ROWS = 85_760  # output rows of those 7 linears: 8192 + 1024 + 1024 + 8192 + 29568 + 29568 + 8192
EMBED_PARAMS = 1_245_708_288  # 152064 x 8192: embed_tokens, and lm_head again
PROJECTOR_PARAMS = 620_717_056  # 2 x 12800 + 12800 x 29568 + 29568 x 8192
VISION_PARAMS = 6_052_672_640  # 45 layers of 134,388,992 + patch/class/position embeddings 5,168,000
MODEL_PARAMS = 79_379_593_344  # 80 layers + 2 embeddings + final norm (8192) + projector + vision
PINNED_BF16 = 18_329_628_928  # vision, projector, embeddings, final norm, LM head in bf16: 17.1 GiB
KV_PER_TOKEN_PER_LAYER = 4096  # k and v, 8 heads x 128, 2 bytes


@pytest.fixture(scope="module")
def index(real_72b: Path) -> dict:
    return json.loads((real_72b / "model.safetensors.index.json").read_text())


@pytest.fixture(scope="module")
def config(real_72b: Path) -> NVLMConfig:
    return NVLMConfig.from_folder(real_72b)


@pytest.fixture(scope="module")
def footprint(index: dict, config: NVLMConfig) -> Footprint:
    return Footprint.from_config(config, names=list(index["weight_map"]), dtype=torch.bfloat16,
                                 stored_bytes=index["metadata"]["total_size"])


def check_rules(plan: Plan, footprint: Footprint, index: dict) -> None:
    """SPEC section 8 pins, whole ordered layers, balance within one layer, every tensor placed once."""
    first = plan.devices[0].device.name
    for unit in (*FIRST_DEVICE_MODULES, layer_unit(N_LAYERS - 1)):
        assert plan.assignments[unit] == first, unit
    # every tensor of the index is placed exactly once, and the bytes add up: the pinned modules
    # and the device's decoder layers, in bf16
    names = list(index["weight_map"])
    assert all(unit_of(n) in plan.assignments for n in names)
    assert sum(d.tensor_count for d in plan.devices) == len(names) == 1556
    for k, d in enumerate(plan.devices):
        assert d.weight_bytes == (PINNED_BF16 if k == 0 else 0) + len(d.layers) * 2 * LAYER_PARAMS, d.device.name
    assert sum(d.weight_bytes for d in plan.devices) == 2 * MODEL_PARAMS
    # layers in order: device 0 takes 0..k and the last one, each next device the following run
    order = [i for d in plan.devices for i in d.layers if i != N_LAYERS - 1]
    assert order == list(range(N_LAYERS - 1))
    # balance: each device within one layer of its ideal share (memory, the first counted half)
    weights = [d.device.memory_bytes * (plan.first_device_share if k == 0 else 1) for k, d in enumerate(plan.devices)]
    for d, w in zip(plan.devices, weights):
        ideal = N_LAYERS * w / sum(weights)
        assert abs(len(d.layers) - ideal) < 1, (d.device.name, len(d.layers), ideal)
    for d in plan.devices:
        assert d.used_bytes <= d.device.memory_bytes
        assert d.kv_bytes == len(d.layers) * KV_PER_TOKEN_PER_LAYER * plan.context_length


# --- sizes -------------------------------------------------------------------------------


def test_sizes_come_from_real_shapes_in_the_compute_dtype(footprint: Footprint, index: dict) -> None:
    assert MODEL_PARAMS == N_LAYERS * LAYER_PARAMS + 2 * EMBED_PARAMS + 8192 + PROJECTOR_PARAMS + VISION_PARAMS
    assert PINNED_BF16 == 2 * (VISION_PARAMS + PROJECTOR_PARAMS + 2 * EMBED_PARAMS + 8192)
    # The checkpoint stores some tensors wider than bf16 (176.9 GB on disk); loaded they are cast.
    assert footprint.total_bytes == 2 * MODEL_PARAMS
    assert index["metadata"]["total_size"] > footprint.total_bytes
    assert 147 * GIB < footprint.total_bytes < 149 * GIB
    units = footprint.unit_bytes
    assert units["vision_model"] == 2 * VISION_PARAMS  # 25 real + 7 dummy heads, as loaded
    assert units["mlp1"] == 2 * PROJECTOR_PARAMS
    assert units["language_model.model.embed_tokens"] == units["language_model.lm_head"] == 2 * EMBED_PARAMS
    assert units["language_model.model.norm"] == 2 * 8192
    assert units["language_model.model.rotary_emb"] == 0  # computed, not stored
    assert [units[layer_unit(i)] for i in range(N_LAYERS)] == [2 * LAYER_PARAMS] * N_LAYERS
    assert footprint.resized(dtype=torch.float32).total_bytes == 4 * MODEL_PARAMS
    # KV cache: 2 (k, v) x 80 layers x 8 kv heads x 128 x 2 bytes = 320 KiB per token; 10 GiB at 32k
    assert footprint.kv_bytes_per_token == 327_680
    assert footprint.kv_bytes_per_token * CONTEXT == 10 * GIB


# One decoder layer quantized: its 7 linear weights (877,658,112 values, 85,760 output rows) in
# the scheme's format, its biases and norms (26,624 values) still in bf16 (53,248 bytes).
NF4_LAYER_BYTES = (
    438_829_056  # two 4-bit values per byte
    + 13_713_408  # one uint8 absmax per 64-value block
    + 214_272  # one fp32 absmax per 256 blocks, per linear (7 of them)
    + 7 * (4 * 256 + 4 * 16 + 4)  # per linear: nested fp32 code, NF4 code, offset
    + 53_248
)


@pytest.mark.parametrize(("scheme", "layer_bytes"), [
    ("bnb-8bit", 877_658_112 + 4 * LAYER_ROWS + 53_248),  # int8 values + one fp32 absmax per row
    ("fp8", 877_658_112 + 4 * LAYER_ROWS + 53_248),  # e4m3 values + one fp32 scale per row
    ("bnb-4bit", NF4_LAYER_BYTES),
])
def test_quantized_sizes(footprint: Footprint, scheme: str, layer_bytes: int) -> None:
    quantized = footprint.resized(quantization=scheme)
    assert len([n for n in footprint.shapes if is_quantized_weight(n)]) == 7 * N_LAYERS
    assert [quantized.unit_bytes[layer_unit(i)] for i in range(N_LAYERS)] == [layer_bytes] * N_LAYERS
    # nothing else changes: vision tower, projector, embeddings, norm and LM head stay in bf16
    assert all(quantized.unit_bytes[u] == footprint.unit_bytes[u] for u in FIRST_DEVICE_MODULES)
    assert quantized.total_bytes == PINNED_BF16 + N_LAYERS * layer_bytes


def test_scheme_byte_formulas() -> None:
    out, inp = 29568, 8192
    assert get_scheme("bnb-8bit").linear_bytes(out, inp) == out * inp + 4 * out  # int8 + fp32 row absmax
    assert get_scheme("fp8").linear_bytes(out, inp) == out * inp + 4 * out  # e4m3 + fp32 row scale
    n, blocks = out * inp, out * inp // 64
    assert get_scheme("bnb-4bit").linear_bytes(out, inp) == n // 2 + blocks + 4 * math.ceil(blocks / 256) + 1024 + 64 + 4


# --- plans that fit ----------------------------------------------------------------------


@pytest.mark.parametrize("gpus", ["2xH200", "4xA100-80GB", "8xA100-40GB", "3x80GB"])
def test_plans_that_fit(footprint: Footprint, index: dict, gpus: str) -> None:
    plan = plan_placement(footprint, parse_gpu_spec(gpus), context_length=CONTEXT)
    check_rules(plan, footprint, index)
    assert plan.max_context_tokens is not None and plan.max_context_tokens >= CONTEXT
    assert plan.device_map()[""] == torch.device("cuda", 0)


def test_two_h200_split(footprint: Footprint, index: dict) -> None:
    plan = plan_placement(footprint, parse_gpu_spec("2xH200"), context_length=CONTEXT)
    first, second = plan.devices
    # ideal 80 x 0.5/1.5 = 26.7 layers on the first GPU (it also holds 17 GiB of vision, embeddings, head)
    assert len(first.layers) == 27 and len(second.layers) == 53
    assert first.layers == (*range(26), 79) and second.layers == tuple(range(26, 79))
    assert first.tensor_count + second.tensor_count == len(index["weight_map"])


def test_heterogeneous_gpus_and_explicit_budgets(footprint: Footprint, index: dict) -> None:
    plan = plan_placement(footprint, parse_gpu_spec("H200,H200,80GB"), context_length=CONTEXT)
    check_rules(plan, footprint, index)  # shares by memory: 19.3 / 38.6 / 22.1 layers
    # When a device's share does not fit, it is filled to capacity and the others take the rest.
    plan = plan_placement(footprint, parse_gpu_spec("H200,80GB"), context_length=CONTEXT)
    h200, a100 = plan.devices
    layer = 2 * LAYER_PARAMS + KV_PER_TOKEN_PER_LAYER * CONTEXT
    assert a100.device.memory_bytes - a100.used_bytes < layer < h200.device.memory_bytes - h200.used_bytes
    assert len(h200.layers) + len(a100.layers) == N_LAYERS
    # A smaller budget on a device (max_memory) gives it fewer layers; a full device spills to the others.
    big = [DeviceSpec("cuda:0", 80 * GIB), DeviceSpec("cuda:1", 80 * GIB), DeviceSpec("cuda:2", 40 * GIB)]
    plan = plan_placement(footprint, big, context_length=CONTEXT)
    counts = [len(d.layers) for d in plan.devices]
    assert sum(counts) == N_LAYERS and counts[2] < counts[1]
    assert all(d.used_bytes <= d.device.memory_bytes for d in plan.devices)


def test_first_device_share(footprint: Footprint) -> None:
    gpus = parse_gpu_spec("4xH200")
    even = plan_placement(footprint, gpus, context_length=CONTEXT, first_device_share=1.0)
    assert [len(d.layers) for d in even.devices] == [20, 20, 20, 20]
    minimal = plan_placement(footprint, gpus, context_length=CONTEXT, first_device_share=0.0)
    assert minimal.devices[0].layers == (79,)


def test_one_h200_fits_only_quantized(footprint: Footprint, index: dict) -> None:
    h200 = parse_gpu_spec("1xH200")
    with pytest.raises(PlanError):
        plan_placement(footprint, h200, context_length=CONTEXT)
    for scheme in ("fp8", "bnb-4bit"):
        plan = plan_placement(footprint.resized(quantization=scheme), h200, context_length=CONTEXT)
        assert plan.devices[0].layers == tuple(range(N_LAYERS))
        assert sum(d.tensor_count for d in plan.devices) == len(index["weight_map"])


def test_cpu_offload_only_when_listed_and_with_a_warning(footprint: Footprint) -> None:
    gpus = parse_gpu_spec("2xA100-80GB")
    with pytest.raises(PlanError):
        plan_placement(footprint, gpus, context_length=CONTEXT)
    plan = plan_placement(footprint, [*gpus, DeviceSpec("cpu", 256 * GIB)], context_length=CONTEXT)
    cpu = plan.devices[-1]
    assert cpu.device.name == "cpu" and cpu.layers and max(cpu.layers) == 78
    assert plan.assignments["language_model.lm_head"] == "cuda:0"
    assert plan.warnings and "slower" in plan.warnings[0]


# --- plans that do not fit ---------------------------------------------------------------


def test_two_a100_80gb_in_bf16_fails_with_shortfall_and_suggestions(footprint: Footprint) -> None:
    with pytest.raises(PlanError) as info:
        plan_placement(footprint, parse_gpu_spec("2xA100-80GB"), context_length=CONTEXT)
    error = info.value
    assert error.shortfall_bytes > 0 and error.required_bytes > error.available_bytes == 160 * GIB
    text = str(error)
    assert "short by" in text and "What would fit" in text
    assert any("3 GPUs" in s for s in error.suggestions)
    assert any("bnb-8bit" in s for s in error.suggestions) and any("bnb-4bit" in s for s in error.suggestions)
    shorter = [s for s in error.suggestions if s.startswith("context_length <=")]
    assert shorter
    # the suggested context really fits, and 1024 tokens more does not
    tokens = int(shorter[0].split("<=")[1].replace(",", ""))
    plan_placement(footprint, parse_gpu_spec("2xA100-80GB"), context_length=tokens)
    with pytest.raises(PlanError):
        plan_placement(footprint, parse_gpu_spec("2xA100-80GB"), context_length=tokens + 1024, suggest=False)


def test_first_device_too_small_for_the_pinned_modules(footprint: Footprint) -> None:
    with pytest.raises(PlanError, match="cannot hold what is pinned"):
        plan_placement(footprint, [DeviceSpec("cuda:0", 16 * GIB), *parse_gpu_spec("4xH200")[1:]], context_length=CONTEXT)


def test_invalid_inputs(footprint: Footprint) -> None:
    with pytest.raises(PlanError, match="List the GPUs first"):
        plan_placement(footprint, [DeviceSpec("cpu", 999 * GIB), DeviceSpec("cuda:0", 80 * GIB)], context_length=CONTEXT)
    with pytest.raises(PlanError, match="listed twice"):
        plan_placement(footprint, [DeviceSpec("cuda:0", 80 * GIB)] * 2, context_length=CONTEXT)
    with pytest.raises(PlanError, match="beyond"):
        plan_placement(footprint, parse_gpu_spec("8xH200"), context_length=200_000)
    with pytest.raises(PlanError, match="not a device"):
        DeviceSpec("gpu zero", GIB)


def test_index_that_does_not_match_the_config(index: dict, config: NVLMConfig) -> None:
    from nvlm_engine import CheckpointTensorError

    names = [n for n in index["weight_map"] if "layers.79." not in n] + ["language_model.extra.weight"]
    with pytest.raises(CheckpointTensorError, match="does not match config.json"):
        Footprint.from_config(config, names=names)


# --- pieces ------------------------------------------------------------------------------


def test_apportion_respects_caps_and_rounds_by_largest_remainder() -> None:
    assert _apportion(80, [0.5, 1.0], [100, 100]) == [27, 53]
    assert _apportion(80, [0.5, 1, 1, 1], [100] * 4) == [11, 23, 23, 23]
    assert _apportion(80, [0.5, 1, 1], [100, 30, 100]) == [17, 30, 33]  # a full device spills to the others
    assert _apportion(10, [1, 1, 1], [4, 4, 4]) == [4, 3, 3]  # ties go to the earlier device


@pytest.mark.parametrize(("spec", "expected"), [
    ("4x80GB", [80 * GIB] * 4),
    ("2xH200", [143771 * 2**20] * 2),
    ("80GB,80GB,40GB", [80 * GIB, 80 * GIB, 40 * GIB]),
    ("2xA100-80GB, 1 x l40s", [81920 * 2**20] * 2 + [46068 * 2**20]),
    ("nvidia-h100", [81559 * 2**20]),
])
def test_gpu_specs(spec: str, expected: list[int]) -> None:
    gpus = parse_gpu_spec(spec)
    assert [g.memory_bytes for g in gpus] == expected
    assert [g.name for g in gpus] == [f"cuda:{i}" for i in range(len(expected))]


@pytest.mark.parametrize("spec", ["", "4x", "80XB", "2xZ9000", "80GB,,40GB"])
def test_bad_gpu_specs(spec: str) -> None:
    with pytest.raises(DeviceMapError):
        parse_gpu_spec(spec)


def test_auto_placement_uses_free_memory_and_max_memory(config: NVLMConfig, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """`device_map="auto"` through the planner, with torch.cuda reporting four 80 GiB GPUs."""
    with torch.device("meta"):
        model = NVLMModel(config)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (79 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA A100-SXM4-80GB")
    placement = resolve_placement("auto", model, context_length=CONTEXT)
    assert placement.dtype == torch.bfloat16 and placement.plan is not None
    assert [d.device.memory_bytes for d in placement.plan.devices] == [79 * GIB] * 4
    assert placement.device_map["language_model.model.layers.79"] == torch.device("cuda", 0)
    # max_memory: only the GPUs listed, at those budgets; a "cpu" entry allows offload
    placement = resolve_placement("auto", model, context_length=CONTEXT, max_memory={0: "60GiB", 2: "80GiB", 3: "80GiB"})
    assert [(d.device.name, d.device.memory_bytes) for d in placement.plan.devices] == [
        ("cuda:0", 60 * GIB), ("cuda:2", 80 * GIB), ("cuda:3", 80 * GIB)]
    with caplog.at_level(logging.WARNING):
        placement = resolve_placement("auto", model, context_length=CONTEXT,
                                      max_memory={0: "70GiB", 1: "70GiB", "cpu": "200GiB"})
    assert placement.plan.devices[-1].device.name == "cpu"
    assert "slower" in caplog.text
    # quantized plans use the quantized sizes
    placement = resolve_placement(["cuda:0"], model, context_length=CONTEXT, quantization=get_scheme("bnb-4bit"))
    assert placement.plan.devices[0].weight_bytes < 55 * GIB


def test_vision_replicas_reserve_a_tower_on_every_gpu(footprint: Footprint) -> None:
    """Copies of the vision tower cost each other GPU the tower's weights; the plan lists where they go."""
    gpus = parse_gpu_spec("4xH200")
    plain = plan_placement(footprint, gpus, context_length=8192)
    copies = plan_placement(footprint, gpus, context_length=8192, vision_replicas=True)
    tower = footprint.unit_bytes["vision_model"] + footprint.unit_bytes["mlp1"]
    assert plain.vision_devices == ()
    assert copies.vision_devices == tuple(d.device.name for d in copies.devices) and len(copies.vision_devices) == 4
    for with_copy, without in zip(copies.devices[1:], plain.devices[1:]):
        layer_bytes = sum(footprint.unit_bytes[f"language_model.model.layers.{i}"] for i in with_copy.layers)
        assert with_copy.weight_bytes == layer_bytes + tower
        assert with_copy.activation_bytes >= without.activation_bytes  # it also runs the tower
    assert sum(len(d.layers) for d in copies.devices) == footprint.num_layers
