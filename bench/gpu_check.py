"""GPU checks for multi-device placement and quantization: one short script, figures printed.

    python bench/gpu_check.py [--layers 6] [--context 1024] [--steps 40]

1. A tiny checkpoint split between cuda:0 and the CPU gives the same greedy tokens (and close
   logits) as on cuda:0 alone; then a batch in which one request finishes first (this exercises
   dropping finished rows from a KV cache that spans devices).
2. Quantized tiny engines (fp8, bnb-8bit, bnb-4bit where available) against bf16.
3. A 72B-shaped slice (full-width Qwen2-72B decoder layers, real vocabulary) in bf16 on the GPU:
   batch-1 decode time per layer from two depths (the difference removes embeddings, LM head and
   sampling), projected to the 80-layer model on 2x H200, and the fraction of the GPU's memory
   bandwidth the decoder achieves (target: at least 60% of the H200's 4.8 TB/s). The same for
   FP8 weights (1x H200) when the GPU supports it.

Exits 0 with a message and no checks when CUDA is absent.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "B200": 8.0e12}  # bytes/s, HBM


def check_split(folder: Path) -> None:
    from PIL import Image

    from nvlm_engine import NVLMEngine
    from nvlm_engine.generation import prefill

    torch.backends.cuda.matmul.allow_tf32 = False  # compare like with like across GPU and CPU
    torch.backends.cudnn.allow_tf32 = False
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (640, 480), (30, 90, 200))},
                                             {"type": "text", "text": "Describe the picture."}]}]
    whole = NVLMEngine.from_pretrained(folder, device_map="cuda:0", dtype="float32")
    split_map = {"": "cuda:0", "language_model.model.layers.1": "cpu", "language_model.model.layers.2": "cpu"}
    split = NVLMEngine.from_pretrained(folder, device_map=split_map, dtype="float32")
    a, b = whole.generate(messages, max_new_tokens=16), split.generate(messages, max_new_tokens=16)
    la, _, _ = prefill(whole.model, [whole.prepare(messages)], whole.token_ids)
    lb, _, _ = prefill(split.model, [split.prepare(messages)], split.token_ids)
    print(f"[split] cuda:0 vs cuda:0+cpu: same greedy tokens: {a.token_ids == b.token_ids} ({len(a.token_ids)} tokens); "
          f"max |logit diff| {(la.cpu() - lb.cpu()).abs().max().item():.2e}")
    try:
        short = split.prepare([{"role": "user", "content": "Say hi."}], max_new_tokens=2)
        long = split.prepare([{"role": "user", "content": "Tell me a story."}], max_new_tokens=6)
        results = split.run([short, long])
        reference = whole.run([whole.prepare([{"role": "user", "content": "Say hi."}], max_new_tokens=2),
                               whole.prepare([{"role": "user", "content": "Tell me a story."}], max_new_tokens=6)])
        same = [r.token_ids for r in results] == [r.token_ids for r in reference]
        print(f"[split] batch with an early finisher across devices: OK, same tokens: {same}")
    except RuntimeError as e:
        print(f"[split] batch with an early finisher across devices: FAILS ({str(e)[:160]})")


def check_quantized(folder: Path) -> None:
    import importlib.util

    import torch.nn.functional as F

    from nvlm_engine import NVLMEngine
    from nvlm_engine.generation import prefill

    full = NVLMEngine.from_pretrained(folder, device_map="cuda:0", dtype="bfloat16")
    request = full.prepare([{"role": "user", "content": "Describe the weather in Paris."}])
    reference, _, _ = prefill(full.model, [request], full.token_ids)
    for scheme in ("fp8", "bnb-8bit", "bnb-4bit"):
        if scheme.startswith("bnb") and importlib.util.find_spec("bitsandbytes") is None:
            print(f"[quant] {scheme}: skipped (bitsandbytes not installed)")
            continue
        try:
            engine = NVLMEngine.from_pretrained(folder, device_map="cuda:0", dtype="bfloat16", quantization=scheme)
            logits, _, _ = prefill(engine.model, [request], engine.token_ids)
            text = engine.generate([{"role": "user", "content": "hi"}], max_new_tokens=4).token_ids
            print(f"[quant] {scheme}: logits cosine vs bf16 {F.cosine_similarity(logits, reference).item():.4f}; "
                  f"generates {len(text)} tokens; memory {torch.cuda.memory_allocated() / 2**30:.2f} GiB")
            del engine
        except Exception as e:  # report and go on: one failing format must not hide the others
            print(f"[quant] {scheme}: FAILS {type(e).__name__}: {str(e)[:200]}")
        torch.cuda.empty_cache()


def build_slice(layers: int):  # noqa: ANN201
    """NVLM-D with the real 72B LLM shape (a few layers) and a tiny vision tower, random bf16 on cuda:0."""
    from nvlm_engine.config import LLMConfig
    from nvlm_engine.engine import _rebuild_rotary
    from nvlm_engine.model import NVLMModel
    from nvlm_engine.testing import tiny_config

    config = replace(tiny_config(), llm=replace(LLMConfig(), num_hidden_layers=layers))
    with torch.device("meta"):
        model = NVLMModel(config, context_length=32768)
    model.to_empty(device="cuda:0").to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
    _rebuild_rotary(model, torch.device("cuda:0"))
    return model.eval()


@torch.inference_mode()
def decode_step_seconds(model, context: int, steps: int) -> float:  # noqa: ANN001
    """Seconds per batch-1 decode step (embedding, decoder, LM head, greedy pick) after `context` tokens."""
    from transformers import DynamicCache

    from nvlm_engine.generation import decode_one
    from nvlm_engine.model import LLMStep

    ids = torch.randint(0, 150000, (1, context), device="cuda:0")
    step = LLMStep(torch.arange(context, device="cuda:0")[None], None, DynamicCache())
    logits = model.forward_llm(model.embed(ids, None, -1), step)
    valid = torch.ones(1, context, dtype=torch.bool, device="cuda:0")
    for i in range(steps + 5):
        if i == 5:
            torch.cuda.synchronize()
            started = time.perf_counter()
        token = int(logits.argmax(-1))  # the engine syncs once per token the same way
        logits, valid = decode_one(model, torch.tensor([token], device="cuda:0"), step, valid)
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def per_layer(model, layers: int, context: int, steps: int) -> tuple[float, float]:  # noqa: ANN001
    """(seconds per decoder layer, seconds of everything else) from full depth and depth 2."""
    all_layers = model.language_model.model.layers
    deep = decode_step_seconds(model, context, steps)
    model.language_model.model.layers = all_layers[:2]
    shallow = decode_step_seconds(model, context, steps)
    model.language_model.model.layers = all_layers
    layer = (deep - shallow) / (layers - 2)
    return layer, shallow - 2 * layer


def check_bandwidth(layers: int, context: int, steps: int) -> None:
    from nvlm_engine.quantization import get_scheme, quantize_model

    name = torch.cuda.get_device_name()
    peak = next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)
    model = build_slice(layers)
    layer_bytes = sum(t.numel() * t.element_size() for t in model.language_model.model.layers[0].parameters())
    kv_bytes = 2 * 8 * 128 * 2 * context  # keys and values read per layer per step
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda:0")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    copy_bw = 2 * 10 * x.numel() / (time.perf_counter() - started)  # read + write
    del x, y
    hidden = torch.randn(1, 1, 8192, dtype=torch.bfloat16, device="cuda:0")
    started = time.perf_counter()
    for _ in range(20):
        hidden = hidden.cpu().to("cuda:0")  # an upper bound for a GPU-to-GPU hop of the hidden state
    torch.cuda.synchronize()
    hop = (time.perf_counter() - started) / 20

    layer_s, rest_s = per_layer(model, layers, context, steps)
    achieved = (layer_bytes + kv_bytes) / layer_s
    token_s = 80 * layer_s + rest_s + 2 * hop  # 2x H200: the model card's split crosses twice per token
    print(f"[decode] {name}: bf16 decoder layer {layer_s * 1e3:.3f} ms ({layer_bytes / 1e9:.2f} GB weights + "
          f"{kv_bytes / 1e6:.1f} MB KV at {context} tokens); embed+norm+LM head+pick {rest_s * 1e3:.2f} ms; "
          f"hop <= {hop * 1e6:.0f} us")
    print(f"[decode] achieved {achieved / 1e12:.2f} TB/s = "
          + (f"{achieved / peak:.0%} of the {peak / 1e12:.1f} TB/s peak" if peak else "(peak unknown for this GPU)")
          + f"; device copy reaches {copy_bw / 1e12:.2f} TB/s ({achieved / copy_bw:.0%} of that)")
    print(f"[decode] projected NVLM-D-72B, 2x H200, bf16, batch 1: {1 / token_s:.1f} tokens/s "
          f"({token_s * 1e3:.1f} ms per token)")
    if torch.cuda.get_device_capability() >= get_scheme("fp8").min_capability:
        try:
            quantize_model(model, get_scheme("fp8"), torch.bfloat16)
            torch.cuda.empty_cache()
            fp8_layer, fp8_rest = per_layer(model, layers, context, steps)
            fp8_bytes = sum(t.numel() * t.element_size() for t in [*model.language_model.model.layers[0].parameters(),
                                                                    *model.language_model.model.layers[0].buffers()])
            print(f"[decode] fp8 decoder layer {fp8_layer * 1e3:.3f} ms ({(fp8_bytes + kv_bytes) / fp8_layer / 1e12:.2f} TB/s); "
                  f"projected NVLM-D-72B, 1x H200, fp8, batch 1: {1 / (80 * fp8_layer + fp8_rest):.1f} tokens/s")
        except Exception as e:  # report, do not hide the bf16 figures
            print(f"[decode] fp8: FAILS {type(e).__name__}: {str(e)[:200]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=6, help="full-width decoder layers in the slice")
    parser.add_argument("--context", type=int, default=1024, help="tokens in the KV cache while decoding")
    parser.add_argument("--steps", type=int, default=40, help="decode steps timed per depth")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible; nothing to check (run this on a GPU machine).")
        return 0
    from nvlm_engine.testing import build_tiny_checkpoint, tiny_config

    print(f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB")
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_checkpoint(tmp, config=tiny_config(llm_layers=4))
        for check in (check_split, check_quantized):
            try:
                check(folder)
            except Exception as e:  # keep going: every figure is worth having
                print(f"[{check.__name__}] FAILS {type(e).__name__}: {str(e)[:300]}")
            torch.cuda.empty_cache()
    check_bandwidth(args.layers, args.context, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
