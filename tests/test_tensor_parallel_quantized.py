"""Tensor parallelism with quantized decoder linears: bnb-8bit and bnb-4bit (NF4) at TP=2 on the CPU.

Each rank quantizes its own shard of each decoder linear as it reads it (`tensor_parallel.py`,
"Shards, quantized"). Tested here through `NVLMEngine.from_pretrained(..., tensor_parallel=2,
quantization=...)` with gloo on the CPU, where bitsandbytes 0.50+ runs both schemes:

- every decoder linear on every rank is bitsandbytes' module (workers report their classes),
  and each rank's resident bytes are exactly what the planner sizes its shard as, about half
  of one process's quantized layers;
- prefill logits stay within the one-process quantized engine's bound of fp32, and within a
  stated bound of the one-process quantized engine, and the engine generates;
- FP8 shards through the same path, with the CUDA check bypassed (`torch._scaled_mm` runs on
  the CPU, as the one-process FP8 tests use it);
- what the kernels cannot run is refused before any process starts: FP8 without CUDA, NF4 shards
  whose output rows bitsandbytes' CPU kernel cannot pack.

The checkpoint is tiny (2 layers, width 128, 4 query and 2 KV heads of 32): every TP=2 shard
has output rows in multiples of 32, which bitsandbytes' CPU NF4 kernel needs.
"""

from __future__ import annotations

import importlib.util
import math
import multiprocessing
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from shared_paths import REAL_72B

from nvlm_engine import NVLMEngine, loading, quantization
from nvlm_engine.checkpoint import find_weight_files, read_tensor_infos
from nvlm_engine.decoder import prefill_chunk
from nvlm_engine.errors import TensorParallelOptionsError
from nvlm_engine.placement_sizes import Footprint
from nvlm_engine.quantization import QuantizationError, get_scheme, is_quantized_module
from nvlm_engine.tensor_parallel import LAYER_PREFIX, shard_shape, split_dim, tensor_bytes
from nvlm_engine.testing import build_tiny_checkpoint, tiny_config

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="bitsandbytes is not installed: pip install 'nvlm-langchain[quant]' to run the quantized TP tests",
)

SCHEMES = ["bnb-8bit", "bnb-4bit"]
KIND = {"bnb-8bit": "Linear8bitLt", "bnb-4bit": "Linear4bit", "fp8": "Fp8Linear"}
PROMPT = [{"role": "user", "content": "Describe the weather in Paris today, briefly."}]

# Relative error of the last-position logits, ||a - b|| / ||b||, as in tests/test_quantization.py:
# per quantized linear LLM.int8() errs by at most 1/127 of a row's absmax (x 1.5 for its float16
# activations), NF4 by about 0.1 of the weights' spread; independent errors of the 7 * layers
# linears add in quadrature. Against fp32 the TP=2 engine keeps that bound: a row-parallel shard's
# scale is the absmax of fewer values, never larger than the whole row's, so no shard rounds
# coarser than one process does (FP8: 3 mantissa bits, 1/16).
# Against the one-process quantized engine only the differently rounded linears count, each with
# two independent roundings (sqrt 2): for bnb-8bit the 2 row-parallel linears per layer, whose
# weights and activations (LLM.int8() rounds both per row, here over the shard's columns) differ
# (sqrt 2 again), while column shards hold whole rows: the same int8 values and scales. For NF4
# with shards of whole 64-blocks (this checkpoint) the 4-bit codes are the same; each shard's
# double-quantized block statistics (8-bit, an offset of its own) differ, in all 7 linears.
PER_LINEAR_ERROR = {"bnb-8bit": 1.5 / 127, "bnb-4bit": 0.1, "fp8": 1 / 16}
DIFFERING_ROUNDINGS = {"bnb-8bit": 2 * 2 * 2, "bnb-4bit": 7 * 2}  # per layer
PER_ROUNDING_ERROR = {"bnb-8bit": 1.5 / 127, "bnb-4bit": 1.5 / 127}  # int8 weights / 8-bit statistics


def fp32_bound(scheme: str, layers: int) -> float:
    return math.sqrt(len(quantization.QUANTIZED_LINEARS) * layers) * PER_LINEAR_ERROR[scheme]


def one_process_bound(scheme: str, layers: int) -> float:
    return math.sqrt(DIFFERING_ROUNDINGS[scheme] * layers) * PER_ROUNDING_ERROR[scheme]


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = REAL_72B if (REAL_72B / "vocab.json").is_file() else None
    config = tiny_config(llm_width=128, llm_heads=4, llm_kv_heads=2)  # head_dim 32: k/v shards of 32 rows
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-tp-quant"), config=config, tokenizer_from=source)


@pytest.fixture(scope="module")
def fp32(checkpoint: Path) -> NVLMEngine:
    return NVLMEngine.from_pretrained(checkpoint, device_map="cpu", dtype="float32", progress=False)


@pytest.fixture(scope="module")
def loaded(checkpoint: Path) -> Iterator[dict]:
    """Per scheme: the one-process and the TP=2 quantized engines, and what each rank held right after
    loading (bitsandbytes' CPU NF4 kernel repacks its statistics at the first call)."""
    engines: dict[str, dict] = {}

    def load(scheme: str) -> dict:
        if scheme not in engines:
            one = NVLMEngine.from_pretrained(checkpoint, device_map="cpu", dtype="float32", progress=False,
                                             quantization=scheme)
            tp2 = NVLMEngine.from_pretrained(checkpoint, device_map="cpu", dtype="float32", progress=False,
                                             quantization=scheme, tensor_parallel=2)
            (worker,) = tp2.model.tp_link.worker_stats()
            rank0 = {n: type(m).__name__ for n, m in tp2.model.named_modules() if is_quantized_module(n)}
            engines[scheme] = {"one": one, "tp2": tp2, "one_bytes": tensor_bytes(one.model),
                               "rank_bytes": [tensor_bytes(tp2.model), worker["weights"]],
                               "rank_linears": [rank0, worker["linears"]]}
        return engines[scheme]

    yield load
    for entry in engines.values():
        entry["tp2"].close()


@torch.inference_mode()
def prompt_logits(engine: NVLMEngine) -> torch.Tensor:
    """The last prompt position's logits [1, V] through the engine's own decoder (all ranks when TP)."""
    ids = torch.tensor([engine.prepare(PROMPT, max_new_tokens=1).prompt_ids])  # [1, S]
    kv = engine.new_core().kv
    kv.ensure(1, ids.shape[1] + 8)
    embeds = engine.model.embed(ids, None, engine.token_ids.image)  # [1, S, hidden]
    return prefill_chunk(engine.model, kv, 0, embeds, 0)


def layer_shapes(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    return {n: tuple(i.shape) for n, i in read_tensor_infos(find_weight_files(checkpoint)).items()
            if n.startswith(LAYER_PREFIX)}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_rank_quantizes_its_shards(checkpoint: Path, loaded, scheme: str) -> None:
    entry = loaded(scheme)
    config = entry["one"].config
    footprint = Footprint.from_model(entry["one"].model, dtype=torch.float32, quantization=get_scheme(scheme))
    shapes = layer_shapes(checkpoint)
    for rank, (linears, held) in enumerate(zip(entry["rank_linears"], entry["rank_bytes"], strict=True)):
        # every decoder linear of every rank is bitsandbytes' module
        assert len(linears) == 7 * config.llm.num_hidden_layers, rank
        assert set(linears.values()) == {KIND[scheme]}, (rank, linears)
        # each layer tensor takes exactly what the planner sizes its shard as (quantized weights
        # with their statistics, biases and norms in fp32)
        for name, shape in shapes.items():
            assert held[name] == footprint.tensor_size(name, shard_shape(name, shape, 2)), (rank, name)
    # about half of one process's quantized layers each: the shards of the split tensors add up to
    # the whole, apart from what every shard stores once (row-parallel shards' per-row scales; NF4's
    # code tables and nested statistics) and the norms every rank holds
    one = sum(b for n, b in entry["one_bytes"].items() if n.startswith(LAYER_PREFIX))
    ranks = [sum(b for n, b in held.items() if n.startswith(LAYER_PREFIX)) for held in entry["rank_bytes"]]
    assert ranks[0] == ranks[1]
    per_shard = {"bnb-8bit": 0, "bnb-4bit": 4 * 256 + 4 * 16 + 4}[scheme]
    row_scales = {"bnb-8bit": 4, "bnb-4bit": 0}[scheme]
    extra = 0
    for name, shape in shapes.items():
        if quantization.is_quantized_weight(name):
            extra += per_shard + (row_scales * shape[0] if split_dim(name) == 1 else 0)
        elif split_dim(name) is None:
            extra += 4 * math.prod(shape)  # an fp32 norm, held whole by both ranks
    if scheme == "bnb-8bit":
        assert sum(ranks) == one + extra
    else:  # NF4's block statistics round up per shard: a few bytes more
        assert one + extra <= sum(ranks) <= one + extra + 16 * len(shapes)
    assert abs(ranks[0] - one / 2) <= extra


@pytest.mark.parametrize("scheme", SCHEMES)
def test_logits_stay_close_and_it_generates(fp32: NVLMEngine, loaded, scheme: str) -> None:
    entry = loaded(scheme)
    one, tp2 = entry["one"], entry["tp2"]
    layers = one.config.llm.num_hidden_layers
    full, single, sharded = prompt_logits(fp32), prompt_logits(one), prompt_logits(tp2)
    to_fp32, to_one = relative_error(sharded, full), relative_error(sharded, single)
    assert 0 < to_fp32 < fp32_bound(scheme, layers), (to_fp32, fp32_bound(scheme, layers))
    assert 0 < to_one < one_process_bound(scheme, layers), (to_one, one_process_bound(scheme, layers))
    result = tp2.generate(PROMPT, max_new_tokens=6)
    assert 0 < result.usage.completion_tokens <= 6 and result.token_ids


def test_fp8_shards_through_the_same_path(checkpoint: Path, fp32: NVLMEngine,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """FP8 on CUDA 8.9+ only; `torch._scaled_mm` runs on the CPU, so bypass rank 0's capability check."""
    monkeypatch.setattr(loading, "check_runtime", lambda scheme, devices: None)
    engine = NVLMEngine.from_pretrained(checkpoint, device_map="cpu", dtype="float32", progress=False,
                                        quantization="fp8", tensor_parallel=2)
    try:
        (worker,) = engine.model.tp_link.worker_stats()
        assert set(worker["linears"].values()) == {"Fp8Linear"} and len(worker["linears"]) == 14
        error = relative_error(prompt_logits(engine), prompt_logits(fp32))
        assert 0 < error < fp32_bound("fp8", 2), error
    finally:
        engine.close()


def test_kernels_that_cannot_run_are_refused_before_any_process(tiny_checkpoint: Path) -> None:
    before = set(multiprocessing.active_children())
    if not torch.cuda.is_available():
        with pytest.raises(QuantizationError, match=r"compute capability 8\.9\+"):
            NVLMEngine.from_pretrained(tiny_checkpoint, device_map="cpu", quantization="fp8", tensor_parallel=2)
    # the session's tiny model has 2 KV heads of 16: a TP=2 k_proj shard has 16 rows
    with pytest.raises(QuantizationError, match=r"multiples of 32.*k_proj\.weight \[16, 64\]"):
        NVLMEngine.from_pretrained(tiny_checkpoint, device_map="cpu", quantization="bnb-4bit", tensor_parallel=2)
    with pytest.raises(TensorParallelOptionsError, match="vision_replicas"):
        NVLMEngine.from_pretrained(tiny_checkpoint, device_map="cpu", quantization="bnb-8bit", tensor_parallel=2,
                                   vision_replicas=True)
    assert set(multiprocessing.active_children()) == before
    assert get_scheme("nf4").name == "bnb-4bit"
