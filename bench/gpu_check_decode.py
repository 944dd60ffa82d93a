"""gpu_check.py's decode steps: `decode` (eager, compiled and graph-replayed decode steps at two
depths, projected to 80 layers), `mixed_step` (a prompt chunk riding along with the decode rows) and
`fp8` (the decode step with the decoder linears in FP8).
"""

from __future__ import annotations

import gc
import time
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
from gpu_check_model import make_core, sync, time_loop

if TYPE_CHECKING:
    from gpu_check import Run


# --- decode ----------------------------------------------------------------------------------------


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


# --- mixed step, FP8 -------------------------------------------------------------------------------------


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
