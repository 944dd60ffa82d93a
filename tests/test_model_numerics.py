"""The network against independent implementations, in fp32 on tiny random checkpoints.

- vision tower vs transformers' `InternVLVisionModel` (which can express InternViT-6B: RMSNorm,
  joint QK-norm, layer scale, no final norm) with weights remapped from the checkpoint files;
- LLM vs transformers' `Qwen2ForCausalLM` built from the checkpoint's own `llm_config` and
  filled straight from the shard files (not through our loader);
- cached decoding vs one full forward.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nvlm_engine.config import NVLMConfig, VisionConfig
from nvlm_engine.generation import PreparedRequest, TokenIds
from nvlm_engine.reference_decode import decode_one, prefill
from nvlm_engine.model import pixel_shuffle
from nvlm_engine.sampling import SamplingOptions
from nvlm_engine.vision import InternVisionModel


def _read_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    return {k: v.float() for k, v in state.items()}


def _hf_vision(config: VisionConfig, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """transformers' InternVL vision tower with our checkpoint's real heads remapped into it."""
    from transformers import InternVLVisionConfig, InternVLVisionModel

    hf_config = InternVLVisionConfig(
        hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        use_qk_norm=True, norm_type="rms_norm", layer_norm_eps=config.layer_norm_eps, attention_bias=False,
        use_mean_pooling=True, image_size=config.image_size, patch_size=config.patch_size, hidden_act="gelu",
    )
    hf_config._attn_implementation = "eager"
    model = InternVLVisionModel(hf_config).eval()
    real, stored = config.hidden_size, config.total_heads * config.head_dim
    mapped = {
        "embeddings.cls_token": state["vision_model.embeddings.class_embedding"],
        "embeddings.position_embeddings": state["vision_model.embeddings.position_embedding"],
        "embeddings.patch_embeddings.projection.weight": state["vision_model.embeddings.patch_embedding.weight"],
        "embeddings.patch_embeddings.projection.bias": state["vision_model.embeddings.patch_embedding.bias"],
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"vision_model.encoder.layers.{i}.", f"encoder.layer.{i}."
        qkv = state[src + "attn.qkv.weight"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            mapped[dst + f"attention.{name}.weight"] = qkv[j * stored : j * stored + real]
        mapped[dst + "attention.q_norm.weight"] = state[src + "attn.q_norm.weight"][:real]
        mapped[dst + "attention.k_norm.weight"] = state[src + "attn.k_norm.weight"][:real]
        mapped[dst + "attention.projection_layer.weight"] = state[src + "attn.proj.weight"][:, :real]
        mapped[dst + "attention.projection_layer.bias"] = state[src + "attn.proj.bias"]
        mapped[dst + "layernorm_before.weight"] = state[src + "norm1.weight"]
        mapped[dst + "layernorm_after.weight"] = state[src + "norm2.weight"]
        mapped[dst + "lambda_1"] = state[src + "ls1"]
        mapped[dst + "lambda_2"] = state[src + "ls2"]
        for fc in ("fc1", "fc2"):
            mapped[dst + f"mlp.{fc}.weight"] = state[src + f"mlp.{fc}.weight"]
            mapped[dst + f"mlp.{fc}.bias"] = state[src + f"mlp.{fc}.bias"]
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert not unexpected and not [m for m in missing if "mask_token" not in m], (missing, unexpected)
    return model


def _our_vision(config: VisionConfig, state: dict[str, torch.Tensor]) -> InternVisionModel:
    model = InternVisionModel(config).eval()
    prefix = "vision_model."
    model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return model


@pytest.fixture(scope="module")
def checkpoint_state(tiny_checkpoint: Path) -> tuple[NVLMConfig, dict[str, torch.Tensor]]:
    from nvlm_engine.checkpoint import infer_dummy_heads, read_tensor_infos

    config = NVLMConfig.from_folder(tiny_checkpoint)
    config = infer_dummy_heads(config, read_tensor_infos(sorted(tiny_checkpoint.glob("*.safetensors"))))
    return config, _read_checkpoint(tiny_checkpoint)


def test_tiny_checkpoint_carries_dummy_heads(checkpoint_state) -> None:
    config, state = checkpoint_state
    assert config.vision.num_dummy_heads == 4
    qkv = state["vision_model.encoder.layers.0.attn.qkv.weight"]
    assert qkv.shape[0] == 3 * config.vision.total_heads * config.vision.head_dim


def test_vision_tower_matches_transformers_internvl(checkpoint_state) -> None:
    config, state = checkpoint_state
    pixels = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    ours_padded = _our_vision(config.vision, state)
    theirs = _hf_vision(config.vision, state)
    with torch.no_grad():
        expected = theirs(pixels).last_hidden_state[:, 1:]
        padded = ours_padded(pixels)
        assert ours_padded.drop_dummy_heads()
        sliced = ours_padded(pixels)
    assert padded.shape == (2, 1024, config.vision.hidden_size)
    torch.testing.assert_close(padded, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sliced, expected, rtol=1e-4, atol=1e-4)


def test_qk_norm_variance_is_over_real_channels_only(checkpoint_state) -> None:
    config, state = checkpoint_state
    model = _our_vision(config.vision, state)
    norm = model.encoder.layers[0].attn.q_norm
    x = torch.randn(3, 5, config.vision.total_heads * config.vision.head_dim)
    real = config.vision.hidden_size
    expected = x * torch.rsqrt(x[..., :real].pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    wrong = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    assert not torch.allclose(norm(x), wrong)


def test_dummy_heads_with_nonzero_proj_are_kept(checkpoint_state) -> None:
    config, state = checkpoint_state
    state = dict(state)
    name = "vision_model.encoder.layers.1.attn.proj.weight"
    state[name] = state[name].clone()
    state[name][:, -1] = 0.5
    model = _our_vision(config.vision, state)
    assert not model.drop_dummy_heads()
    assert model.encoder.layers[0].attn.num_stored_heads == config.vision.total_heads


def test_pixel_shuffle_v2_token_layout() -> None:
    # Feature value = 100*row + col of the patch, one channel: token i*16+j must hold the 2x2
    # block at rows 2i..2i+1, columns 2j..2j+1 in the order (2i,2j), (2i,2j+1), (2i+1,2j), (2i+1,2j+1).
    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    x = (100 * rows + cols).float().reshape(1, 1024, 1)
    out = pixel_shuffle(x, 0.5, "v2")
    assert out.shape == (1, 256, 4)
    for i, j in [(0, 0), (0, 5), (7, 3), (15, 15)]:
        expected = [100 * (2 * i) + 2 * j, 100 * (2 * i) + 2 * j + 1, 100 * (2 * i + 1) + 2 * j, 100 * (2 * i + 1) + 2 * j + 1]
        assert out[0, i * 16 + j].tolist() == expected
    v1 = pixel_shuffle(x, 0.5, "v1")
    assert not torch.equal(v1, out)  # v1 is the transposed layout


def _hf_qwen2(folder: Path, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """transformers' Qwen2ForCausalLM from the checkpoint's llm_config, weights from the shards."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    raw = json.loads((folder / "config.json").read_text())["llm_config"]
    config = Qwen2Config(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw["num_key_value_heads"], rms_norm_eps=raw["rms_norm_eps"],
        max_position_embeddings=raw["max_position_embeddings"],
        rope_parameters={"rope_type": "dynamic", "rope_theta": raw["rope_theta"], "factor": raw["rope_scaling"]["factor"]},
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    model = Qwen2ForCausalLM(config).eval()
    prefix = "language_model."
    model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return model


def test_llm_prefill_and_cached_decode_match_transformers_qwen2(tiny_checkpoint, tiny_engine, checkpoint_state) -> None:
    _, state = checkpoint_state
    reference = _hf_qwen2(tiny_checkpoint, state)
    ids = TokenIds(**{f: getattr(tiny_engine.token_ids, f) for f in ("end", "image", "pad")})
    vocab = min(5000, len(tiny_engine.tokenizer))
    tokens = torch.randint(0, vocab, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = reference(input_ids=tokens).logits[0]  # [24, V], every position
    request = PreparedRequest(prompt_ids=tokens[0, :16].tolist(), pixel_values=None, options=SamplingOptions())
    logits, step, valid = prefill(tiny_engine.model, [request], ids)
    torch.testing.assert_close(logits[0], full[15], rtol=1e-4, atol=1e-4)
    for position in range(16, 24):  # cached decoding equals the full forward
        logits, valid = decode_one(tiny_engine.model, tokens[:, position], step, valid)
        torch.testing.assert_close(logits[0], full[position], rtol=1e-4, atol=1e-4)


def test_left_padded_batch_prefill_matches_single(tiny_engine) -> None:
    ids = tiny_engine.token_ids
    short = PreparedRequest(prompt_ids=list(range(100, 105)), pixel_values=None, options=SamplingOptions())
    long = PreparedRequest(prompt_ids=list(range(200, 230)), pixel_values=None, options=SamplingOptions())
    batch_logits, _, _ = prefill(tiny_engine.model, [short, long], ids)
    for row, request in enumerate([short, long]):
        alone, _, _ = prefill(tiny_engine.model, [request], ids)
        torch.testing.assert_close(batch_logits[row], alone[0], rtol=1e-4, atol=1e-4)
