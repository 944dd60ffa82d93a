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
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # the sibling modules below, from any cwd

from gpu_check_decode import check_decode, check_fp8, check_mixed
from gpu_check_model import build_engine
from gpu_check_steps import check_attention, check_copy, check_environment, check_tp2, check_turn2, check_vision_prefill

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
