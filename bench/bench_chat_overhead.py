"""What ChatNVLM costs on top of the engine: per request and per token, streaming, same weights.

On the tiny random checkpoint (the tests' model: 64-wide LLM, real 152k vocabulary), each
workload runs `--repeat` times through ChatNVLM, with greedy decoding and a fixed answer length.
The engine instance ChatNVLM uses is wrapped with clocks (its `prepare`, `run` and each step of
`stream_batch`), so every request's wall time splits into time inside the engine and the rest:
the rest is what ChatNVLM and LangChain add (message conversion, chunks, callbacks, tool-call
parsing, the async hand-off). Attributing time inside one run is immune to the run-to-run noise
of a shared machine, which is larger than the overhead itself; paired engine-only runs of the
same workload give the base for the percentage.

1. `stream`: text prompt; 2. `stream + image`: a one-tile image block in the message;
3. `astream`: deltas from the engine's scheduler thread handed to the event loop;
4. `invoke`; 5. `forced tool call`: `tool_choice="any"` (grammar, parsing, tool_call_chunks).

Prints, per workload: the engine-only median time per request, and ChatNVLM's median overhead per
request (ms and % of the engine's time) and per token (us). Target: under 5% per request.
Run: `python bench/bench_chat_overhead.py [--repeat 15] [--tokens 64] [--threads 1]`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from langchain_core.messages import HumanMessage
from PIL import Image

from nvlm_engine import NVLMEngine
from nvlm_engine.testing import build_tiny_checkpoint
from nvlm_langchain import ChatNVLM
from nvlm_langchain.engines import get_engine

SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "nvlm-d-72b"
QUESTION = "List every line item with its price, then add them up and check the printed total."


class EngineClock:
    """Accumulates the seconds spent inside one engine instance's methods (any thread)."""

    def __init__(self, engine: NVLMEngine) -> None:
        self.inside = 0.0
        self._lock = threading.Lock()
        prepare, run, stream_batch = engine.prepare, engine.run, engine.stream_batch

        def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self._add(time.perf_counter() - start)
            return call

        def timed_stream_batch(requests: Any) -> Any:
            deltas = stream_batch(requests)
            while True:
                start = time.perf_counter()
                try:
                    delta = next(deltas)
                except StopIteration:
                    self._add(time.perf_counter() - start)
                    return
                self._add(time.perf_counter() - start)
                yield delta

        engine.prepare, engine.run, engine.stream_batch = timed(prepare), timed(run), timed_stream_batch  # type: ignore[method-assign]
        # ChatNVLM decodes on its engine's Scheduler thread: clock those engine steps too.
        from nvlm_engine.generation import DecodeBatch

        start_fn, advance_fn = DecodeBatch.start.__func__, DecodeBatch.advance
        DecodeBatch.start = classmethod(lambda cls, *a, **k: timed(start_fn)(cls, *a, **k))  # type: ignore[method-assign]
        DecodeBatch.advance = lambda self_: timed(advance_fn)(self_)  # type: ignore[method-assign]

    def _add(self, seconds: float) -> None:
        with self._lock:
            self.inside += seconds

    def measure(self, fn: Callable[[], int]) -> tuple[float, float, int]:
        """(wall seconds, seconds outside the engine, tokens) of one call."""
        self.inside = 0.0
        start = time.perf_counter()
        tokens = fn()
        wall = time.perf_counter() - start
        return wall, wall - self.inside, tokens


def run_workload(name: str, clock: EngineClock, repeat: int, engine_fn: Callable[[], int], chat_fn: Callable[[], int]) -> None:
    engine_fn(), chat_fn()  # warm both paths
    engine_walls, overheads, tokens = [], [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        engine_fn()
        engine_walls.append(time.perf_counter() - start)
        _, outside, tokens = clock.measure(chat_fn)
        overheads.append(outside)
    base, over = statistics.median(engine_walls), statistics.median(overheads)
    print(f"{name:<17} engine {base * 1000:7.1f} ms/request ({tokens} tokens) | ChatNVLM overhead "
          f"{over * 1000:5.2f} ms/request = {100 * over / base:4.1f}% | {over / tokens * 1e6:5.1f} us/token")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the tiny model gains nothing from more)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="nvlm-chat-bench-"))
    tokenizer = SHARED_TOKENIZER if (SHARED_TOKENIZER / "vocab.json").is_file() else None
    build_tiny_checkpoint(folder, tokenizer_from=tokenizer)
    n = args.tokens
    llm = ChatNVLM(model=str(folder), device_map="cpu", dtype="float32", max_tokens=n)
    engine = llm.engine
    print(f"checkpoint: {folder} (tiny: LLM 64 wide x 2 layers, vocab {engine.config.llm.vocab_size}); "
          f"torch threads {torch.get_num_threads()}; {args.repeat} runs per workload, medians")

    fresh = NVLMEngine(engine.model, engine.tokenizer, context_length=engine.context_length)  # unclocked twin
    clock = EngineClock(engine)

    def engine_stream(messages: list[dict]) -> Callable[[], int]:
        def run() -> int:
            stream = fresh.stream(messages, max_new_tokens=n)
            for _ in stream:
                pass
            assert stream.result is not None
            return stream.result.usage.completion_tokens
        return run

    def chat_stream(messages: list) -> Callable[[], int]:
        def run() -> int:
            last = None
            for chunk in llm.stream(messages):
                last = chunk
            return last.usage_metadata["output_tokens"]
        return run

    # 1. text streaming
    text = [{"role": "user", "content": QUESTION}]
    run_workload("stream", clock, args.repeat, engine_stream(text), chat_stream([HumanMessage(QUESTION)]))

    # 2. streaming with a one-tile image
    buffer = io.BytesIO()
    pixels = torch.randint(0, 256, (160, 224, 3), dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(buffer, "PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    with_image = [{"role": "user", "content": [{"type": "image", "image": f"data:image/png;base64,{data}"},
                                               {"type": "text", "text": QUESTION}]}]
    block = {"type": "image", "base64": data, "mime_type": "image/png"}
    run_workload("stream + image", clock, args.repeat, engine_stream(with_image),
                 chat_stream([HumanMessage([{"type": "text", "text": QUESTION}, block])]))

    # 3. async streaming (the engine side is the same synchronous stream)
    loop = asyncio.new_event_loop()

    def chat_astream() -> int:
        async def consume() -> int:
            last = None
            async for chunk in llm.astream([HumanMessage(QUESTION)]):
                last = chunk
            return last.usage_metadata["output_tokens"]
        return loop.run_until_complete(consume())

    run_workload("astream", clock, args.repeat, engine_stream(text), chat_astream)
    loop.close()

    # 4. invoke
    run_workload("invoke", clock, args.repeat, lambda: fresh.generate(text, max_new_tokens=n).usage.completion_tokens,
                 lambda: llm.invoke([HumanMessage(QUESTION)]).usage_metadata["output_tokens"])

    # 5. a forced tool call (the engine-only base decodes the same number of tokens, unconstrained)
    def lookup(sku: int, quantity: int) -> str:
        """Look up a line item by its SKU."""
        return "ok"

    bound = llm.bind_tools([lookup], tool_choice="any", parallel_tool_calls=False)
    _ = get_engine(llm.engine_spec()).grammars  # build the grammar compiler outside the timings
    calls = [c for c in bound.stream([HumanMessage(QUESTION)]) if c.usage_metadata]
    length = calls[-1].usage_metadata["output_tokens"]

    def chat_tool() -> int:
        last = None
        for chunk in bound.stream([HumanMessage(QUESTION)]):
            last = chunk
        return last.usage_metadata["output_tokens"]

    def engine_same_length() -> int:
        return fresh.generate(text, max_new_tokens=length).usage.completion_tokens

    run_workload("forced tool call", clock, args.repeat, engine_same_length, chat_tool)
    print("(forced tool call: the overhead includes building the request's grammar matcher and parsing the call; "
          "the grammar mask itself is applied inside the engine)")


if __name__ == "__main__":
    main()
