"""Read an NVLM-D checkpoint folder in its published layout into an `NVLMModel`.

The published layout: `config.json`, `model.safetensors.index.json`, `model-000NN-of-000MM.safetensors`
shards, tokenizer files, and `*.py` remote code, which is never imported or executed here.

Loading, in order:
1. find the weight files (safetensors; pickled `.bin`/`.pt` refused unless allowed, whether
   found in the folder or named by the index); index entries must be relative names inside the
   folder, and no file may resolve (through symlinks) outside it;
2. read every shard's header (names, shapes, dtypes; truncated or corrupt shards fail here) and
   check config.json's sizes against them, before the tokenizer is read or the model is built;
3. build the model on the `meta` device (no memory, no random init) and compare its tensors
   with the checkpoint's: missing, unexpected and wrong-shaped names are one typed error;
4. fill the model shard by shard, tensor by tensor: each tensor is read, cast to the compute
   dtype on its target device and assigned, so peak host memory stays near one tensor
   beyond the model itself;
5. rebuild the buffers that are not in the checkpoint (the rotary table) on their device.
"""

from __future__ import annotations

import logging
import reprlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from torch import nn

from .config import NVLMConfig
from .config_json import read_json_object
from .errors import CheckpointError, CheckpointTensorError, UnsafeCheckpointError, UnsafeCheckpointPathError

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_LIST_LIMIT = 10
_MAX_INDEX_BYTES = 64 << 20  # the published index (1,556 tensors) is 151 KB


@dataclass(frozen=True)
class TensorInfo:
    """Where a checkpoint tensor lives and what it is, from the shard header."""

    shard: Path
    dtype: str
    shape: tuple[int, ...]


def find_weight_files(folder: Path, *, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint folder, in load order.

    Index entries must be relative names inside the folder: absolute and `..` entries are refused,
    and so is any weight file whose symlinks lead outside the folder, with no opt-in: the published
    layout never needs one, and a folder downloaded from elsewhere must not make the loader read
    other files of the machine. The one exception is recognised by its shape, not by a flag: a
    Hugging Face cache snapshot (`snapshots/<rev>/<file>` linked to the same repo's `blobs/`).

    Raises:
        UnsafeCheckpointError: pickled weights (found, or named by the index) without `allow_pickle`.
        UnsafeCheckpointPathError: an absolute or `..` index entry, or a link out of the folder.
        CheckpointError: an unreadable index, an absent shard, or no weights at all.
    """
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = read_json_object(index, max_bytes=_MAX_INDEX_BYTES).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(
                f"{index} has no weight_map object (tensor name -> shard file); it is not a safetensors "
                "index. Re-download it."
            )
        shards = sorted({index_entry(folder, name) for name in weight_map.values()})
        pickles = [p.name for p in shards if p.suffix in _PICKLE_SUFFIXES]
        if pickles and not allow_pickle:
            raise UnsafeCheckpointError(
                f"{INDEX_FILE} names pickled shards ({_short(pickles)}); unpickling can execute arbitrary "
                "code, so it is refused. Convert them to safetensors, or pass allow_pickle=True if you "
                "trust the files."
            )
        absent = [p.name for p in shards if not p.is_file()]
        if absent:
            raise CheckpointError(
                f"{len(absent)} shard(s) listed in {INDEX_FILE} are not in {folder}: {_short(absent)}. "
                "The download is incomplete; fetch the missing files."
            )
        return files_inside(folder, shards)
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        return files_inside(folder, safetensors)
    pickles = sorted(p for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{folder} holds only pickled weights ({_short([p.name for p in pickles])}); unpickling can "
                "execute arbitrary code, so it is refused. Convert them to safetensors, or pass "
                "allow_pickle=True if you trust the files."
            )
        logger.warning("loading pickled weights from %s because allow_pickle=True", folder)
        return files_inside(folder, pickles)
    raise CheckpointError(
        f"No weights in {folder}: expected {INDEX_FILE} with model-*.safetensors shards, or model.safetensors."
    )


def read_tensor_infos(files: list[Path], *, allow_pickle: bool = False) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of every tensor, read from the file headers only.

    Pickled files (`.bin`, `.pt`, ...) are unpickled to read them, so they are refused here too
    unless `allow_pickle=True`, whoever built the list of files.
    """
    from safetensors import SafetensorError, safe_open

    pickles = [p.name for p in files if p.suffix in _PICKLE_SUFFIXES]
    if pickles and not allow_pickle:
        raise UnsafeCheckpointError(
            f"refusing to unpickle {_short(pickles)}: unpickling can execute arbitrary code. Convert the "
            "weights to safetensors, or pass allow_pickle=True if you trust the files."
        )
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


def check_config(config: NVLMConfig, infos: dict[str, TensorInfo]) -> None:
    """config.json's sizes agree with the shard headers: checked before the model is built.

    Compares the tensors that pin each size (embedding rows = vocab_size, layer counts, widths)
    with the config, so that a mismatched config.json fails before the tokenizer is read and the
    model is built. Only tensors present are compared. When only shapes disagree (the layer
    counts agree), the error also accounts for every tensor, as `check_tensors` does: the model
    is then built on `meta` to list them, no larger than the checkpoint and allocating nothing.

    Raises:
        CheckpointTensorError: shapes disagree; each is listed (config field, expected vs found),
            followed by every missing, unexpected and wrong-shaped tensor.
        CheckpointError: the layer counts disagree (listed with the shape disagreements).
    """
    v, m = config.vision, config.llm
    llm_rows = ((m.vocab_size, m.hidden_size), "llm_config.vocab_size x hidden_size")
    expected = {
        "language_model.model.embed_tokens.weight": llm_rows,
        "language_model.lm_head.weight": llm_rows,
        "language_model.model.layers.0.mlp.gate_proj.weight": (
            (m.intermediate_size, m.hidden_size), "llm_config.intermediate_size x hidden_size"),
        "language_model.model.layers.0.self_attn.k_proj.weight": (
            (m.num_key_value_heads * m.head_dim, m.hidden_size),
            "llm_config.num_key_value_heads * head_dim x hidden_size"),
        "vision_model.embeddings.patch_embedding.weight": (
            (v.hidden_size, v.num_channels, v.patch_size, v.patch_size),
            "vision_config.hidden_size x num_channels x patch_size x patch_size"),
        "vision_model.embeddings.position_embedding": (
            (1, v.num_patches + 1, v.hidden_size), "1 x (image_size / patch_size)^2 + 1 x vision_config.hidden_size"),
        "vision_model.encoder.layers.0.mlp.fc1.weight": (
            (v.intermediate_size, v.hidden_size), "vision_config.intermediate_size x hidden_size"),
        "mlp1.1.weight": (
            (m.intermediate_size, config.projector_in_features),
            "llm_config.intermediate_size x vision_config.hidden_size / downsample_ratio^2"),
    }
    problems = [
        f"{name} in {infos[name].shard.name}: expected {shape} ({fields}), found {infos[name].shape}"
        for name, (shape, fields) in expected.items()
        if name in infos and infos[name].shape != shape
    ]
    layer_problems = []
    for where, prefix, layers in (
        ("llm_config", "language_model.model.layers.", m.num_hidden_layers),
        ("vision_config", "vision_model.encoder.layers.", v.num_hidden_layers),
    ):
        stored = {name[len(prefix):].split(".", 1)[0] for name in infos if name.startswith(prefix)}
        if len(stored) != layers:
            layer_problems.append(
                f"{where}.num_hidden_layers: expected {layers} layers, found {len(stored)} ({prefix}N.*)"
            )
    if not (problems or layer_problems):
        return
    message = (
        "config.json does not match the shard headers: " + "; ".join((layer_problems + problems)[:_LIST_LIMIT])
        + ". Check that config.json and the *.safetensors shards come from the same download."
    )
    if layer_problems:
        # Listing every tensor would mean building as many layers as config.json claims.
        raise CheckpointError(message)
    from .model import NVLMModel

    with torch.device("meta"):
        model = NVLMModel(config)
    try:
        check_tensors(model, infos)
    except CheckpointTensorError as e:
        raise CheckpointTensorError(
            f"{message} Every tensor: {e}", missing=e.missing, unexpected=e.unexpected, wrong_shape=e.wrong_shape
        ) from e
    raise CheckpointError(message)


def infer_dummy_heads(config: NVLMConfig, infos: dict[str, TensorInfo]) -> NVLMConfig:
    """The config, checked against the shard headers, with the vision dummy-head count read from `qkv`.

    Raises:
        CheckpointError: config.json's sizes disagree with the headers (see `check_config`).
    """
    from dataclasses import replace

    qkv = infos.get("vision_model.encoder.layers.0.attn.qkv.weight")
    vision = config.vision
    stored_heads = qkv.shape[0] // (3 * vision.head_dim) if qkv is not None and len(qkv.shape) == 2 else 0
    if qkv is not None and stored_heads >= vision.num_attention_heads and not qkv.shape[0] % (3 * vision.head_dim):
        # VisionConfig bounds the count: a hostile qkv header cannot shape a huge model.
        config = replace(config, vision=replace(vision, num_dummy_heads=stored_heads - vision.num_attention_heads))
    # Otherwise the default rule stays and check_tensors reports the qkv shape with its name.
    check_config(config, infos)
    return config


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


def index_entry(folder: Path, name: object) -> Path:
    """The path of one weight_map entry: a relative name inside the folder, nothing else."""
    if not isinstance(name, str) or not name.strip():
        raise CheckpointError(
            f"{folder / INDEX_FILE}: weight_map values must be shard file names, got {reprlib.repr(name)}. "
            "Re-download the index."
        )
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or windows.root:
        raise UnsafeCheckpointPathError(
            f"{folder / INDEX_FILE} names the absolute path {name!r} as a shard; shards must be named "
            "relative to the checkpoint folder, as in the published index. Re-download the index."
        )
    if ".." in posix.parts or ".." in windows.parts:
        raise UnsafeCheckpointPathError(
            f"{folder / INDEX_FILE} names {name!r} as a shard: a '..' path leads out of the checkpoint "
            "folder, which is refused. Re-download the index, or put the shards into the folder."
        )
    return folder / name


def files_inside(folder: Path, files: list[Path]) -> list[Path]:
    """`files`, each checked to resolve (through every symlink) inside `folder`."""
    root = folder.resolve()
    # A Hugging Face cache snapshot: snapshots/<rev>/<file> -> ../../blobs/<hash> of the same repo.
    blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    for path in files:
        target = path.resolve()
        if target.is_relative_to(root) or (blobs is not None and target.parent == blobs):
            continue
        raise UnsafeCheckpointPathError(
            f"{path.relative_to(folder)} in {folder} leads to {target}, outside the checkpoint folder; "
            "weight files must lie inside it (symlinks included). Copy the file into the folder, or "
            "point the engine at the folder that holds the real files."
        )
    return files


def _short(names: list[str]) -> str:
    shown = ", ".join(names[:_LIST_LIMIT])
    return shown + (f", ... ({len(names) - _LIST_LIMIT} more)" if len(names) > _LIST_LIMIT else "")
