"""Tensor parallelism on the CPU (issue 13): decode tokens/s over 2 processes (gloo) vs 1 process.

The model is a random NVLM-D whose decoder matmuls dominate a decode step: LLM 2048 wide x 4
layers, 16 query heads and 4 KV heads (head dim 128), MLP 8192, ~250M decoder parameters
(1 GB in fp32), with the tests' tiny byte-level vocabulary (896 rows) so the LM head does not
hide the layers, and a tiny vision tower (text only here). Each setting loads the engine, makes
a decode core with the end token disabled (every row decodes its whole budget), prefills
`--batch` random 64-token prompts, then times `--steps` decode steps, `--repeats` times
(median). TP=2 gives each rank half the cores (what `tensor_parallel` sets on the CPU); TP=1
runs twice, with every core in its one process (the same cores as TP=2) and with half of them
(the same threads per process: on an oversubscribed machine, OpenMP threads of one process
that wait on each other can be slower than one thread). Figures: ms per step and decode
tokens/s for each, and the TP=2 / TP=1 ratios.

What to expect: on a CPU the ranks share one memory bus, so splitting the weight reads over
two processes does not add bandwidth the way two GPUs do; each step also pays two gloo
all-reduces per layer (loopback TCP, ~0.1-1 ms each) and a broadcast of the step's inputs.
With few cores shared with other work the ratio is typically below 1. On GPUs (NVLink
all-reduce, each GPU its own HBM) the same split halves the bytes each GPU reads per token;
`bench/gpu_check.py`'s `tp2_half_width` step projects that case.

`--compile` also runs TP=1 (every core) and TP=2 with `DecodeSettings(compile=True)` decode
steps (torch.compile through inductor, the all-reduces inside each rank's graph), compile time
reported apart, and prints compiled over eager for each.

Run: `python bench/bench_tensor_parallel.py [--batch 1,4] [--steps 32] [--repeats 3] [--compile] [--smoke]`.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvlm_engine import NVLMEngine
from nvlm_engine.generation import DecodeCore, PreparedRequest
from nvlm_engine.sampling import make_options
from nvlm_engine.testing import build_tiny_checkpoint, tiny_config


def build(folder: Path, smoke: bool) -> Path:
    """The benchmark's checkpoint (tiny shapes with `smoke`: the run only checks it works)."""
    if smoke:
        config = tiny_config(vocab_size=896, llm_heads=4, llm_kv_heads=2)
    else:
        config = tiny_config(vocab_size=896, llm_width=2048, llm_layers=4, llm_heads=16, llm_kv_heads=4)
        config = replace(config, llm=replace(config.llm, intermediate_size=8192))
    return build_tiny_checkpoint(folder, config=config, num_shards=2)


def measure(folder: Path, tp: int, batches: list[int], steps: int, repeats: int,
            threads: int | None = None, compile: bool = False) -> dict[int, float]:
    """Median seconds per decode step at each batch size, on an engine of `tp` ranks.

    `threads`: torch threads of the one process (TP=1 only; TP=2 sets its own). `compile`:
    compiled decode steps (the warm-up round compiles; its time is printed apart).
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    engine = NVLMEngine.from_pretrained(folder, device_map="cpu", dtype="float32", progress=False,
                                        tensor_parallel=tp)
    print(f"TP={tp}{' compiled' if compile else ''}: loaded in {time.perf_counter() - started:.1f} s; "
          f"{torch.get_num_threads()} thread(s) per rank", flush=True)
    ids = replace(engine.token_ids, end=-1)  # never ends: every row decodes its whole budget
    out: dict[int, float] = {}
    try:
        for batch in batches:
            times = []
            warm = time.perf_counter()
            for repeat in range(repeats + 1):  # the first round warms up (and compiles)
                core = DecodeCore(engine.model, engine.tokenizer, ids, context_length=engine.context_length,
                                  max_slots=max(batches) + 1, compile=compile)
                g = torch.Generator().manual_seed(repeat)
                requests = [PreparedRequest(prompt_ids=torch.randint(0, 700, (64,), generator=g).tolist(),
                                            pixel_values=None, options=make_options(max_new_tokens=steps + 4))
                            for _ in range(batch)]
                core.admit(list(enumerate(requests)))
                while len(core.running) < batch:
                    core.step()
                t0 = time.perf_counter()
                for _ in range(steps):
                    core.step()
                if repeat:
                    times.append((time.perf_counter() - t0) / steps)
                else:
                    warm = time.perf_counter() - warm
            out[batch] = statistics.median(times)
            print(f"  batch {batch}: {1000 * out[batch]:.1f} ms/step, {batch / out[batch]:.1f} tokens/s"
                  f"{f' (warm-up round with compiling: {warm:.1f} s)' if compile else ''}", flush=True)
    finally:
        engine.close()
        del engine
        gc.collect()
        torch.set_num_threads(before)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batch", default="1,4", help="decode batch sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time compiled decode steps (TP=1 and TP=2)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: check that it runs, figures mean nothing")
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    steps, repeats = (4, 1) if args.smoke else (args.steps, args.repeats)
    print(f"{os.cpu_count()} CPU cores; torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build(Path(tmp), args.smoke)
        cores = os.cpu_count() or 1
        one = measure(folder, 1, batches, steps, repeats, threads=cores)
        half = measure(folder, 1, batches, steps, repeats, threads=max(1, cores // 2))
        two = measure(folder, 2, batches, steps, repeats)
        if args.compile:
            one_compiled = measure(folder, 1, batches, steps, repeats, threads=cores, compile=True)
            two_compiled = measure(folder, 2, batches, steps, repeats, compile=True)
    print(f"\nsummary (decode tokens/s; TP=1 with {cores} and {max(1, cores // 2)} thread(s), TP=2 with "
          f"{max(1, cores // 2)} per rank):")
    for batch in batches:
        print(f"  batch {batch}: TP=1 {batch / one[batch]:.1f} / {batch / half[batch]:.1f}, TP=2 {batch / two[batch]:.1f};"
              f" ratio TP=2/TP=1 {one[batch] / two[batch]:.2f}x (same cores), {half[batch] / two[batch]:.2f}x "
              "(same threads per process)")
    if args.compile:
        print("compiled decode steps over eager (same run):")
        for batch in batches:
            print(f"  batch {batch}: TP=1 {one[batch] / one_compiled[batch]:.2f}x, TP=2 {two[batch] / two_compiled[batch]:.2f}x; "
                  f"TP=2/TP=1 compiled {one_compiled[batch] / two_compiled[batch]:.2f}x (same cores)")


if __name__ == "__main__":
    main()
