"""gpu_check.py's timing helpers and the model it measures: a 72B-shaped slice of NVLM-D in random
weights (tiny in smoke mode), the engine around it, and decode cores as the engine makes them.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gpu_check import Run, Shape

REAL_CONFIG = Path("/work/shared/nvlm-d-72b")


# --- timing ---------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loop(fn: Callable[[], object], n: int, device: torch.device) -> dict:
    """Per-call ms of `n` back-to-back calls: host wall clock, and CUDA-event time on the GPU."""
    sync(device)
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    if device.type == "cuda":
        end.record()
    sync(device)
    wall = (time.perf_counter() - start) * 1e3 / n
    event = begin.elapsed_time(end) / n if device.type == "cuda" else None
    return {"wall_ms": round(wall, 4), "event_ms": None if event is None else round(event, 4)}


# --- the model ------------------------------------------------------------------------------------


def real_config():
    from nvlm_engine.config import NVLMConfig

    if (REAL_CONFIG / "config.json").is_file():
        return NVLMConfig.from_folder(REAL_CONFIG), str(REAL_CONFIG / "config.json")
    return NVLMConfig(), "NVLMConfig() defaults (the published NVLM-D-72B values)"


def slice_config(shape: Shape):
    from nvlm_engine.config import LLMConfig, NVLMConfig, VisionConfig

    if shape.smoke:
        vision = VisionConfig(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=2)
        llm = LLMConfig(vocab_size=896, eos_token_id=895,  # the tiny tokenizer's vocabulary
                        hidden_size=64, intermediate_size=192, num_hidden_layers=shape.layers,
                        num_attention_heads=8, num_key_value_heads=1)
        return NVLMConfig(vision=vision, llm=llm), "tiny smoke config (LLM 64 wide, 8 heads / 1 KV head)"
    config, source = real_config()
    return replace(config, llm=replace(config.llm, num_hidden_layers=shape.layers)), source


def load_tokenizer_any(smoke: bool):
    from nvlm_engine.testing import write_tiny_tokenizer
    from nvlm_engine.tokenizer import load_tokenizer

    if not smoke and (REAL_CONFIG / "vocab.json").is_file():
        return load_tokenizer(REAL_CONFIG), "real"
    folder = Path(tempfile.mkdtemp(prefix="gpu-check-tok-"))
    write_tiny_tokenizer(folder)
    return load_tokenizer(folder), "tiny" + ("" if smoke else " (the real tokenizer files are absent)")


@torch.no_grad()
def random_fill(model: torch.nn.Module) -> None:
    """Random weights that keep activations O(1): N(0, 1/fan_in) matrices, unit norms, small biases."""
    for name, p in model.named_parameters():
        if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "mlp1.0.weight")):
            p.fill_(1.0)
        elif name.endswith(("ls1", "ls2")):
            p.fill_(0.1)
        elif name.endswith("bias"):
            p.zero_()
        elif p.dim() >= 2 and "embed" not in name and "position_embedding" not in name:
            fan_in = p[0].numel()
            p.normal_(0.0, fan_in**-0.5)
        else:
            p.normal_(0.0, 0.5)


def build_engine(run: Run, record: dict) -> None:
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    from nvlm_engine import NVLMEngine
    from nvlm_engine.cores import DecodeSettings
    from nvlm_engine.model import NVLMModel

    shape = run.shape
    config, source = slice_config(shape)
    tokenizer, tok = load_tokenizer_any(shape.smoke)
    start = time.perf_counter()
    with torch.device("meta"):
        model = NVLMModel(config, context_length=32768)
    model.to(shape.dtype)
    model.to_empty(device=shape.device)
    random_fill(model)
    with torch.no_grad():  # zero dummy heads, as in the checkpoint: the engine then drops them
        for layer in model.vision_model.encoder.layers:
            layer.attn.proj.weight[:, layer.attn.num_heads * layer.attn.head_dim :] = 0
    lm = model.language_model
    lm.model.rotary_emb = Qwen2RotaryEmbedding(config=lm.config).to(shape.device)  # computed, not stored
    model.prepare_for_inference()
    sync(shape.device)
    layer_bytes = sum(t.numel() * t.element_size() for t in lm.model.layers[0].parameters())
    count = lambda module: sum(t.numel() for t in module.parameters())
    engine = NVLMEngine(model, tokenizer, context_length=32768, decoding=DecodeSettings())
    run.shared.update(engine=engine, layer_bytes=layer_bytes, config=config)
    record["figures"].update(
        config_source=source, tokenizer=tok, layers=len(lm.model.layers), dtype=str(shape.dtype),
        decoder_layer_gb=round(layer_bytes / 1e9, 3), llm_params_b=round(count(lm) / 1e9, 2),
        vision_params_b=round(count(model.vision_model) / 1e9, 2), projector_params_b=round(count(model.mlp1) / 1e9, 3),
        build_s=round(time.perf_counter() - start, 1),
        vision_dummy_heads_dropped=all(layer.attn.num_stored_heads == layer.attn.num_heads
                                       for layer in model.vision_model.encoder.layers),
    )


def make_core(run: Run, *, compile: bool = False, chunk_tokens: int = 512, prefix_caching: bool = True,
              image_cache=None, end: bool = True):
    """A decode core as `CorePool.new_core` makes it; smoke mode compiles with the eager backend."""
    from nvlm_engine.decoder import decode_layers
    from nvlm_engine.generation import DecodeCore

    engine = run.shared["engine"]
    ids = engine.token_ids if end else replace(engine.token_ids, end=-1)
    core = DecodeCore(engine.model, engine.tokenizer, ids, context_length=engine.context_length, max_slots=64,
                      chunk_tokens=chunk_tokens, prefix_caching=prefix_caching, image_cache=image_cache,
                      compile=compile)
    if compile and run.shape.smoke:  # dynamo's tracing (fullgraph) without inductor's minutes of codegen
        core._step = torch.compile(decode_layers, fullgraph=True, dynamic=False, backend="eager")
    return core
