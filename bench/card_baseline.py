"""The model card's straightforward pipeline, rebuilt from SPEC.md as the benchmarks' baseline.

What the published remote code does, on the same weights as the engine:
- torchvision preprocessing (`T.Resize` + `T.ToTensor` + `T.Normalize` per tile);
- the prompt tokenized as one string holding every `<|vision_pad|>` (256 per tile);
- the vision tower with its dummy heads computed and naive (eager) attention;
- the LLM run by transformers' `generate(inputs_embeds=...)` with eager attention and
  logits for every prompt position (the 4.39-era behaviour the reference was written for).

Used by `bench_engine.py`; not part of the package.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms.functional import InterpolationMode

from nvlm_engine.checkpoint import fill_model, find_weight_files, infer_dummy_heads, read_tensor_infos
from nvlm_engine.config import NVLMConfig
from nvlm_engine.model import NVLMModel, pixel_shuffle
from nvlm_engine.tokenizer import load_tokenizer
from nvlm_engine.vision import InternAttention

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def card_tiles(image: Image.Image, max_num: int = 6, size: int = 448) -> torch.Tensor:
    """`load_image` + `dynamic_preprocess` of the model card, as SPEC section 5 describes them."""
    image = image.convert("RGB")
    w, h = image.size
    ratio = w / h
    grids = sorted({(i, j) for n in range(1, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                    if 1 <= i * j <= max_num}, key=lambda g: g[0] * g[1])
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(ratio - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and w * h > 0.5 * size * size * cols * rows:
            best = (cols, rows)
    cols, rows = best
    resized = image.resize((size * cols, size * rows))
    tiles = [resized.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)) for r in range(rows) for c in range(cols)]
    if len(tiles) > 1:
        tiles.append(image.resize((size, size)))
    transform = T.Compose([T.Resize((size, size), interpolation=InterpolationMode.BICUBIC), T.ToTensor(), T.Normalize(MEAN, STD)])
    return torch.stack([transform(t) for t in tiles])


def _naive_attention(self: InternAttention, x: torch.Tensor) -> torch.Tensor:
    # The reference's `_naive_attn`: explicit softmax(q k^T * scale) v over all stored heads.
    t, n, _ = x.shape
    heads = self.num_stored_heads
    q, k, v = self.qkv(x).view(t, n, 3, heads * self.head_dim).unbind(2)
    q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = (s.view(t, n, heads, self.head_dim).transpose(1, 2) for s in (q, k, v))
    attn = ((q * self.head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(t, n, heads * self.head_dim))


class CardPipeline:
    """The reference pipeline on a checkpoint folder (CPU, fp32)."""

    def __init__(self, folder: Path) -> None:
        self.tokenizer = load_tokenizer(folder)
        config = NVLMConfig.from_folder(folder)
        infos = read_tensor_infos(find_weight_files(folder))
        config = infer_dummy_heads(config, infos)
        with torch.device("meta"):
            model = NVLMModel(config)
        fill_model(model, infos, device_of=lambda name: torch.device("cpu"), dtype=torch.float32)
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

        lm = model.language_model
        lm.config._attn_implementation = "eager"
        lm.model.rotary_emb = Qwen2RotaryEmbedding(config=lm.config)
        for layer in model.vision_model.encoder.layers:  # dummy heads kept and computed
            layer.attn.forward = _naive_attention.__get__(layer.attn)
        self.model = model.eval()
        self.config = config
        self.pad_id = self.tokenizer.convert_tokens_to_ids("<|vision_pad|>")
        self.end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def prompt(self, question: str, num_tiles: list[int]) -> str:
        images = ""
        for n in num_tiles:
            tags = [f"<tile_{i}>" for i in range(1, n)] + ["<tile_global_thumbnail>"] if n > 1 else ["<tile_global_thumbnail>"]
            images += "<Image>" + "".join(tag + "<|vision_pad|>" * 256 for tag in tags) + "</Image>\n"
        return ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n"
                f"{images}{question}<|im_end|><|im_start|>assistant\n")

    @torch.inference_mode()
    def chat(self, question: str, image: Image.Image | None, max_new_tokens: int) -> list[int]:
        pixel_values = card_tiles(image) if image is not None else None
        text = self.prompt(question, [pixel_values.shape[0]] if pixel_values is not None else [])
        ids = self.tokenizer(text, return_tensors="pt").input_ids
        embeds = self.model.language_model.model.embed_tokens(ids)
        if pixel_values is not None:
            features = pixel_shuffle(self.model.vision_model(pixel_values), 0.5, "v2")
            embeds[ids == self.pad_id] = self.model.mlp1(features).flatten(0, 1)
        out = self.model.language_model.generate(
            inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=self.end_id, pad_token_id=self.end_id,
            logits_to_keep=0,
        )
        return out[0].tolist()
