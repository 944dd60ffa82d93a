"""bench_decode_core.py's part b: batch 8 with staggered arrivals, then a long newcomer while 7
stream; the previous loop, the new core (with and without its gap bound), and the no-newcomer control.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch
from decode_core_baseline import PreviousBatch, PreviousRow
from decode_core_setup import Bench, fresh, median

from nvlm_engine.chunk_budget import ALLOWANCE, ChunkBudget
from nvlm_engine.generation import PreparedRequest

# --- b. batch 8, staggered arrivals, a 2k-token newcomer ------------------------------------------


@dataclass
class Workload:
    arrivals: list[tuple[int, PreparedRequest]]  # (step, request); the last is the long newcomer
    newcomer: int  # its index


def staggered(bench: Bench, stagger: int, newcomer_tokens: int, chunk: int) -> Workload:
    newcomer_step = 7 * stagger
    # Each short stream must outlive the newcomer's prefill even with small chunks.
    tokens = newcomer_step + -(-newcomer_tokens // chunk) + 24
    arrivals = [(i * stagger, bench.request(96 + 32 * i, tokens, seed=10 + i)) for i in range(7)]
    arrivals.append((newcomer_step, bench.request(newcomer_tokens, 16, seed=99)))
    return Workload(arrivals, 7)


def token_times(clock: list[float], counts: list[dict[int, int]]) -> dict[int, list[float]]:
    """Per request, the time each of its tokens came out (the end of the step that produced it)."""
    times: dict[int, list[float]] = {}
    last: dict[int, int] = {}
    for now, snapshot in zip(clock, counts):
        for index, n in snapshot.items():
            if n > last.get(index, 0):
                times.setdefault(index, []).extend([now] * (n - last.get(index, 0)))
                last[index] = n
    return times


def gap_ratio(times: dict[int, list[float]], arrived: float, newcomer: int) -> tuple[float, float]:
    """(worst over the running streams of max gap in the newcomer's prefill window / median gap,
    the newcomer's time to first token)."""
    first = times[newcomer][0]
    return worst_gap(times, arrived, first, skip=newcomer), first - arrived


def worst_gap(times: dict[int, list[float]], start: float, end: float, skip: int = -1) -> float:
    """Over the streams already running at `start` (but `skip`): the largest gap between two of
    their tokens that overlaps `start..end`, over that stream's median gap outside it."""
    worst = 0.0
    for index, stamps in times.items():
        if index == skip or stamps[0] > start:
            continue
        spans = list(pairwise(stamps))
        window = [t1 - t0 for t0, t1 in spans if t1 > start and t0 < end]
        outside = [t1 - t0 for t0, t1 in spans if not (t1 > start and t0 < end)]
        if window and outside:  # against its steady gap: the median outside the window
            worst = max(worst, max(window) / float(np.median(outside)))
    return worst


@torch.inference_mode()
def run_previous(bench: Bench, work: Workload) -> dict:
    batch: PreviousBatch | None = None
    rows: dict[int, PreviousRow] = {}
    clock, counts = [], []
    pending = list(enumerate(work.arrivals))
    step, start, arrived = 0, time.perf_counter(), 0.0
    while pending or (batch is not None and batch.rows):
        admitted = [(i, fresh(r)) for i, (s, r) in pending if s <= step]
        pending = [(i, (s, r)) for i, (s, r) in pending if s > step]
        if admitted:
            if any(i == work.newcomer for i, _ in admitted):
                arrived = time.perf_counter()
            fresh_batch = PreviousBatch.start(bench.model, admitted, bench.engine.tokenizer, bench.ids)
            rows.update({row.index: row for row in fresh_batch.rows})
            if batch is None or not batch.rows:
                batch = fresh_batch
            else:
                batch.merge(fresh_batch)
        if batch is not None and batch.rows:
            batch.advance()
        clock.append(time.perf_counter())
        counts.append({i: len(r.generated) for i, r in rows.items()})
        step += 1
    return summarize(clock, counts, start, arrived, work)


@torch.inference_mode()
def run_new(bench: Bench, work: Workload, chunk: int, allowance: float = ALLOWANCE) -> dict:
    core = bench.core(chunk_tokens=chunk)
    core.budget = ChunkBudget(chunk, allowance=allowance)
    rows: dict[int, object] = {}
    clock, counts = [], []
    pending = list(enumerate(work.arrivals))
    step, start, arrived, done = 0, time.perf_counter(), 0.0, 0
    while done < len(work.arrivals):
        admitted = [(i, fresh(r)) for i, (s, r) in pending if s <= step]
        pending = [(i, (s, r)) for i, (s, r) in pending if s > step]
        if admitted:
            if any(i == work.newcomer for i, _ in admitted):
                arrived = time.perf_counter()
            done += sum(d.result is not None or d.error is not None for d in core.admit(admitted))
            # The core's own row objects (read only, for per-token timestamps).
            for row in (*core.waiting, *core.prefilling):
                rows.setdefault(row.index, row)
        deltas = core.step()
        done += sum(d.result is not None or d.error is not None for d in deltas)
        for d in deltas:
            if d.error is not None:
                raise d.error
        clock.append(time.perf_counter())
        counts.append({i: len(r.generated) for i, r in rows.items()})
        step += 1
    return summarize(clock, counts, start, arrived, work)


def summarize(clock: list[float], counts: list[dict[int, int]], start: float, arrived: float, work: Workload) -> dict:
    times = token_times(clock, counts)
    total = sum(len(t) for t in times.values())
    ratio, ttft = gap_ratio(times, arrived, work.newcomer)
    running = [np.median(np.diff(t)) for i, t in times.items() if i != work.newcomer and len(t) > 1]
    window_steps = sum(arrived < now <= arrived + ttft for now in clock)  # steps until the newcomer's first token
    return {"tokens": total, "seconds": clock[-1] - start, "tok_s": total / (clock[-1] - start), "gap_ratio": ratio,
            "newcomer_ttft": ttft, "median_gap": float(np.median(running)), "steps": len(clock),
            "window_steps": window_steps}


@torch.inference_mode()
def run_without_newcomer(bench: Bench, work: Workload, chunk: int, window_steps: int) -> float:
    """The control: the same 7 streams and engine defaults, no newcomer; the worst gap ratio over
    the steps where the newcomer's prefill window was (`window_steps` from its arrival step).
    Whatever it measures is this machine's timing noise, not a prefill's cost."""
    core = bench.core(chunk_tokens=chunk)
    core.budget = ChunkBudget(chunk, allowance=ALLOWANCE)
    streams = work.arrivals[: work.newcomer]
    rows: dict[int, object] = {}
    clock, counts = [], []
    pending = list(enumerate(streams))
    step, done = 0, 0
    while done < len(streams):
        admitted = [(i, fresh(r)) for i, (s, r) in pending if s <= step]
        pending = [(i, (s, r)) for i, (s, r) in pending if s > step]
        if admitted:
            core.admit(admitted)
            for row in (*core.waiting, *core.prefilling):
                rows.setdefault(row.index, row)
        done += sum(d.result is not None or d.error is not None for d in core.step())
        clock.append(time.perf_counter())
        counts.append({i: len(r.generated) for i, r in rows.items()})
        step += 1
    arrival = work.arrivals[work.newcomer][0]
    start, end = clock[arrival - 1], clock[min(arrival - 1 + window_steps, len(clock) - 1)]
    return worst_gap(token_times(clock, counts), start, end)


def batch_staggered(bench: Bench, stagger: int, newcomer_tokens: int, chunk: int, repeat: int) -> dict:
    variants = [("previous", None, None), ("new, chunk 512 (default)", 512, ALLOWANCE)]
    if chunk != 512:
        variants.append((f"new, chunk {chunk}", chunk, ALLOWANCE))
    variants.append(("new, no gap bound (ceiling)", 512, math.inf))
    work = staggered(bench, stagger, newcomer_tokens, min(chunk, 64))
    print(f"\n[b] batch 8, staggered: a request every {stagger} steps ({len(work.arrivals[0][1].prompt_ids)}-"
          f"{len(work.arrivals[6][1].prompt_ids)}-token prompts, {work.arrivals[0][1].options.max_new_tokens} tokens "
          f"each), then a {newcomer_tokens}-token newcomer at step {work.arrivals[7][0]} while 7 stream; "
          f"{repeat} round(s), interleaved")
    results: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    control: list[float] = []
    for _ in range(repeat):
        for name, c, allowance in variants:
            results[name].append(run_previous(bench, work) if c is None else run_new(bench, work, c, allowance))
            gc.collect()
        control.append(run_without_newcomer(bench, work, 512, results[variants[1][0]][-1]["window_steps"]))
        gc.collect()
    print(f"  {'':<30} {'tokens/s':>9} {'vs prev':>8} {'median gap ms':>14} {'max gap/median':>15} {'newcomer TTFT s':>16}")
    out = {}
    base = median([r["tok_s"] for r in results["previous"]])
    for name, runs in results.items():
        row = {k: median([r[k] for r in runs]) for k in ("tok_s", "gap_ratio", "newcomer_ttft", "median_gap")}
        row["vs_previous"] = row["tok_s"] / base
        row["tokens"] = runs[0]["tokens"]
        out[name] = row
        print(f"  {name:<30} {row['tok_s']:>9.1f} {row['vs_previous']:>7.2f}x {row['median_gap'] * 1e3:>14.1f} "
              f"{row['gap_ratio']:>14.1f}x {row['newcomer_ttft']:>16.2f}")
    out["control"] = {"gap_ratio": median(control), "runs": control}
    print(f"  {'no newcomer (control)':<30} {'':>9} {'':>8} {'':>14} {median(control):>14.1f}x   (runs: "
          f"{', '.join(f'{r:.1f}x' for r in control)}; the same window: this machine's timing noise)")
    return out
