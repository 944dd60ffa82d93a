"""Read an NVLM-D checkpoint folder in its published layout into an `NVLMModel`.

The published layout: `config.json`, `model.safetensors.index.json`, `model-000NN-of-000MM.safetensors`
shards, tokenizer files, and `*.py` remote code, which is never imported or executed here.

Loading, in order:
1. find the weight files (safetensors; pickled `.bin`/`.pt` refused unless allowed);
2. read every shard's header (names, shapes, dtypes; truncated or corrupt shards fail here);
3. build the model on the `meta` device (no memory, no random init) and compare its tensors
   with the checkpoint's: missing, unexpected and wrong-shaped names are one typed error;
4. fill the model shard by shard, tensor by tensor: each tensor is read, cast to the compute
   dtype on its target device and assigned, so peak host memory stays near one tensor
   beyond the model itself;
5. rebuild the buffers that are not in the checkpoint (the rotary table) on their device.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import NVLMConfig
from .errors import CheckpointError, CheckpointTensorError, UnsafeCheckpointError

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_LIST_LIMIT = 10


@dataclass(frozen=True)
class TensorInfo:
    """Where a checkpoint tensor lives and what it is, from the shard header."""

    shard: Path
    dtype: str
    shape: tuple[int, ...]


def find_weight_files(folder: Path, *, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint folder, in load order."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e}); re-download it.") from e
        shards = sorted({folder / name for name in weight_map.values()})
        absent = [p.name for p in shards if not p.is_file()]
        if absent:
            raise CheckpointError(
                f"{len(absent)} shard(s) listed in {INDEX_FILE} are not in {folder}: {_short(absent)}. "
                "The download is incomplete; fetch the missing files."
            )
        return shards
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        return safetensors
    pickles = sorted(p for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{folder} holds only pickled weights ({_short([p.name for p in pickles])}); unpickling can "
                "execute arbitrary code, so it is refused. Convert them to safetensors, or pass "
                "allow_pickle=True if you trust the files."
            )
        logger.warning("loading pickled weights from %s because allow_pickle=True", folder)
        return pickles
    raise CheckpointError(
        f"No weights in {folder}: expected {INDEX_FILE} with model-*.safetensors shards, or model.safetensors."
    )


def read_tensor_infos(files: list[Path]) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of every tensor, read from the file headers only."""
    from safetensors import SafetensorError, safe_open

    infos: dict[str, TensorInfo] = {}
    for path in files:
        if path.suffix in _PICKLE_SUFFIXES:
            for name, tensor in _load_pickle(path).items():
                infos[name] = TensorInfo(path, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))
            continue
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    if name in infos:
                        raise CheckpointError(f"Tensor {name!r} is stored twice: in {infos[name].shard.name} and {path.name}.")
                    piece = f.get_slice(name)
                    infos[name] = TensorInfo(path, piece.get_dtype(), tuple(piece.get_shape()))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"Shard {path.name} is corrupt or truncated ({e}); size on disk {path.stat().st_size} bytes. "
                "Re-download it and check its sha256."
            ) from e
    return infos


def check_tensors(model: nn.Module, infos: dict[str, TensorInfo]) -> None:
    """Every model tensor is in the checkpoint with the right shape, and nothing else is."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    missing = sorted(set(expected) - set(infos))
    unexpected = sorted(set(infos) - set(expected))
    wrong = {
        name: (expected[name], infos[name].shape)
        for name in sorted(set(expected) & set(infos))
        if expected[name] != infos[name].shape
    }
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {_short(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {_short(unexpected)}")
    if wrong:
        shown = [f"{n} expected {tuple(e)} got {tuple(g)}" for n, (e, g) in list(wrong.items())[:_LIST_LIMIT]]
        parts.append(f"{len(wrong)} of the wrong shape: {'; '.join(shown)}")
    raise CheckpointTensorError(
        "The checkpoint does not match the NVLM-D model described by its config.json: "
        + " | ".join(parts)
        + ". Check that config.json and the shards come from the same download.",
        missing=missing,
        unexpected=unexpected,
        wrong_shape=wrong,
    )


def infer_dummy_heads(config: NVLMConfig, infos: dict[str, TensorInfo]) -> NVLMConfig:
    """The config with the vision dummy-head count read from the stored `qkv` shape."""
    from dataclasses import replace

    qkv = infos.get("vision_model.encoder.layers.0.attn.qkv.weight")
    vision = config.vision
    if qkv is None or qkv.shape[0] % (3 * vision.head_dim):
        return config  # check_tensors will report the problem with names
    stored_heads = qkv.shape[0] // (3 * vision.head_dim)
    if stored_heads < vision.num_attention_heads:
        return config
    return replace(config, vision=replace(vision, num_dummy_heads=stored_heads - vision.num_attention_heads))


def fill_model(
    model: nn.Module,
    infos: dict[str, TensorInfo],
    *,
    device_of: Callable[[str], torch.device],
    dtype: torch.dtype,
    column_major: frozenset[str] = frozenset(),
    progress: Callable[[Path, int, int], None] | None = None,
) -> None:
    """Assign every tensor from the checkpoint to `model` (built on `meta`), shard by shard.

    Names in `column_major` (2-D weights) are stored transposed in memory, same shape and values:
    written straight into that layout so that no second full-size copy is ever made.
    """
    by_shard: dict[Path, list[str]] = {}
    for name, info in infos.items():
        by_shard.setdefault(info.shard, []).append(name)
    shards = sorted(by_shard)
    for number, shard in enumerate(shards, start=1):
        for name, tensor in _read_shard(shard, by_shard[shard]):
            target = dtype if tensor.is_floating_point() else tensor.dtype
            if name in column_major and tensor.dim() == 2:
                value = torch.empty(tensor.shape[::-1], dtype=target, device=device_of(name)).t()
                value.copy_(tensor)
            else:
                # Always a copy: a view would keep the whole shard's memory map (and every page
                # read from it) alive for the life of the model.
                value = tensor.to(device=device_of(name), dtype=target, copy=True)
            _assign(model, name, value)
            del tensor, value
        if progress is not None:
            progress(shard, number, len(shards))


def _read_shard(path: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix in _PICKLE_SUFFIXES:
        state = _load_pickle(path)
        for name in names:
            yield name, state[name]
        return
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in names:
                yield name, f.get_tensor(name)
    except SafetensorError as e:
        raise CheckpointError(f"Reading {path.name} failed ({e}); re-download it and check its sha256.") from e


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    # Only reached with allow_pickle=True; weights_only still refuses arbitrary objects.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a bad pickle; all mean "unreadable"
        raise CheckpointError(f"Cannot read pickled weights {path.name}: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path.name} does not hold a state dict (got {type(state).__name__}).")
    return state


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:  # check_tensors guarantees every name exists
        raise AssertionError(f"no parameter or buffer {name}")


def _short(names: list[str]) -> str:
    shown = ", ".join(names[:_LIST_LIMIT])
    return shown + (f", ... ({len(names) - _LIST_LIMIT} more)" if len(names) > _LIST_LIMIT else "")
