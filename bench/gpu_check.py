"""GPU check of the decode core (issue 12, item 7): one prepared script for one H200, at most 5 minutes.

    python bench/gpu_check.py [--budget-s 285] [--smoke]

Results go to `$OUT/gpu_check.json` (`$OUT` unset: ./gpu_check_out), rewritten after every step,
plus a printed summary. Each step runs in its own try/except: a failing step records its error
and the next one runs; a step that would overrun the time budget is skipped and says so.

Steps:
1. `environment`: GPU, torch, memory, compute capability.
2. `copy_bandwidth`: device-to-device copy of 2 GiB (read + write counted).
2b. `attention_kernels`: the decode step's attention at 72B head shapes (64 query heads, 8 KV
   heads, dim 128) as `decoder.py` calls it (boolean mask + `enable_gqa`) against the query
   heads of each KV group packed into the query axis (no KV copy), no mask, and repeated KV;
   which SDPA backends accept each form (a mask with `enable_gqa` is known to leave only the
   math kernel on CUDA), and a masked prefill chunk the same ways.
3. `build_slice`: a 72B-shaped slice of NVLM-D in random bf16 on the GPU: 20 full-width
   Qwen2-72B decoder layers, the embeddings, the LM head, the full InternViT-6B vision tower
   and the projector (config: /work/shared/nvlm-d-72b/config.json when present, else the
   published values, which `NVLMConfig()` defaults to). Built on the meta device and
   materialized on the GPU; the vision dummy heads are zero like the checkpoint's, so the
   engine drops them as it does after a real load.
4. `decode`: batch 1 at 2k and 16k tokens of context and batch 16 at 2k, through the engine's
   `DecodeCore` (context = random KV written into cache slots registered as cached prefixes, so
   no long prefill is needed): eager vs `DecodeSettings(compile=True)` (torch.compile
   fullgraph, mode "reduce-overhead": CUDA graphs), wall time and CUDA-event time per step; a
   hand-captured CUDA graph of eager `decoder.decode_step` gives the pure GPU time. Per-layer
   time from depths 20 and 4, projected to the 80-layer model, and the fraction of the
   H200's 4.8 TB/s (and of the measured copy bandwidth) a decoder layer achieves. The
   compile counters (graph breaks, recompiles, CUDA-graph skips) are recorded.
4b. `mixed_step`: batch 16 decoding at 2k context with a prompt chunk of 128, 512 or 2048
   tokens riding along in the same pass (`decoder.mixed_step`, what `DecodeCore.step` runs while
   a prompt prefills) against the decode step and the chunk as two passes: what a prefilling
   step costs the running streams (the inter-token gap) and what riding along saves.
5. `vision_prefill`: 7-tile image -> vision tower -> ~1.9k-token prefill: time to first token
   on cold caches and its parts, projected to 80 layers.
6. `turn2_prefix`: turn 2 of that conversation with the prefix cache (time to first token), and
   with prefix caching off but the image cache on.
7. `tp2_half_width`: the seven linears of one decoder layer at full width and at half width
   (tensor parallel 2, issue 13): a placeholder timing of weight reads only.
8. `fp8`: the slice's decoder linears quantized to FP8 (`quantization.Fp8Linear`), decode at
   batch 1 and 16 (2k context), eager vs compiled; skipped with the reason where the GPU
   lacks compute capability 8.9.

Without CUDA it exits 0 with a message. `--smoke` runs every step on the CPU with tiny shapes
(4 layers, width 64, fp32, the tiny tokenizer; compiled variants through dynamo with the eager
backend, no codegen) in
well under a minute, so the script cannot rot unnoticed (tests/test_bench_scripts.py runs it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REAL_CONFIG = Path("/work/shared/nvlm-d-72b")
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "B200": 8.0e12}  # bytes/s, HBM
STEPS = ("environment", "copy_bandwidth", "attention_kernels", "build_slice", "decode", "mixed_step", "vision_prefill",
         "turn2_prefix", "tp2_half_width", "fp8")


@dataclass
class Shape:
    """What the run uses: the real shapes on a GPU, tiny ones in smoke mode."""

    smoke: bool
    device: torch.device
    dtype: torch.dtype
    layers: int  # decoder layers in the slice
    shallow: int  # the second depth, for per-layer times
    cases: list[tuple[int, int]]  # (batch, context) of the decode step
    fp8_cases: list[tuple[int, int]]
    copy_bytes: int
    steps: int  # timed decode steps per measurement
    answer_tokens: int
    mixed_case: tuple[int, int] = (16, 2048)  # (batch, context) of the decode rows in `mixed_step`
    mixed_chunks: tuple[int, ...] = (128, 512, 2048)  # prompt tokens riding along


@dataclass
class Run:
    """Results, the clock and what the steps share."""

    shape: Shape
    out: Path
    budget_s: float
    started: float = field(default_factory=time.perf_counter)
    results: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")

    def step(self, name: str, fn: Callable[[Run, dict], None], *, need_s: float = 0.0) -> None:
        """Run one step; its figures (and sub-errors) land in results["steps"][name]."""
        record: dict = {"status": "ok", "figures": {}, "errors": []}
        self.results["steps"][name] = record
        start = time.perf_counter()
        if self.left() < need_s:
            record.update(status="skipped", reason=f"time budget: {self.left():.0f} s left, needs ~{need_s:.0f} s")
        else:
            try:
                fn(self, record)
            except Exception as e:  # noqa: BLE001 (record and go on: every other figure is worth having)
                record.update(status="error", error=f"{type(e).__name__}: {str(e)[:600]}",
                              traceback=traceback.format_exc(limit=6)[-2500:])
        record["seconds"] = round(time.perf_counter() - start, 2)
        gc.collect()  # the step's decode cores and their KV caches
        if self.shape.device.type == "cuda":
            torch.cuda.empty_cache()
            record["gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
            torch.cuda.reset_peak_memory_stats()
        self.save()
        print(f"[{name}] {record['status']} in {record['seconds']:.1f} s"
              + (f": {record.get('error') or record.get('reason')}" if record["status"] != "ok" else ""), flush=True)

    def attempt(self, record: dict, label: str, fn: Callable[[], object]) -> object:
        """A sub-measurement that may fail alone: its error is listed, the step goes on."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 (listed; the step's other figures stand)
            record["errors"].append(f"{label}: {type(e).__name__}: {str(e)[:400]}")
            return None


# --- timing ---------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loop(fn: Callable[[], object], n: int, device: torch.device) -> dict:
    """Per-call ms of `n` back-to-back calls: host wall clock, and CUDA-event time on the GPU."""
    sync(device)
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    if device.type == "cuda":
        end.record()
    sync(device)
    wall = (time.perf_counter() - start) * 1e3 / n
    event = begin.elapsed_time(end) / n if device.type == "cuda" else None
    return {"wall_ms": round(wall, 4), "event_ms": None if event is None else round(event, 4)}


# --- the model ------------------------------------------------------------------------------------


def real_config():
    from nvlm_engine.config import NVLMConfig

    if (REAL_CONFIG / "config.json").is_file():
        return NVLMConfig.from_folder(REAL_CONFIG), str(REAL_CONFIG / "config.json")
    return NVLMConfig(), "NVLMConfig() defaults (the published NVLM-D-72B values)"


def slice_config(shape: Shape):
    from nvlm_engine.config import LLMConfig, NVLMConfig, VisionConfig

    if shape.smoke:
        vision = VisionConfig(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=2)
        llm = LLMConfig(vocab_size=896, eos_token_id=895,  # the tiny tokenizer's vocabulary
                        hidden_size=64, intermediate_size=192, num_hidden_layers=shape.layers,
                        num_attention_heads=8, num_key_value_heads=1)
        return NVLMConfig(vision=vision, llm=llm), "tiny smoke config (LLM 64 wide, 8 heads / 1 KV head)"
    config, source = real_config()
    return replace(config, llm=replace(config.llm, num_hidden_layers=shape.layers)), source


def load_tokenizer_any(smoke: bool):
    from nvlm_engine.testing import write_tiny_tokenizer
    from nvlm_engine.tokenizer import load_tokenizer

    if not smoke and (REAL_CONFIG / "vocab.json").is_file():
        return load_tokenizer(REAL_CONFIG), "real"
    folder = Path(tempfile.mkdtemp(prefix="gpu-check-tok-"))
    write_tiny_tokenizer(folder)
    return load_tokenizer(folder), "tiny" + ("" if smoke else " (the real tokenizer files are absent)")


@torch.no_grad()
def random_fill(model: torch.nn.Module) -> None:
    """Random weights that keep activations O(1): N(0, 1/fan_in) matrices, unit norms, small biases."""
    for name, p in model.named_parameters():
        if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "mlp1.0.weight")):
            p.fill_(1.0)
        elif name.endswith(("ls1", "ls2")):
            p.fill_(0.1)
        elif name.endswith("bias"):
            p.zero_()
        elif p.dim() >= 2 and "embed" not in name and "position_embedding" not in name:
            fan_in = p[0].numel()
            p.normal_(0.0, fan_in**-0.5)
        else:
            p.normal_(0.0, 0.5)


def build_engine(run: Run, record: dict) -> None:
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    from nvlm_engine import NVLMEngine
    from nvlm_engine.cores import DecodeSettings
    from nvlm_engine.model import NVLMModel

    shape = run.shape
    config, source = slice_config(shape)
    tokenizer, tok = load_tokenizer_any(shape.smoke)
    start = time.perf_counter()
    with torch.device("meta"):
        model = NVLMModel(config, context_length=32768)
    model.to(shape.dtype)
    model.to_empty(device=shape.device)
    random_fill(model)
    with torch.no_grad():  # zero dummy heads, as in the checkpoint: the engine then drops them
        for layer in model.vision_model.encoder.layers:
            layer.attn.proj.weight[:, layer.attn.num_heads * layer.attn.head_dim :] = 0
    lm = model.language_model
    lm.model.rotary_emb = Qwen2RotaryEmbedding(config=lm.config).to(shape.device)  # computed, not stored
    model.prepare_for_inference()
    sync(shape.device)
    layer_bytes = sum(t.numel() * t.element_size() for t in lm.model.layers[0].parameters())
    count = lambda module: sum(t.numel() for t in module.parameters())
    engine = NVLMEngine(model, tokenizer, context_length=32768, decoding=DecodeSettings())
    run.shared.update(engine=engine, layer_bytes=layer_bytes, config=config)
    record["figures"].update(
        config_source=source, tokenizer=tok, layers=len(lm.model.layers), dtype=str(shape.dtype),
        decoder_layer_gb=round(layer_bytes / 1e9, 3), llm_params_b=round(count(lm) / 1e9, 2),
        vision_params_b=round(count(model.vision_model) / 1e9, 2), projector_params_b=round(count(model.mlp1) / 1e9, 3),
        build_s=round(time.perf_counter() - start, 1),
        vision_dummy_heads_dropped=all(layer.attn.num_stored_heads == layer.attn.num_heads
                                       for layer in model.vision_model.encoder.layers),
    )


# --- decode ----------------------------------------------------------------------------------------


def make_core(run: Run, *, compile: bool = False, chunk_tokens: int = 512, prefix_caching: bool = True,
              image_cache=None, end: bool = True):
    """A decode core as `CorePool.new_core` makes it; smoke mode compiles with the eager backend."""
    from nvlm_engine.decoder import decode_layers
    from nvlm_engine.generation import DecodeCore

    engine = run.shared["engine"]
    ids = engine.token_ids if end else replace(engine.token_ids, end=-1)
    core = DecodeCore(engine.model, engine.tokenizer, ids, context_length=engine.context_length, max_slots=64,
                      chunk_tokens=chunk_tokens, prefix_caching=prefix_caching, image_cache=image_cache,
                      compile=compile)
    if compile and run.shape.smoke:  # dynamo's tracing (fullgraph) without inductor's minutes of codegen
        core._step = torch.compile(decode_layers, fullgraph=True, dynamic=False, backend="eager")
    return core


def prompt(ordinary: int, length: int, seed: int) -> list[int]:
    """`length` random ids below `ordinary` (no special token: an image pad would need pixels)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ordinary, (length,), generator=g)
    ids[0] = seed % ordinary  # distinct first tokens: each request matches only its own slot
    return ids.tolist()


def raise_failures(deltas: list) -> None:
    for delta in deltas:
        if delta.error is not None:
            raise delta.error


def core_with_context(run: Run, batch: int, context: int, new_tokens: int, *, compile: bool):
    """A core running `batch` requests, each with `context` positions of random KV already cached.

    The KV is written into slots registered as idle cached prefixes; admission takes each
    slot over and prefills only the prompt's last position (a long prefill is not what is timed).
    """
    from nvlm_engine.generation import PreparedRequest
    from nvlm_engine.sampling import make_options

    core = make_core(run, compile=compile, end=False)
    engine = run.shared["engine"]
    ids = engine.token_ids  # the special tokens sit above the ordinary ones (Qwen2 and the tiny BPE)
    ordinary = min(ids.pad, ids.image, ids.end, 100_000)
    core.kv.ensure(batch, context + new_tokens + 1)
    g = torch.Generator(device=run.shape.device).manual_seed(0)
    requests = []
    for slot in range(batch):
        tokens = prompt(ordinary, context, seed=slot + 1)
        for keys, values in zip(core.kv.keys, core.kv.values):
            keys[slot, :, :context].normal_(generator=g)
            values[slot, :, :context].normal_(generator=g)
        core.prefix.running(slot, np.asarray(tokens, dtype=np.int64))
        core.prefix.finish(slot)
        requests.append((slot, PreparedRequest(prompt_ids=tokens, pixel_values=None,
                                               options=make_options(max_new_tokens=new_tokens))))
    raise_failures(core.admit(requests))
    raise_failures(core.step())  # the one-token prefills, first tokens, first decode step (compiles here)
    if len(core.running) != batch:
        raise RuntimeError(f"{len(core.running)} of {batch} rows decoding after admission")
    return core


def graph_step_ms(run: Run, core, batch: int, context: int) -> dict:
    """CUDA-event time of a hand-captured CUDA graph of eager `decode_step` (pure GPU time)."""
    from nvlm_engine.decoder import decode_step

    device = run.shape.device
    embed_device = core.embed_device
    tokens = torch.zeros(batch, dtype=torch.long, device=embed_device)
    positions = torch.full((batch,), context, dtype=torch.long, device=embed_device)
    slots = torch.arange(batch, device=embed_device)
    window = context + 1
    model, kv = core.model, core.kv
    if device.type != "cuda":  # smoke: the same call, eager
        return time_loop(lambda: decode_step(model, kv, tokens, positions, slots, window), run.shape.steps, device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode(), torch.cuda.stream(stream):
        for _ in range(3):
            decode_step(model, kv, tokens, positions, slots, window)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        decode_step(model, kv, tokens, positions, slots, window)
    graph.replay()
    result = time_loop(graph.replay, run.shape.steps, device)
    del graph
    return result


def compile_counters() -> dict:
    from torch._dynamo.utils import counters

    return {"graph_breaks": sum(counters["graph_break"].values()),
            "unique_graphs": counters["stats"].get("unique_graphs", 0),
            "cudagraph_skips": counters["inductor"].get("cudagraph_skips", 0)}


def with_depth(model, depth: int):
    """Context manager: the model's decoder truncated to its first `depth` layers."""
    from contextlib import contextmanager

    @contextmanager
    def truncated():
        lm = model.language_model.model
        layers = lm.layers
        lm.layers = torch.nn.ModuleList(list(layers)[:depth])
        try:
            yield
        finally:
            lm.layers = layers

    return truncated()


@torch.inference_mode()
def decode_case(run: Run, record: dict, batch: int, context: int, *, compiled: bool, label: str) -> dict:
    """Eager and compiled `DecodeCore.step`, graph-replayed `decode_step`, at two depths; projections."""
    shape, device = run.shape, run.shape.device
    engine = run.shared["engine"]
    layers = len(engine.model.language_model.model.layers)
    cfg = engine.model.language_model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_layer_bytes = batch * (context + 1) * 2 * cfg.num_key_value_heads * head_dim * shape.dtype.itemsize
    layer_bytes = run.shared["layer_bytes"]
    budget_tokens = 8 * shape.steps + 16
    out: dict = {"batch": batch, "context": context}
    eager = core_with_context(run, batch, context, budget_tokens, compile=False)
    for _ in range(2):
        eager.step()
    out["eager"] = time_loop(eager.step, shape.steps, device)
    graph = partial(graph_step_ms, run, eager, batch, context)
    out["graph"] = run.attempt(record, f"{label} graph capture", graph)
    with with_depth(engine.model, shape.shallow):
        out[f"eager_depth{shape.shallow}"] = time_loop(eager.step, shape.steps, device)
        out[f"graph_depth{shape.shallow}"] = run.attempt(record, f"{label} graph capture at depth {shape.shallow}",
                                                         graph)
    eager = graph = None  # free its KV cache before the compiled core makes its own
    gc.collect()
    if compiled:
        need = run.shared.get("compile_s", 90.0) + 15
        if run.left() < need:
            out["compiled"] = f"skipped: time budget ({run.left():.0f} s left, compile needs ~{need:.0f} s)"
        else:
            def compiled_run() -> dict:
                start = time.perf_counter()
                core = core_with_context(run, batch, context, budget_tokens, compile=True)
                for _ in range(3):  # cudagraph trees record on the first calls
                    core.step()
                sync(device)
                compile_s = time.perf_counter() - start
                run.shared["compile_s"] = max(run.shared.get("compile_s", 0.0), compile_s)
                timing = time_loop(core.step, shape.steps, device)
                timing.update(first_steps_s=round(compile_s, 1), counters=compile_counters())
                return timing

            out["compiled"] = run.attempt(record, f"{label} compiled", compiled_run)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # Per decoder layer from the two depths, and the 80-layer projections.
    per_layer = {}
    for kind in ("eager", "graph"):
        deep, shallow = out.get(kind), out.get(f"{kind}_depth{shape.shallow}")
        if isinstance(deep, dict) and isinstance(shallow, dict):
            key = "event_ms" if kind == "graph" and deep.get("event_ms") is not None else "wall_ms"
            layer = (deep[key] - shallow[key]) / (layers - shape.shallow)
            rest = shallow[key] - shape.shallow * layer
            per_layer[kind] = {"layer_ms": round(layer, 4), "rest_ms": round(rest, 3),
                               "projected_80_ms": round(rest + 80 * layer, 2)}
    out["per_layer"] = per_layer
    if "graph" in per_layer and per_layer["graph"]["layer_ms"] > 0:
        seconds = per_layer["graph"]["layer_ms"] / 1e3
        achieved = (layer_bytes + kv_layer_bytes) / seconds
        out["layer_bandwidth_tb_s"] = round(achieved / 1e12, 3)
        peak = run.shared.get("peak_bandwidth")
        if peak:
            out["fraction_of_peak"] = round(achieved / peak, 3)
        if run.shared.get("copy_bandwidth"):
            out["fraction_of_copy"] = round(achieved / run.shared["copy_bandwidth"], 3)
        if isinstance(out.get("compiled"), dict):
            out["compiled"]["projected_80_ms"] = round(
                out["compiled"]["wall_ms"] + (80 - layers) * per_layer["graph"]["layer_ms"], 2)
    return out


def check_decode(run: Run, record: dict, cases: list[tuple[int, int]], prefix: str = "") -> None:
    figures = record["figures"]
    for index, (batch, context) in enumerate(cases):
        label = f"{prefix}batch{batch}_ctx{context}"
        # Compile the first and last case always (batch 1 and batch 16); the middle one if time allows.
        compiled = index in (0, len(cases) - 1) or run.left() > 150
        result = run.attempt(record, label, partial(decode_case, run, record, batch, context, compiled=compiled,
                                                    label=label))
        if result is not None:
            figures[label] = result
        run.save()


# --- vision + prefill, turn 2 -------------------------------------------------------------------------


def check_mixed(run: Run, record: dict) -> None:
    """Decode rows with a prompt chunk in the same pass, against the decode step and the chunk apart."""
    from nvlm_engine.decoder import Chunk, decode_step, mixed_step, prefill_chunk

    shape, device = run.shape, run.shape.device
    batch, context = shape.mixed_case
    core = core_with_context(run, batch, context, 4, compile=False)
    model, kv, spare = core.model, core.kv, batch  # the chunk goes to a free slot
    kv.ensure(batch + 1, max(context + 2, *shape.mixed_chunks))
    table = model.language_model.model.embed_tokens
    tokens = torch.zeros(batch, dtype=torch.long, device=core.embed_device)
    positions = torch.full((batch,), context, dtype=torch.long, device=core.embed_device)
    slots = torch.arange(batch, device=core.embed_device)
    figures = record["figures"]
    with torch.inference_mode():
        decode = time_loop(lambda: decode_step(model, kv, tokens, positions, slots, context + 1), shape.steps, device)
        figures["decode_only"] = decode
        for size in shape.mixed_chunks:
            embeds = torch.randn(1, size, table.embedding_dim, dtype=table.weight.dtype, device=table.weight.device)
            chunk = (Chunk(spare, 0, size),)
            alone = time_loop(partial(prefill_chunk, model, kv, spare, embeds, 0), shape.steps, device)
            mixed = time_loop(partial(mixed_step, model, kv, tokens, positions, slots, context + 1, chunk, embeds, (0,)),
                              shape.steps, device)
            key = "event_ms" if mixed["event_ms"] is not None else "wall_ms"
            figures[f"chunk_{size}"] = {"alone": alone, "mixed": mixed,
                                        "mixed_vs_decode": round(mixed[key] / decode[key], 3),
                                        "mixed_vs_apart": round(mixed[key] / (decode[key] + alone[key]), 3)}


def seven_tiles(run: Run):
    from PIL import Image

    g = torch.Generator().manual_seed(7)
    pixels = torch.randint(0, 256, (600, 800, 3), dtype=torch.uint8, generator=g).numpy()
    return [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(pixels)},
                                         {"type": "text", "text": "Describe the picture in detail."}]}]


def first_token_s(run: Run, core, request) -> tuple[float, list[int]]:
    from nvlm_engine.decode_requests import decode_requests

    sync(run.shape.device)
    start = time.perf_counter()
    result = None
    with torch.inference_mode():
        for delta in decode_requests(core, [request]):
            result = delta.result or result
    sync(run.shape.device)
    return time.perf_counter() - start, result.token_ids


@torch.inference_mode()
def check_vision_prefill(run: Run, record: dict) -> None:
    from nvlm_engine.decoder import prefill_chunk
    from nvlm_engine.image_cache import ImageEmbeddingCache
    from nvlm_engine.kv_cache import KVCache

    engine, device = run.shared["engine"], run.shape.device
    figures = record["figures"]
    turn1 = seven_tiles(run)
    request = engine.prepare(turn1, max_new_tokens=1)
    figures.update(prompt_tokens=len(request.prompt_ids), tiles=int(request.pixel_values.shape[0]))
    # Warm the kernels once on a throwaway core (first CUDA calls pay for cuBLAS/cuDNN setup).
    first_token_s(run, make_core(run, image_cache=ImageEmbeddingCache(0)), engine.prepare(turn1, max_new_tokens=1))
    seconds, _ = first_token_s(run, make_core(run, image_cache=ImageEmbeddingCache(0)), request)
    figures["ttft_cold_s"] = round(seconds, 3)
    sync(device)
    start = time.perf_counter()
    tokens = engine.model.encode_images(request.pixel_values)
    sync(device)
    figures["vision_s"] = round(time.perf_counter() - start, 3)
    embeds = engine.model.embed(torch.tensor([request.prompt_ids]), tokens, engine.token_ids.image)
    lm = engine.model.language_model
    kv = KVCache([layer.input_layernorm.weight.device for layer in lm.model.layers],
                 kv_heads=lm.config.num_key_value_heads, head_dim=lm.model.layers[0].self_attn.head_dim,
                 dtype=embeds.dtype, max_capacity=engine.context_length, max_slots=1)
    kv.ensure(1, embeds.shape[1])
    sync(device)
    start = time.perf_counter()
    prefill_chunk(engine.model, kv, 0, embeds, 0)
    sync(device)
    prefill_s = time.perf_counter() - start
    layers = len(lm.model.layers)
    figures.update(llm_prefill_one_pass_s=round(prefill_s, 3),
                   projected_80_layers_ttft_s=round(figures["vision_s"] + prefill_s * 80 / layers, 3))


@torch.inference_mode()
def check_turn2(run: Run, record: dict) -> None:
    from nvlm_engine.image_cache import ImageEmbeddingCache

    engine = run.shared["engine"]
    figures = record["figures"]
    turn1 = seven_tiles(run)
    images = ImageEmbeddingCache(512 * 2**20)
    core = make_core(run, image_cache=images)
    figures["turn1_ttft_s"] = round(first_token_s(run, core, engine.prepare(turn1, max_new_tokens=1))[0], 4)
    answer_ids = first_token_s(run, core, engine.prepare(turn1, max_new_tokens=run.shape.answer_tokens))[1]
    answer = engine.tokenizer.decode(answer_ids, skip_special_tokens=True)
    turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "And the colours?"}]
    before = core.prefix.stats().hit_tokens
    request = engine.prepare(turn2, max_new_tokens=1)
    figures["turn2_prompt_tokens"] = len(request.prompt_ids)
    figures["turn2_ttft_prefix_s"] = round(first_token_s(run, core, request)[0], 4)
    figures["turn2_prefix_hit_tokens"] = core.prefix.stats().hit_tokens - before
    off = make_core(run, image_cache=images, prefix_caching=False)
    figures["turn2_ttft_image_cache_only_s"] = round(
        first_token_s(run, off, engine.prepare(turn2, max_new_tokens=1))[0], 4)
    figures["speedup_prefix_vs_turn1"] = round(figures["turn1_ttft_s"] / figures["turn2_ttft_prefix_s"], 1)


# --- small steps -----------------------------------------------------------------------------------------


def check_environment(run: Run, record: dict) -> None:
    f = record["figures"]
    f.update(torch=torch.__version__, python=platform.python_version(), smoke=run.shape.smoke,
             device=str(run.shape.device))
    if run.shape.device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        name = torch.cuda.get_device_name()
        f.update(gpu=name, memory_gib=round(props.total_memory / 2**30, 1),
                 capability=list(torch.cuda.get_device_capability()), cuda=torch.version.cuda)
        peak = next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)
        run.shared["peak_bandwidth"] = peak
        f["peak_bandwidth_tb_s"] = peak / 1e12 if peak else None


def check_copy(run: Run, record: dict) -> None:
    device, n = run.shape.device, run.shape.copy_bytes
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    timing = time_loop(lambda: y.copy_(x), 10, device)
    ms = timing["event_ms"] or timing["wall_ms"]
    bandwidth = 2 * n / (ms / 1e3)  # read + write
    run.shared["copy_bandwidth"] = bandwidth
    record["figures"].update(bytes=n, copy_ms=ms, tb_s=round(bandwidth / 1e12, 3))
    if run.shared.get("peak_bandwidth"):
        record["figures"]["fraction_of_peak"] = round(bandwidth / run.shared["peak_bandwidth"], 3)


def _repeated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, group: int) -> torch.Tensor:
    """transformers' repeat_kv form: the KV heads copied `group` times (the copy is timed too)."""
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask)


@torch.inference_mode()
def check_attention(run: Run, record: dict) -> None:
    """Decode-step attention as the engine calls it vs packed GQA, per SDPA backend."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device, dtype, smoke = run.shape.device, run.shape.dtype, run.shape.smoke
    heads, kv_heads, dim = (8, 1, 8) if smoke else (64, 8, 128)
    group = heads // kv_heads
    cases = [(1, 512, 1), (4, 128, 1), (1, 256, 64)] if smoke else [(1, 2048, 1), (1, 16384, 1), (16, 2048, 1),
                                                                     (1, 2048, 512)]
    for batch, window, queries in cases:
        q = torch.randn(batch, heads, queries, dim, device=device, dtype=dtype)
        k = torch.randn(batch, kv_heads, window, dim, device=device, dtype=dtype)
        v = torch.randn_like(k)
        positions = torch.arange(window - queries, window, device=device)
        mask = (torch.arange(window, device=device)[None, :] <= positions[:, None])[None, None].expand(batch, 1, -1, -1)
        packed_q = q.reshape(batch, kv_heads, group * queries, dim)  # queries of a KV group share its keys
        packed_mask = mask.repeat(1, 1, group, 1) if queries > 1 else mask
        sdpa = F.scaled_dot_product_attention
        forms = {
            "engine (mask + enable_gqa)": partial(sdpa, q, k, v, attn_mask=mask, enable_gqa=True),
            "packed GQA (mask)": partial(sdpa, packed_q, k, v, attn_mask=packed_mask),
            "repeated KV (mask)": partial(_repeated, q, k, v, mask, group),
        }
        if queries == 1:
            forms["no mask + enable_gqa (flash, for scale)"] = partial(sdpa, q, k, v, enable_gqa=True)
        kv_bytes = 2 * k.numel() * k.element_size()
        case: dict = {}
        for name, fn in forms.items():
            fn()
            timing = time_loop(fn, run.shape.steps, device)
            ms = timing["event_ms"] or timing["wall_ms"]
            backends = {}
            for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                            SDPBackend.MATH):
                try:
                    with sdpa_kernel([backend]):
                        fn()
                    backends[backend.name] = "ok"
                except RuntimeError as e:
                    backends[backend.name] = f"refused: {str(e).splitlines()[0][:120]}"
            case[name] = {"ms": round(ms, 4), "kv_tb_s": round(kv_bytes / (ms / 1e3) / 1e12, 3), "backends": backends}
        record["figures"][f"batch{batch}_window{window}_queries{queries}"] = case


def _linears(weights: list[torch.Tensor], inputs: list[torch.Tensor]) -> None:
    for w, x in zip(weights, inputs):
        torch.nn.functional.linear(x, w)


@torch.inference_mode()
def check_tp2(run: Run, record: dict) -> None:
    """Weight-read time of one decoder layer's seven linears, full width vs half (TP=2 shard)."""
    config = run.shared["config"].llm if "config" in run.shared else slice_config(run.shape)[0].llm
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    device, dtype = run.shape.device, run.shape.dtype
    x_h = torch.randn(1, h, device=device, dtype=dtype)
    for name, div in (("full", 1), ("half_tp2", 2)):
        shapes = [(h // div, h), (kv // div, h), (kv // div, h), (h, h // div), (i // div, h), (i // div, h), (h, i // div)]
        weights = [torch.randn(o, n, device=device, dtype=dtype) for o, n in shapes]
        inputs = [x_h if n == h else torch.randn(1, n, device=device, dtype=dtype) for _, n in shapes]
        timing = time_loop(partial(_linears, weights, inputs), run.shape.steps, device)
        ms = timing["event_ms"] or timing["wall_ms"]
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        record["figures"][name] = {"ms": ms, "gb": round(nbytes / 1e9, 3), "tb_s": round(nbytes / (ms / 1e3) / 1e12, 3)}
        weights = inputs = None
    record["figures"]["half_over_full"] = round(record["figures"]["half_tp2"]["ms"] / record["figures"]["full"]["ms"], 3)


def check_fp8(run: Run, record: dict) -> None:
    from nvlm_engine.quantization import get_scheme, quantize_model

    scheme = get_scheme("fp8")
    device = run.shape.device
    if device.type == "cuda" and torch.cuda.get_device_capability() < scheme.min_capability:
        record["status"] = "skipped"
        record["reason"] = f"FP8 needs compute capability {scheme.min_capability}, this GPU has " \
                           f"{torch.cuda.get_device_capability()}"
        return
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        record["status"], record["reason"] = "skipped", "this torch has no float8_e4m3fn / _scaled_mm"
        return
    engine = run.shared["engine"]
    count = quantize_model(engine.model, scheme, run.shape.dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    layer = engine.model.language_model.model.layers[0]
    run.shared["layer_bytes"] = sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()])
    record["figures"].update(quantized_linears=count, decoder_layer_gb=round(run.shared["layer_bytes"] / 1e9, 3))
    check_decode(run, record, run.shape.fp8_cases, prefix="fp8_")


# --- main ------------------------------------------------------------------------------------------------


def summary(run: Run) -> None:
    steps = run.results["steps"]
    print("\n=== gpu_check summary ===")
    for name in STEPS:
        r = steps.get(name, {})
        print(f"{name:>16}: {r.get('status', 'missing')}" + (f" ({r.get('error') or r.get('reason')})"
                                                            if r.get("status") not in ("ok", None) else "")
              + (f"; sub-errors: {r['errors']}" if r.get("errors") else ""))
    for step in ("decode", "fp8"):
        for label, case in steps.get(step, {}).get("figures", {}).items():
            if not isinstance(case, dict) or "eager" not in case:
                continue
            compiled = case.get("compiled")
            graph = case.get("graph") or {}
            print(f"  {step} {label}: eager {case['eager']['wall_ms']:.2f} ms wall / {case['eager']['event_ms']} ms event; "
                  f"graph (hand-captured) {graph.get('event_ms')} ms; compiled "
                  + (f"{compiled['wall_ms']:.2f} ms wall / {compiled['event_ms']} ms event, first steps "
                     f"{compiled['first_steps_s']} s, {compiled['counters']}" if isinstance(compiled, dict) else str(compiled))
                  + f"; per layer {case.get('per_layer')}; layer bandwidth {case.get('layer_bandwidth_tb_s')} TB/s "
                  f"({case.get('fraction_of_peak')} of peak)")
    for label, case in steps.get("attention_kernels", {}).get("figures", {}).items():
        print(f"  attention {label}: " + "; ".join(
            f"{name} {c['ms']:.3f} ms (KV {c['kv_tb_s']} TB/s, accepted by "
            f"{[b for b, ok in c['backends'].items() if ok == 'ok']})" for name, c in case.items()))
    for step in ("vision_prefill", "turn2_prefix", "tp2_half_width", "copy_bandwidth"):
        if steps.get(step, {}).get("figures"):
            print(f"  {step}: {steps[step]['figures']}")
    print(f"results: {run.out / 'gpu_check.json'}; total {time.perf_counter() - run.started:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="every step on the CPU with tiny shapes")
    parser.add_argument("--budget-s", type=float, default=285.0, help="seconds for all steps (default 285)")
    args = parser.parse_args(argv)
    out = Path(os.environ.get("OUT") or "gpu_check_out")
    if args.smoke:
        torch.set_num_threads(1)  # a shared CPU: one thread never waits on a descheduled sibling
        shape = Shape(True, torch.device("cpu"), torch.float32, layers=4, shallow=2,
                      cases=[(1, 128), (1, 512), (4, 128)], fp8_cases=[(1, 128)], copy_bytes=2**20, steps=3,
                      answer_tokens=2, mixed_case=(4, 128), mixed_chunks=(16, 64))
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible; nothing to check (run it on a GPU machine, or --smoke on a CPU).")
        return 0
    else:
        shape = Shape(False, torch.device("cuda:0"), torch.bfloat16, layers=20, shallow=4,
                      cases=[(1, 2048), (1, 16384), (16, 2048)], fp8_cases=[(1, 2048), (16, 2048)],
                      copy_bytes=2 * 2**30, steps=30, answer_tokens=16)
    run = Run(shape, out, args.budget_s)
    run.results = {"meta": {"argv": sys.argv[1:], "smoke": shape.smoke, "budget_s": args.budget_s,
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, "steps": {}}
    print(f"gpu_check: {'smoke (CPU, tiny shapes)' if shape.smoke else torch.cuda.get_device_name()}; "
          f"budget {args.budget_s:.0f} s; results in {out}/gpu_check.json", flush=True)
    run.step("environment", check_environment)
    run.step("copy_bandwidth", check_copy)
    run.step("attention_kernels", check_attention, need_s=5)
    run.step("build_slice", build_engine)
    ready = "engine" in run.shared
    for name, fn, need in (("decode", lambda r, rec: check_decode(r, rec, shape.cases), 30),
                           ("mixed_step", check_mixed, 10), ("vision_prefill", check_vision_prefill, 10), ("turn2_prefix", check_turn2, 10),
                           ("tp2_half_width", check_tp2, 3), ("fp8", check_fp8, 30)):
        if not ready and name != "tp2_half_width":
            run.results["steps"][name] = {"status": "error", "error": "no model: build_slice failed", "figures": {},
                                          "errors": []}
            run.save()
            continue
        run.step(name, fn, need_s=need)
    run.results["meta"]["total_s"] = round(time.perf_counter() - run.started, 1)
    run.save()
    summary(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
