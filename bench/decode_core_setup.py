"""bench_decode_core.py's setup: the small random NVLM-D and its engine (`build`), decode cores and
requests as the parts use them (`Bench`), the targets, and small timing helpers.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from nvlm_engine import NVLMEngine
from nvlm_engine.decoder import decode_layers
from nvlm_engine.generation import DecodeCore, PreparedRequest, TokenIds
from nvlm_engine.image_cache import ImageEmbeddingCache
from nvlm_engine.sampling import make_options
from nvlm_engine.testing import build_tiny_checkpoint, tiny_config

SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "nvlm-d-72b"
TARGETS = {"slope": 0.30, "throughput": 1.3, "gap": 3.0, "turn2": 20.0}


# --- setup -----------------------------------------------------------------------------------


@dataclass
class Bench:
    engine: NVLMEngine
    ids: TokenIds  # the engine's, end token disabled
    vocab: int
    smoke: bool = False

    @property
    def model(self):
        return self.engine.model

    def core(self, *, chunk_tokens: int = 512, prefix_caching: bool = True, compile: bool = False,
             image_cache: ImageEmbeddingCache | None = None, max_slots: int = 16, end: bool = False) -> DecodeCore:
        """A decode core as `CorePool.new_core` makes it (end token disabled unless `end`)."""
        e = self.engine
        core = DecodeCore(e.model, e.tokenizer, e.token_ids if end else self.ids, context_length=e.context_length,
                          kv_tokens=None, max_slots=max_slots, chunk_tokens=chunk_tokens,
                          prefix_caching=prefix_caching, image_cache=image_cache, compile=compile)
        if compile and self.smoke:  # dynamo's fullgraph tracing without inductor's C++ codegen (minutes)
            core._step = torch.compile(decode_layers, fullgraph=True, dynamic=False, backend="eager")
        return core

    def request(self, length: int, new_tokens: int, seed: int) -> PreparedRequest:
        """A text request of `length` random ordinary token ids."""
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, min(700, self.vocab), (length,), generator=g).tolist()
        return PreparedRequest(prompt_ids=ids, pixel_values=None, options=make_options(max_new_tokens=new_tokens))


def build(args: argparse.Namespace) -> Bench:
    torch.manual_seed(0)
    if args.smoke:  # the script's plumbing only: figures mean nothing
        base = tiny_config(128, vision_width=64, vision_heads=4, vision_layers=1, llm_width=64, llm_layers=2,
                           llm_heads=8, llm_kv_heads=1)
    else:
        base = tiny_config(128, vision_width=256, vision_heads=4, vision_layers=3, llm_width=512, llm_layers=8,
                           llm_heads=8, llm_kv_heads=1)
    folder = Path(args.workdir) / "checkpoint"
    tokenizer = SHARED_TOKENIZER if args.real_vocab and (SHARED_TOKENIZER / "vocab.json").is_file() else None
    build_tiny_checkpoint(folder, config=base, tokenizer_from=tokenizer)
    context = max(32768, max(args.contexts) + 1024)
    engine = NVLMEngine.from_pretrained(folder, device_map="cpu", dtype="float32", context_length=context,
                                        progress=False)
    vocab = engine.model.language_model.lm_head.out_features
    llm, vision = base.llm, base.vision
    print(f"model{' (SMOKE: tiny, figures meaningless)' if args.smoke else ''}: LLM {llm.hidden_size} wide x "
          f"{llm.num_hidden_layers} layers, {llm.num_attention_heads} heads / {llm.num_key_value_heads} KV head "
          f"(head dim {llm.head_dim}), MLP {llm.intermediate_size}; vision {vision.hidden_size} x "
          f"{vision.num_hidden_layers} layers; vocabulary {vocab} ({'real' if tokenizer else 'reduced: tiny BPE'}); "
          f"fp32, CPU, {torch.get_num_threads()} thread(s); checkpoint {folder}")
    return Bench(engine, replace(engine.token_ids, end=-1), vocab, smoke=args.smoke)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def timed(fn, *a, **k) -> float:
    start = time.perf_counter()
    fn(*a, **k)
    return time.perf_counter() - start


def fresh(request: PreparedRequest) -> PreparedRequest:
    return replace(request, cancel=type(request.cancel)())

