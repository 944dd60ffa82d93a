"""bench_decode_core.py's parts a, c, d and e: decode time vs context, turn 2 of an image
conversation, eager vs compiled decode steps, and a decode step after finished requests left cached slots.
"""

from __future__ import annotations

import gc
import time

import numpy as np
import torch
from decode_core_baseline import PreviousBatch, PreviousRow
from decode_core_setup import TARGETS, Bench, fresh, median, timed

from nvlm_engine.cores import DecodeSettings
from nvlm_engine.decode_requests import decode_requests
from nvlm_engine.generation import DecodeCore, PreparedRequest
from nvlm_engine.image_cache import ImageEmbeddingCache
from nvlm_engine.reference_decode import LLMStep, prefill
from nvlm_engine.sampling import sample_token

# --- a. per-token decode time vs context ------------------------------------------------------


def random_kv(bench: Bench, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    lm = bench.model.language_model
    heads, dim = lm.config.num_key_value_heads, lm.model.layers[0].self_attn.head_dim
    g = torch.Generator().manual_seed(length)
    return [(torch.randn(1, heads, length, dim, generator=g), torch.randn(1, heads, length, dim, generator=g))
            for _ in lm.model.layers]


def previous_at(bench: Bench, kv: list, new_tokens: int) -> PreviousBatch:
    """The previous loop holding one request whose first `L` positions are `kv`."""
    from transformers import DynamicCache

    length = kv[0][0].shape[2]
    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k.clone(), v.clone(), i)
    request = bench.request(length, new_tokens, seed=1)
    batch = PreviousBatch(bench.model, [PreviousRow(0, request, bench.engine.tokenizer)], bench.ids)
    batch.step = LLMStep(torch.tensor([[length - 1]]), None, cache)
    batch.valid = torch.ones(1, length, dtype=torch.bool)
    batch.logits = torch.randn(1, bench.vocab)
    return batch


def core_at(bench: Bench, kv: list, new_tokens: int, **settings) -> DecodeCore:
    """A decode core running one request whose first `L` prompt positions are `kv`.

    The KV is written into slot 0 and registered with the core's prefix index as an idle cached
    sequence, so admission takes the slot over and prefills only the prompt's last position.
    """
    length = kv[0][0].shape[2]
    core = bench.core(**settings)
    request = bench.request(length, new_tokens, seed=1)
    core.kv.ensure(1, length + new_tokens + 1)
    for layer, (k, v) in enumerate(kv):
        core.kv.keys[layer][0, :, :length] = k[0]
        core.kv.values[layer][0, :, :length] = v[0]
    core.prefix.running(0, np.asarray(request.prompt_ids, dtype=np.int64))
    core.prefix.finish(0)
    core.admit([(0, request)])
    return core


def fit_slope(contexts: list[int], times: list[float]) -> float:
    """Least-squares slope of time (s) vs context, in ms per 1k tokens."""
    x, y = np.asarray(contexts, float), np.asarray(times, float)
    return float(np.polyfit(x, y, 1)[0]) * 1e6


@torch.inference_mode()
def context_sweep(bench: Bench, contexts: list[int], rounds: int, steps: int) -> dict:
    print(f"\n[a] per-token decode time vs context, batch 1 (median of {rounds * steps} steps each, alternating)")
    print(f"  {'context':>8} {'previous ms':>12} {'new ms':>9} {'new/prev':>9}")
    out = {"contexts": contexts, "previous": [], "new": []}
    for length in contexts:
        kv = random_kv(bench, length)
        budget = rounds * (steps + 2) + 4
        old, new = previous_at(bench, kv, budget), core_at(bench, kv, budget)
        del kv
        new.step()  # the one-token prefill of the prompt's last position, and the first decode step
        old.advance()
        t_old, t_new = [], []
        for _ in range(rounds * steps):  # step by step, alternating: both see the same machine load
            t_old.append(timed(old.advance))
            t_new.append(timed(new.step))
        a, b = median(t_old), median(t_new)
        out["previous"].append(a)
        out["new"].append(b)
        print(f"  {length:>8} {a * 1e3:>12.1f} {b * 1e3:>9.1f} {b / a:>9.2f}")
        del old, new
        gc.collect()
    if len(contexts) >= 2:
        out["slope_previous"] = fit_slope(contexts, out["previous"])
        out["slope_new"] = fit_slope(contexts, out["new"])
        out["reduction"] = 1 - out["slope_new"] / out["slope_previous"]
        print(f"  slope (ms per 1k tokens of context): previous {out['slope_previous']:.2f}, new {out['slope_new']:.2f}; "
              f"reduction {out['reduction']:.0%} (target >= {TARGETS['slope']:.0%})")
    return out


# --- c. turn 2 of a 7-tile image conversation ---------------------------------------------------


def conversation(bench: Bench) -> tuple[list, object]:
    from PIL import Image

    g = torch.Generator().manual_seed(7)
    pixels = torch.randint(0, 256, (600, 800, 3), dtype=torch.uint8, generator=g).numpy()
    image = Image.fromarray(pixels)
    turn1 = [{"role": "user", "content": [{"type": "image", "image": image},
                                          {"type": "text", "text": "Describe the picture."}]}]
    return turn1, image


@torch.inference_mode()
def ttft(core: DecodeCore, request: PreparedRequest) -> tuple[float, list[int]]:
    """Seconds until the request's first token (it asks for one), and its tokens."""
    start = time.perf_counter()
    result = None
    for delta in decode_requests(core, [request]):
        result = delta.result or result
    return time.perf_counter() - start, result.token_ids


@torch.inference_mode()
def previous_ttft(bench: Bench, request: PreparedRequest) -> float:
    """The previous path's first token: vision and the whole prompt in one pass, then the pick."""
    start = time.perf_counter()
    logits, _, _ = prefill(bench.model, [request], bench.engine.token_ids)
    sample_token(logits[0], request.options, None)
    return time.perf_counter() - start


@torch.inference_mode()
def second_turn(bench: Bench, repeat: int, answer_tokens: int) -> dict:
    engine = bench.engine
    turn1, _ = conversation(bench)
    first = engine.prepare(turn1, max_new_tokens=1)
    print(f"\n[c] turn 2 of a 7-tile image conversation ({len(first.prompt_ids)}-token turn-1 prompt, "
          f"{sum(first.image_tiles)} tiles; {repeat} round(s))")
    times: dict[str, list[float]] = {"turn 1 (cold caches)": [], "turn 1, previous path": [],
                                     "turn 2, prefix cache on": [], "turn 2, prefix off, image cache on": [],
                                     "turn 2, previous path": []}
    hits = []
    for _ in range(repeat):
        images = ImageEmbeddingCache(DecodeSettings().image_cache_bytes)
        core = bench.core(image_cache=images, end=True)
        seconds, _ = ttft(core, engine.prepare(turn1, max_new_tokens=1))
        times["turn 1 (cold caches)"].append(seconds)
        times["turn 1, previous path"].append(previous_ttft(bench, engine.prepare(turn1, max_new_tokens=1)))
        # The turn-1 answer, then turn 2 = turn 1 + answer + a new question.
        answer_ids = ttft(core, engine.prepare(turn1, max_new_tokens=answer_tokens))[1]
        answer = engine.tokenizer.decode(answer_ids, skip_special_tokens=True)
        turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "And the colours?"}]
        before = core.prefix.stats()
        seconds, _ = ttft(core, engine.prepare(turn2, max_new_tokens=1))
        after = core.prefix.stats()
        times["turn 2, prefix cache on"].append(seconds)
        hits.append((after.hit_tokens - before.hit_tokens, len(engine.prepare(turn2, max_new_tokens=1).prompt_ids)))
        off = bench.core(image_cache=images, prefix_caching=False, end=True)  # images of turn 1 are cached
        times["turn 2, prefix off, image cache on"].append(ttft(off, engine.prepare(turn2, max_new_tokens=1))[0])
        times["turn 2, previous path"].append(previous_ttft(bench, engine.prepare(turn2, max_new_tokens=1)))
        del core, off
        gc.collect()
    out = {name: median(v) for name, v in times.items()}
    cold = out["turn 1 (cold caches)"]
    for name, seconds in out.items():
        print(f"  {name:<36} {seconds * 1e3:>9.0f} ms  {cold / seconds:>6.1f}x faster than turn 1")
    print(f"  prefix hit: {hits[0][0]} of {hits[0][1]} turn-2 prompt tokens reused")
    out["speedup"] = cold / out["turn 2, prefix cache on"]
    out["hit_tokens"], out["prompt_tokens"] = hits[0]
    return out


# --- d. eager vs compiled decode step -------------------------------------------------------------


@torch.inference_mode()
def compiled_steps(bench: Bench, batches: list[int], rounds: int, steps: int, backend: str) -> dict:
    print(f"\n[d] decode step, eager vs DecodeSettings(compile=True) (torch.compile fullgraph, {backend}); "
          f"median of {rounds * steps} steps each, alternating")
    print(f"  {'batch':>5} {'eager ms':>9} {'compiled ms':>12} {'speedup':>8} {'compile s':>16}")
    out = {}

    for b in batches:
        budget = rounds * steps + 8
        # Prompts + answers stay below 256 positions: one window bucket, so one compilation.
        requests = [bench.request(120 + 4 * i, budget, seed=50 + i) for i in range(b)]
        cores, warm = {}, {}
        for name, flag in (("eager", False), ("compiled", True)):
            # One chunk holds every prompt: all rows start decoding in the same step (one rows bucket).
            core = bench.core(compile=flag, chunk_tokens=4096)
            core.admit([(i, fresh(r)) for i, r in enumerate(requests)])
            start = time.perf_counter()
            while len(core.running) < b:  # prefill, first tokens, first decode step (compiles here)
                core.step()
            core.step()
            warm[name] = time.perf_counter() - start
            cores[name] = core
        t: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(rounds * steps):  # alternating step by step
            for name in ("eager", "compiled"):
                t[name].append(timed(cores[name].step))
        e, c = median(t["eager"]), median(t["compiled"])
        out[b] = {"eager": e, "compiled": c, "compile_s": warm["compiled"] - warm["eager"]}
        print(f"  {b:>5} {e * 1e3:>9.1f} {c * 1e3:>12.1f} {e / c:>7.2f}x {out[b]['compile_s']:>16.1f}")
        del cores
        gc.collect()
    return out


# --- e. a decode step after finished requests left cached slots ----------------------------------------


@torch.inference_mode()
def after_cached(bench: Bench, finished: int, steps: int) -> dict:
    """Batch-1 decode step time on a core that served `finished` requests before (their slots stay
    cached for prefix reuse) vs on a fresh core: a step computes every slot up to the highest running one."""
    print(f"\n[e] batch-1 decode step after {finished} finished requests (prefix caching keeps their slots) "
          f"vs a fresh core; median of {2 * steps} steps each, alternating")
    used = bench.core(chunk_tokens=4096)
    for i in range(finished):  # a chat server: different requests one after another
        for _ in decode_requests(used, [bench.request(200, 4, seed=100 + i)]):
            pass
    cores = {"after finished requests": used, "fresh core": bench.core(chunk_tokens=4096)}
    times: dict[str, list[float]] = {name: [] for name in cores}
    for core in cores.values():
        core.admit([(0, bench.request(200, 4 * steps + 8, seed=999))])
        core.step()
        core.step()
    for _ in range(2 * steps):  # alternating step by step
        for name, core in cores.items():
            times[name].append(timed(core.step))
    out = {name: median(t) for name, t in times.items()}
    for name, core in cores.items():
        print(f"  {name:<26} running slot {list(core.running)}, {len(core.prefix.idle_slots())} idle cached slot(s): "
              f"{out[name] * 1e3:.1f} ms per step")
    out["ratio"] = out["after finished requests"] / out["fresh core"]
    return out
