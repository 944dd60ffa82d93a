"""The tensor-parallel plan (`placement_tensor`) with the real NVLM-D-72B config and tensor index.

Pure planning on the `meta` device: no weights, no GPU. Expected sizes are worked out here from
the real config.json's dimensions and the tensor names in the real index, with the engine's
sharding rule written out below (not the planner's code); speeds from the same byte counts and
the datasheet bandwidth. The command line reads the real metadata folder itself (config.json
and index, no shards). Every printed command is checked to parse in `test_cli_plan.py`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from nvlm_engine import exit_codes
from nvlm_engine.cli import main
from nvlm_engine.config import NVLMConfig
from nvlm_engine.devices import GPU_PRESETS_MIB, parse_gpu_spec
from nvlm_engine.errors import TensorParallelOptionsError
from nvlm_engine.placement import GIB, DeviceSpec, Footprint, PlanError
from nvlm_engine.placement_tensor import (
    GPU_BANDWIDTH,
    choose_split,
    estimate_decode,
    plan_tensor_parallel,
)
from nvlm_engine.plan_report import Asked, run_command

CONTEXT = 32768
H, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB, N_LAYERS = 8192, 64, 8, 128, 29568, 152064, 80
# The stored shape of each decoder-layer tensor (config.json: hidden 8192, 64 query heads and 8 KV
# heads of 128, MLP 29568), and the engine's sharding: q/k/v (weights and biases) and gate/up split
# by output rows, o/down by input columns, the two norms whole on every rank.
LAYER_SHAPES = {
    "self_attn.q_proj.weight": (HEADS * HEAD_DIM, H), "self_attn.q_proj.bias": (HEADS * HEAD_DIM,),
    "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, H), "self_attn.k_proj.bias": (KV_HEADS * HEAD_DIM,),
    "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, H), "self_attn.v_proj.bias": (KV_HEADS * HEAD_DIM,),
    "self_attn.o_proj.weight": (H, HEADS * HEAD_DIM), "mlp.gate_proj.weight": (FFN, H), "mlp.up_proj.weight": (FFN, H),
    "mlp.down_proj.weight": (H, FFN), "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
}
SPLIT = {"self_attn.o_proj.weight": 1, "mlp.down_proj.weight": 1, "input_layernorm.weight": None,
         "post_attention_layernorm.weight": None}  # every other tensor: dim 0
# Rank 0's extras in bf16 (test_placement.py's PINNED_BF16): vision 6,052,672,640 + projector
# 620,717,056 + embed_tokens and lm_head 2 x 1,245,708,288 + final norm 8192 parameters, 2 bytes each.
PINNED_BF16 = 2 * (6_052_672_640 + 620_717_056 + 2 * 1_245_708_288 + 8192)
# Every other rank holds the vision tower and projector whole too (the tiles of a request are split across ranks).
VISION_BF16 = 2 * (6_052_672_640 + 620_717_056)
# By hand, TP=2 in bf16: a layer has 877,684,736 parameters, 16,384 of them in the norms; a rank
# holds half the rest and both norms: 438,850,560 per layer, x 80 layers x 2 bytes.
SHARE_TP2_BF16 = 70_216_089_600
KV_PER_TOKEN = 2 * KV_HEADS * HEAD_DIM * 2 * N_LAYERS  # k and v of 8 heads x 128 in bf16, 80 layers: 327,680


@pytest.fixture(scope="module")
def index(real_72b: Path) -> dict:
    return json.loads((real_72b / "model.safetensors.index.json").read_text())


@pytest.fixture(scope="module")
def footprint(index: dict, real_72b: Path) -> Footprint:
    return Footprint.from_config(NVLMConfig.from_folder(real_72b), names=list(index["weight_map"]),
                                 dtype=torch.bfloat16, stored_bytes=index["metadata"]["total_size"])


def shard_numel(suffix: str, tp: int) -> tuple[int, int]:
    """(rows, columns) of a rank's shard of a layer tensor (columns 1 for vectors)."""
    shape = LAYER_SHAPES[suffix]
    rows, cols = shape[0], shape[1] if len(shape) == 2 else 1
    dim = SPLIT.get(suffix, 0)
    if dim == 0:
        rows //= tp
    elif dim == 1:
        cols //= tp
    return rows, cols


def index_share(index: dict, tp: int, quantized_linear: bool = False) -> int:
    """A rank's bytes of the decoder layers, summed over the index's layer tensors.

    bf16: 2 bytes a value. `quantized_linear`: the 7 linear weights as int8 (or FP8) with one fp32
    scale per output row of the shard (bnb-8bit's SCB, fp8's row scale); biases and norms stay bf16.
    """
    total = 0
    for name in index["weight_map"]:
        match = re.fullmatch(r"language_model\.model\.layers\.\d+\.(.+)", name)
        if match is None:
            continue
        suffix = match.group(1)
        rows, cols = shard_numel(suffix, tp)
        linear = suffix.endswith("proj.weight")
        total += rows * cols + 4 * rows if quantized_linear and linear else 2 * rows * cols
    return total


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_rank_bytes_are_the_shares_of_the_index(footprint: Footprint, index: dict, tp: int) -> None:
    gpus = [DeviceSpec(f"cuda:{i}", 200 * GIB) for i in range(tp)]
    plan = plan_tensor_parallel(footprint, gpus, context_length=CONTEXT)
    share = index_share(index, tp)
    assert sum(1 for n in index["weight_map"] if n.startswith("language_model.model.layers.")) == 12 * N_LAYERS
    if tp == 2:
        assert share == SHARE_TP2_BF16  # the index and the hand count agree
    assert plan.layer_share_bytes == share
    assert plan.rank0_extra_bytes == PINNED_BF16
    assert plan.vision_bytes == VISION_BF16
    assert [r.weight_bytes for r in plan.ranks] == [share + PINNED_BF16] + [share + VISION_BF16] * (tp - 1)
    # the shards add up to the whole model, the norms and the vision tower and projector counted once
    norms = 2 * 2 * H * N_LAYERS
    assert sum(r.weight_bytes for r in plan.ranks) - (tp - 1) * (norms + VISION_BF16) == footprint.total_bytes
    vision_tensors = sum(1 for n in index["weight_map"] if n.startswith(("vision_model.", "mlp1.")))
    assert sum(r.tensor_count for r in plan.ranks) - (tp - 1) * (12 * N_LAYERS + vision_tensors) == len(
        index["weight_map"])
    assert [r.kv_bytes_per_token for r in plan.ranks] == [KV_PER_TOKEN // tp] * tp
    assert plan.ranks[0].modules[0] == "vision_model" and "lm_head" not in " ".join(plan.ranks[-1].modules)
    assert plan.ranks[-1].modules[:2] == ("vision_model", "mlp1")


@pytest.mark.parametrize("scheme", ["bnb-8bit", "fp8"])
def test_quantized_rank_shares(footprint: Footprint, index: dict, scheme: str) -> None:
    """A quantized linear's shard: int8/FP8 values plus one fp32 scale per row the rank holds."""
    gpus = [DeviceSpec(f"cuda:{i}", 200 * GIB, "H200", (9, 0)) for i in range(4)]
    plan = plan_tensor_parallel(footprint.resized(quantization=scheme), gpus, context_length=CONTEXT)
    assert plan.layer_share_bytes == index_share(index, 4, quantized_linear=True)
    assert plan.ranks[0].weight_bytes == plan.layer_share_bytes + PINNED_BF16


def test_memory_budgets_and_kv_room_are_honoured(footprint: Footprint) -> None:
    """Every rank must hold its weights, reserves and the KV cache of context x batch within its budget."""
    overhead, activation, batch = 2 * GIB, 3 * GIB, 2
    kv = KV_PER_TOKEN // 2 * CONTEXT * batch
    need0 = SHARE_TP2_BF16 + PINNED_BF16 + overhead + activation + kv
    settings = {"context_length": CONTEXT, "batch_size": batch, "overhead_bytes": overhead,
                "activation_bytes": activation}
    plan = plan_tensor_parallel(footprint, [DeviceSpec("cuda:0", need0), DeviceSpec("cuda:1", need0)], **settings)
    room1 = need0 - SHARE_TP2_BF16 - VISION_BF16 - overhead - activation
    assert plan.kv_tokens == (CONTEXT * batch, room1 // (KV_PER_TOKEN // 2))
    assert plan.max_context_tokens == CONTEXT
    with pytest.raises(PlanError) as failed:
        plan_tensor_parallel(footprint, [DeviceSpec("cuda:0", need0 - 1), DeviceSpec("cuda:1", need0 - 1)],
                             **settings)
    assert failed.value.shortfall_bytes == 1
    assert "rank 0 (cuda:0)" in str(failed.value) and "short by" in str(failed.value)


def test_two_h200_fits_in_bf16_and_is_chosen_as_faster(footprint: Footprint) -> None:
    choice = choose_split(footprint, parse_gpu_spec("2xH200"), context_length=CONTEXT)
    assert choice.tensor and choice.tp == 2 and choice.plan is not None
    assert all(r.used_bytes <= r.device.memory_bytes for r in choice.plan.ranks)
    # By hand: per token the layer split reads the 80 layers, the LM head, the final norm and one
    # embedding row, and a full cache, at one H200's 4.8 TB/s; the tensor split half the layers and
    # half the cache on each GPU at once, plus 2 x 80 all-reduces of 20 us.
    layers = 2 * 877_684_736 * N_LAYERS
    head = 2 * (VOCAB * H + H + H)
    cache = KV_PER_TOKEN * CONTEXT
    layer_speed = 4.8e12 / (layers + head + cache)
    tensor_speed = 1 / ((SHARE_TP2_BF16 + head + cache / 2) / 4.8e12 + 160 * 20e-6)
    assert choice.estimate is not None
    assert choice.estimate.layer_tokens_per_s == pytest.approx(layer_speed, rel=1e-9)
    assert choice.estimate.tensor_tokens_per_s == pytest.approx(tensor_speed, rel=1e-9)
    assert tensor_speed > layer_speed


def test_the_tensor_split_is_advised_only_when_faster(footprint: Footprint, monkeypatch: pytest.MonkeyPatch) -> None:
    from nvlm_engine import placement_tensor

    monkeypatch.setattr(placement_tensor, "ALL_REDUCE_LATENCY_S", 1e-3)  # 160 ms of all-reduces per token
    choice = choose_split(footprint, parse_gpu_spec("2xH200"), context_length=CONTEXT)
    assert choice.plan is not None and not choice.tensor
    assert choice.estimate is not None and choice.estimate.tensor_tokens_per_s is not None
    assert choice.estimate.tensor_tokens_per_s < choice.estimate.layer_tokens_per_s
    assert "layer split decodes as fast or faster" in choice.reason


def test_pcie_and_unknown_gpus_get_no_tensor_advice(footprint: Footprint) -> None:
    pcie = choose_split(footprint.resized(quantization="bnb-4bit"), parse_gpu_spec("4xL40S"), context_length=8192)
    assert not pcie.tensor
    unknown = estimate_decode(footprint, "80GB", tp=2, cache_tokens=CONTEXT)
    assert unknown is None
    l40s = estimate_decode(footprint, "L40S", tp=4, cache_tokens=CONTEXT)
    assert l40s is not None and l40s.tensor_tokens_per_s is None


@pytest.mark.parametrize(("gpus", "tp", "words"), [
    ("3xH200", None, "Use 2, 4 or 8"),
    ("3xH200", 3, "Use 2, 4 or 8"),
    ("2xH200", 4, "tensor_parallel=4 needs 4 GPUs, one per rank, and 2 are listed"),
    ("1xH200", None, "Use 2, 4 or 8"),
    ("H200,H100", 2, "the smallest GPU bounds them all"),
])
def test_invalid_sizes_and_unequal_gpus_are_typed_errors(footprint: Footprint, gpus: str, tp: int | None,
                                                         words: str) -> None:
    with pytest.raises(TensorParallelOptionsError, match=re.escape(words)):
        plan_tensor_parallel(footprint, parse_gpu_spec(gpus), tp=tp, context_length=CONTEXT)


def test_a_cpu_is_refused(footprint: Footprint) -> None:
    with pytest.raises(TensorParallelOptionsError, match="GPUs only"):
        plan_tensor_parallel(footprint, [DeviceSpec("cuda:0", 200 * GIB), DeviceSpec("cpu", 200 * GIB)],
                             context_length=CONTEXT)


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["plan", *args])
    return result.exit_code, result.output


def test_cli_per_rank_table(real_72b: Path) -> None:
    code, output = run(str(real_72b), "--gpus", "2xH200", "--tensor-parallel", "2")
    assert code == 0, output
    assert "2 x H200 (140.4 GiB), bfloat16, context 32,768 tokens x batch 1, tensor parallel 2" in output
    assert "KV cache 320 KiB per token, 160 KiB per rank" in output
    rows = [line.split() for line in output.splitlines() if line.startswith("cuda:")]
    assert [row[3] for row in rows] == [f"{(SHARE_TP2_BF16 + PINNED_BF16) / GIB:.1f}",
                                        f"{(SHARE_TP2_BF16 + VISION_BF16) / GIB:.1f}"]
    assert all(line.endswith("1/2 of layers 0-79 (80)") for line in output.splitlines() if line.startswith("cuda:"))
    assert "KV cache room per rank:" in output and "layer split ~31 tokens/s, tensor split ~51 tokens/s" in output
    assert f"Run it: nvlm-chat -m {real_72b} --tensor-parallel 2  # nvlm-serve takes the same flags" in output


def test_cli_unequal_gpus_keep_the_layer_split_and_say_why(real_72b: Path) -> None:
    code, output = run(str(real_72b), "--gpus", "H200,H100")
    assert code == 0, output
    assert "Layer split, not --tensor-parallel 2: The GPUs differ (H100 79.6 GiB, H200 140.4 GiB)" in output
    assert "the smallest GPU bounds them all" in output
    assert "--tensor-parallel" not in output.split("Run it:")[1]
    code, output = run(str(real_72b), "--gpus", "H200,H100", "-t", "2")
    assert code == exit_codes.USAGE and "smallest GPU bounds" in output and "Traceback" not in output


@pytest.mark.parametrize(("args", "words"), [
    (("--gpus", "3xH200", "-t", "3"), "Use 2, 4 or 8"),
    (("--gpus", "2xH200", "-t", "4"), "tensor_parallel=4 needs 4 GPUs"),
    (("--gpus", "2xH200", "-t", "2", "--cpu-offload", "100GiB"), "--cpu-offload belong(s) to the layer split"),
    (("--gpus", "2xH200", "-t", "2", "--split", "card"), "--split belong(s) to the layer split"),
])
def test_cli_invalid_tensor_parallel_exits_2(real_72b: Path, args: tuple[str, ...], words: str) -> None:
    code, output = run(str(real_72b), *args)
    assert code == exit_codes.USAGE, output
    assert words in output and "Traceback" not in output


def test_cli_tensor_split_that_does_not_fit_exits_5_with_the_layer_split(real_72b: Path) -> None:
    code, output = run(str(real_72b), "--gpus", "2xH100-NVL", "-t", "2")
    assert code == exit_codes.RESOURCES, output
    assert "rank 0 (cuda:0) needs" in output and "short by" in output
    m = str(real_72b)
    assert f"  nvlm-engine plan {m} --gpus 4xH100-NVL --tensor-parallel 4  # 4 GPUs (2 more of H100-NVL)" in output
    assert f"  nvlm-chat -m {m}  # the layer split fits these GPUs" in output


def test_quantization_with_tensor_parallel_is_advised_when_faster(real_72b: Path) -> None:
    """Every rank quantizes its own shards (tests/test_tensor_parallel_quantized.py), so the planner
    advises the quantized tensor split like the unquantized one, sized as the shards are stored."""
    code, output = run(str(real_72b), "--gpus", "2xH200", "-q", "bnb-8bit")
    assert code == 0, output
    assert "not yet supported" not in output.lower()
    assert (f"Run it: nvlm-chat -m {real_72b} --tensor-parallel 2 --quantization bnb-8bit  # the tensor split, "
            "faster") in output
    assert f"Or the layer split above: nvlm-chat -m {real_72b} --quantization bnb-8bit" in output
    assert "Tensor split (--tensor-parallel 2): fits, 32.7 GiB of the decoder layers per rank" in output
    code, output = run(str(real_72b), "--gpus", "4xH100", "-q", "bnb-8bit", "-t", "4")
    assert code == 0, output
    assert f"Run it: nvlm-chat -m {real_72b} --tensor-parallel 4 --quantization bnb-8bit  #" in output
    assert run_command(Asked(model="m", quantization="fp8"), tensor_parallel=2) == (
        "nvlm-chat -m m --tensor-parallel 2 --quantization fp8")


def test_the_engine_accepts_quantization_with_tensor_parallel(tiny_checkpoint: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """What the planner's advice relies on: `from_pretrained` passes the pair on to the ranks' loader
    (stopped there: loading the ranks is tests/test_tensor_parallel_quantized.py's)."""
    from nvlm_engine import NVLMEngine, tp_startup

    seen = {}

    def stop(*args: object, **kwargs: object) -> None:
        seen.update(kwargs)
        raise RuntimeError("stopped before starting the ranks")

    monkeypatch.setattr(tp_startup, "load_tensor_parallel", stop)
    with pytest.raises(RuntimeError, match="stopped"):
        NVLMEngine.from_pretrained(tiny_checkpoint, tensor_parallel=2, quantization="bnb-8bit", device_map="cpu")
    assert seen["tp"] == 2 and seen["quantization"].name == "bnb-8bit"


def test_every_named_gpu_has_a_bandwidth() -> None:
    assert set(GPU_BANDWIDTH) == set(GPU_PRESETS_MIB)
