"""nvlm-serve throughput: 16 concurrent streaming clients vs the same requests one at a time.

Starts the server in-process on a loopback port around a small random NVLM-D (LLM 512 wide x 8
layers, real vocabulary), sends 16 chat requests (32 tokens each) first one by one, then all at
once, and prints aggregate tokens/s of both, their ratio, and p50/p99 time to first token
(client side, first content chunk). Run: `python bench/bench_server.py`.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "server"))

from nvlm_engine import NVLMEngine  # noqa: E402
from nvlm_engine.testing import build_tiny_checkpoint, tiny_config  # noqa: E402
from nvlm_server import ServerSettings  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "nvlm-d-72b"
CLIENTS, TOKENS = 16, 32


async def one(client, i: int) -> tuple[float, int]:
    started = time.perf_counter()
    first, tokens = None, 0
    stream = await client.chat.completions.create(
        model="bench", messages=[{"role": "user", "content": f"Request {i}: describe item {i} of the invoice."}],
        max_tokens=TOKENS, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return (first if first is not None else time.perf_counter() - started), tokens


async def run(url: str) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
    await one(client, -1)  # warm up
    started = time.perf_counter()
    serial = [await one(client, i) for i in range(CLIENTS)]
    serial_s = time.perf_counter() - started
    started = time.perf_counter()
    together = await asyncio.gather(*(one(client, i) for i in range(CLIENTS)))
    together_s = time.perf_counter() - started
    for name, results, seconds in (("one at a time", serial, serial_s), (f"{CLIENTS} concurrent", together, together_s)):
        ttfts = sorted(r[0] for r in results)
        tokens = sum(r[1] for r in results)
        p99 = ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]
        print(f"{name:14s}: {tokens} tokens in {seconds:.2f}s = {tokens / seconds:.1f} tok/s; "
              f"TTFT p50 {statistics.median(ttfts) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    ratio = (sum(r[1] for r in together) / together_s) / (sum(r[1] for r in serial) / serial_s)
    print(f"aggregate throughput ratio concurrent/serial: x{ratio:.2f}")


def main() -> None:
    from conftest import running_server

    folder = Path(tempfile.mkdtemp(prefix="nvlm-serve-bench-"))
    config = tiny_config(llm_width=512, llm_layers=8, llm_heads=8, llm_kv_heads=2)
    build_tiny_checkpoint(folder, config=config, tokenizer_from=SHARED if SHARED.is_dir() else None)
    engine = NVLMEngine.from_pretrained(folder, device_map="cpu", dtype="float32")
    with running_server(engine, ServerSettings(model_name="bench", max_batch_size=16)) as url:
        asyncio.run(run(url))


if __name__ == "__main__":
    main()
