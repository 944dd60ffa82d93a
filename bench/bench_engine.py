"""Engine speed against the model card's pipeline, same weights, same run (CPU, fp32).

Measures, on a small random NVLM-D (ViT 512 wide x 4 layers x 16 heads + 7 dummy heads, LLM
512 wide x 8 layers, the real 152,064-token vocabulary):
1. time to first token with one 800x600 image (7 tiles);
2. decode tokens/s at batch 1;
3. aggregate tokens/s of 8 concurrent requests (one engine batch) vs the baseline one by one.
Prints each figure and the ratio ours/baseline. Run: `python bench/bench_engine.py [--repeat N]`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from card_baseline import CardPipeline  # noqa: E402

from nvlm_engine import NVLMEngine  # noqa: E402
from nvlm_engine.testing import build_tiny_checkpoint, tiny_config  # noqa: E402

SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "nvlm-d-72b"
QUESTIONS = [
    "What is the total amount due on this invoice?",
    "Hi",
    "List every line item with its price, then add them up and check the printed total.",
    "Which month had the highest revenue?",
    "Transcribe the document as plain text.",
    "Who signed it?",
    "Summarize the chart in two sentences, mentioning the trend and the largest value shown.",
    "Is there a date?",
]


def best_of(repeat: int, fn):
    times, value = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return min(times), value


@torch.inference_mode()
def weight_read_floor(engine: NVLMEngine, repeat: int = 5) -> float:
    """Seconds per token of just the LLM's matrix-vector products at batch 1.

    Decoding one token must read every LLM weight once; on a CPU that is memory-bandwidth bound,
    so no implementation can beat this floor without changing the weights' dtype.
    """
    lm = engine.model.language_model
    weights = [m.weight for m in lm.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(1, w.shape[1]) for w in weights]

    def once() -> None:
        for w, x in zip(weights, inputs):
            torch.nn.functional.linear(x, w)

    seconds, _ = best_of(repeat, once)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=48)
    args = parser.parse_args()
    torch.manual_seed(0)

    base = tiny_config(vision_width=512, vision_heads=16, vision_layers=4, llm_width=512, llm_layers=8,
                       llm_heads=8, llm_kv_heads=2)
    from dataclasses import replace

    config = replace(base, vision=replace(base.vision, num_dummy_heads=7))
    folder = Path(tempfile.mkdtemp(prefix="nvlm-bench-"))
    tokenizer = SHARED_TOKENIZER if (SHARED_TOKENIZER / "vocab.json").is_file() else None
    build_tiny_checkpoint(folder, config=config, tokenizer_from=tokenizer)
    engine = NVLMEngine.from_pretrained(folder, device_map="cpu", dtype="float32")
    card = CardPipeline(folder)
    print(f"checkpoint: {folder} (vision 512x4x16+7 dummy heads, LLM 512x8, vocab {config.llm.vocab_size})")
    print(f"torch threads: {torch.get_num_threads()}")

    image = Image.frombytes("RGB", (800, 600), torch.randint(0, 256, (800 * 600 * 3,), dtype=torch.uint8).numpy().tobytes())
    question = QUESTIONS[0]
    user = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]

    # 0. same answer: the engine reproduces the reference's greedy tokens
    ours = engine.generate(user, max_new_tokens=8).token_ids
    theirs = card.chat(question, image, 8)
    print(f"greedy tokens equal to the reference pipeline: {ours == theirs[:len(ours)]}")

    # 1. time to first token, one 800x600 image
    card_ttft, _ = best_of(args.repeat, lambda: card.chat(question, image, 1))
    our_ttft, _ = best_of(args.repeat, lambda: engine.generate(user, max_new_tokens=1))
    print(f"TTFT 800x600 (7 tiles): card {card_ttft * 1000:.0f} ms, ours {our_ttft * 1000:.0f} ms, "
          f"speedup x{card_ttft / our_ttft:.2f}")

    # 2. decode tokens/s at batch 1 (text prompt; prefill time subtracted)
    n = args.decode_tokens
    text_user = [{"role": "user", "content": QUESTIONS[2]}]
    card_one, _ = best_of(args.repeat, lambda: card.chat(QUESTIONS[2], None, 1))
    card_n, tokens = best_of(args.repeat, lambda: card.chat(QUESTIONS[2], None, n))
    card_rate = (len(tokens) - 1) / (card_n - card_one)
    our_one, _ = best_of(args.repeat, lambda: engine.generate(text_user, max_new_tokens=1))
    our_n, result = best_of(args.repeat, lambda: engine.generate(text_user, max_new_tokens=n))
    our_rate = (result.usage.completion_tokens - 1) / (our_n - our_one)
    print(f"decode batch 1: card {card_rate:.1f} tok/s, ours {our_rate:.1f} tok/s, speedup x{our_rate / card_rate:.2f}")
    floor = weight_read_floor(engine)
    print(f"  weight-read floor (every LLM matmul of one token alone, no other work): {1 / floor:.1f} tok/s; "
          f"card reaches {card_rate * floor:.0%} of it, ours {our_rate * floor:.0%}")

    # 3. aggregate tokens/s, 8 concurrent requests vs the baseline one by one
    m = 32
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]

    def card_serial() -> int:
        return sum(len(card.chat(q, None, m)) for q in QUESTIONS)

    card_t, card_tokens = best_of(args.repeat, card_serial)
    our_t, results = best_of(args.repeat, lambda: engine.generate_batch(convs, max_new_tokens=m))
    our_tokens = sum(r.usage.completion_tokens for r in results)
    card_agg, our_agg = card_tokens / card_t, our_tokens / our_t
    print(f"8 concurrent requests x {m} tokens: card one by one {card_agg:.1f} tok/s, ours batched "
          f"{our_agg:.1f} tok/s, ratio x{our_agg / card_agg:.2f}")


if __name__ == "__main__":
    main()
