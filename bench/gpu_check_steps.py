"""gpu_check.py's other steps: `environment`, `copy_bandwidth`, `attention_kernels`, `vision_prefill`,
`turn2_prefix` and `tp2_half_width`.
"""

from __future__ import annotations

import platform
import time
from functools import partial
from typing import TYPE_CHECKING

import torch
from gpu_check_model import make_core, slice_config, sync, time_loop

if TYPE_CHECKING:
    from gpu_check import Run

PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "B200": 8.0e12}  # bytes/s, HBM


# --- vision + prefill, turn 2 -------------------------------------------------------------------------


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
