"""Hostile checkpoint folders (issue 10, M2 and M7): each one is a typed `CheckpointError`, quickly.

Every test corrupts a copy of the tiny checkpoint in one way and loads it through the real entry
point, `NVLMEngine.from_pretrained` (or `NVLMConfig.from_folder` / `load_tokenizer` where those
are what read the file). Each refusal runs under a liveness bound, not a benchmark: it must come
within `_BOUND_S` seconds, and an alarm stops a loader that hangs so that it cannot hang the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import AddedToken

from nvlm_engine import CheckpointError, NVLMConfig, NVLMEngine, UnsafeCheckpointError
from nvlm_engine.checkpoint import find_weight_files, read_tensor_infos
from nvlm_engine.errors import UnsafeCheckpointPathError
from nvlm_engine.testing import write_tiny_tokenizer
from nvlm_engine.tokenizer import load_tokenizer

_BOUND_S = 5.0  # the slowest refusals parse the real 151k-token tokenizer first (~1 s unloaded)
_HARD_STOP_S = 30  # the unfixed loader took 97 s, 300+ s on some of these inputs

INDEX = "model.safetensors.index.json"


# --- helpers ------------------------------------------------------------------------------


@pytest.fixture()
def ckpt(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint: shards hard-linked (never written), the rest copied."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for source in tiny_checkpoint.iterdir():
        if source.suffix == ".safetensors":
            try:
                os.link(source, folder / source.name)
                continue
            except OSError:
                pass
        shutil.copyfile(source, folder / source.name)
    return folder


def _write(path: Path, text: str) -> None:
    path.unlink(missing_ok=True)  # never write through a hard link into the shared fixture
    path.write_text(text, encoding="utf-8")


def _edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data = change(data) or data
    _write(path, json.dumps(data))


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*.safetensors"))


def _rows(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["llm_config"]["vocab_size"]


@contextmanager
def _quickly(bound: float = _BOUND_S) -> Iterator[None]:
    def hung(signum: int, frame: Any) -> None:
        raise TimeoutError(f"still loading after {_HARD_STOP_S} s: the loader hangs on this input")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, _HARD_STOP_S)
    start = time.perf_counter()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    elapsed = time.perf_counter() - start
    assert elapsed < bound, f"took {elapsed:.1f} s; a refusal must come within {bound} s"


def _load(folder: Path, **kwargs: Any) -> NVLMEngine:
    return NVLMEngine.from_pretrained(folder, device_map="cpu", dtype="float32", **kwargs)


def _refused(
    folder: Path, error: type[Exception] = CheckpointError, match: str | None = None, **kwargs: Any
) -> Exception:
    with _quickly(), pytest.raises(error, match=match) as info:
        _load(folder, **kwargs)
    return info.value


def _forbid(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make the engine fail loudly if it reaches these steps (tokenizer, model build)."""

    def reached(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("reached a step that must come after the size checks")

    for name in names:
        monkeypatch.setattr(f"nvlm_engine.loading.{name}", reached)


# --- config.json: zero, wrong types, absurd sizes, deep nesting (M7) ------------------------


def _llm(key: str, value: Any) -> Callable[[dict], None]:
    return lambda c: c["llm_config"].__setitem__(key, value)


def _vision(key: str, value: Any) -> Callable[[dict], None]:
    return lambda c: c["vision_config"].__setitem__(key, value)


CONFIG_CASES: dict[str, tuple[Callable[[dict], Any], str]] = {
    "llm heads 0": (_llm("num_attention_heads", 0), "num_attention_heads"),
    "vision heads 0": (_vision("num_attention_heads", 0), "num_attention_heads"),
    "kv heads 0": (_llm("num_key_value_heads", 0), "num_key_value_heads"),
    "patch size 0": (_vision("patch_size", 0), "patch_size"),
    "downsample ratio 0": (lambda c: c.update(downsample_ratio=0), "downsample_ratio"),
    "string for an int": (_llm("hidden_size", "64"), "hidden_size"),
    "float for an int": (_vision("num_hidden_layers", 2.5), "num_hidden_layers"),
    "bool for an int": (_llm("num_hidden_layers", True), "num_hidden_layers"),
    "list for a dict": (lambda c: c.update(llm_config=[c["llm_config"]]), "llm_config"),
    "string for rope_scaling": (_llm("rope_scaling", "dynamic"), "rope_scaling"),
    "null vision_config": (lambda c: c.update(vision_config=None), "vision_config"),
    "dict for architectures": (_llm("architectures", {"0": "Qwen2ForCausalLM"}), "architectures"),
    "string eos id": (_llm("eos_token_id", ["<|im_end|>"]), "eos_token_id"),
    "eos id outside the vocabulary": (_llm("eos_token_id", 10**6), "eos_token_id"),
    "NaN epsilon": (_llm("rms_norm_eps", float("nan")), "rms_norm_eps"),
    "vision hidden 10**9": (_vision("hidden_size", 10**9), "hidden_size"),
    "10**7 layers": (_llm("num_hidden_layers", 10**7), "num_hidden_layers"),
    "vocab 10**7": (_llm("vocab_size", 10**7), "vocab_size"),
    "positions 10**30": (_llm("max_position_embeddings", 10**30), "max_position_embeddings"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_hostile_config_value_is_a_checkpoint_error(ckpt: Path, case: str) -> None:
    change, field = CONFIG_CASES[case]
    _edit_json(ckpt / "config.json", change)
    error = _refused(ckpt, match=field)
    assert "config.json" in str(error) or "llm_config" in str(error) or "vision_config" in str(error)


def test_deeply_nested_config_is_a_checkpoint_error(ckpt: Path) -> None:
    _write(ckpt / "config.json", '{"a":' * 100_000 + "1" + "}" * 100_000)
    with _quickly(), pytest.raises(CheckpointError, match="nested"):
        NVLMConfig.from_folder(ckpt)  # what `nvlm-engine plan` reads
    _refused(ckpt, match="nested")


def test_oversized_config_is_refused_before_parsing(ckpt: Path) -> None:
    _edit_json(ckpt / "config.json", lambda c: c.update(padding="x" * (4 << 20)))
    _refused(ckpt, match="bytes")


# --- config.json against the shard headers: checked before the tokenizer and the model -----


def _grow(section: str, key: str, change: Callable[[int], int]) -> Callable[[dict], None]:
    return lambda c: c[section].__setitem__(key, change(c[section][key]))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (_grow("llm_config", "vocab_size", lambda n: n + 128), "vocab_size"),
        (_grow("llm_config", "num_hidden_layers", lambda n: n + 1), "num_hidden_layers"),
        (_grow("vision_config", "num_hidden_layers", lambda n: n + 3), "num_hidden_layers"),
        (_grow("vision_config", "hidden_size", lambda n: 2 * n), "hidden_size"),
        (_grow("llm_config", "intermediate_size", lambda n: n + 64), "intermediate_size"),
    ],
    ids=["vocab", "llm layers", "vision layers", "vision width", "llm intermediate"],
)
def test_config_disagreeing_with_shard_headers_is_refused_before_loading(
    ckpt: Path, change: Callable[[dict], Any], field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _edit_json(ckpt / "config.json", change)
    _forbid(monkeypatch, "load_tokenizer", "NVLMModel")
    error = _refused(ckpt, match=field)
    assert "expected" in str(error) and ".safetensors" in str(error)


# --- the index: pickles, absolute and ../ paths, symlinks out of the folder (M2) ------------


def _point_index(folder: Path, old: str, new: str) -> None:
    def repoint(index: dict) -> None:
        index["weight_map"].update({k: new for k, v in index["weight_map"].items() if v == old})

    _edit_json(folder / INDEX, repoint)


def test_pickle_shard_named_by_the_index_is_refused_unless_allowed(ckpt: Path) -> None:
    shard = _shards(ckpt)[0]
    torch.save(load_file(shard), ckpt / shard.with_suffix(".bin").name)
    shard.unlink()
    _point_index(ckpt, shard.name, shard.with_suffix(".bin").name)
    error = _refused(ckpt, UnsafeCheckpointError, match="allow_pickle=True")
    assert shard.with_suffix(".bin").name in str(error)
    with pytest.raises(UnsafeCheckpointError, match=INDEX):  # refused where the index is read...
        find_weight_files(ckpt)
    # ...and again where the headers are read, for callers that list the files themselves
    # (`nvlm-engine plan` reads the index on its own).
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle=True"):
        read_tensor_infos([ckpt / shard.with_suffix(".bin").name])
    assert _load(ckpt, allow_pickle=True).model is not None  # the explicit opt-in still loads it


def test_absolute_index_entry_is_refused(ckpt: Path) -> None:
    shard = _shards(ckpt)[0]
    _point_index(ckpt, shard.name, str(shard.resolve()))  # the file exists: only the path is wrong
    _refused(ckpt, UnsafeCheckpointPathError, match="absolute")


def test_parent_index_entry_is_refused(ckpt: Path, tmp_path: Path) -> None:
    shard = _shards(ckpt)[0]
    outside = tmp_path / "outside"
    outside.mkdir()
    shard.rename(outside / shard.name)
    _point_index(ckpt, shard.name, f"../outside/{shard.name}")
    _refused(ckpt, UnsafeCheckpointPathError, match=r"\.\.")


def test_symlinked_shard_leading_out_of_the_folder_is_refused(ckpt: Path, tmp_path: Path) -> None:
    shard = _shards(ckpt)[1]
    outside = tmp_path / "elsewhere" / shard.name
    outside.parent.mkdir()
    shard.rename(outside)
    shard.symlink_to(outside)
    error = _refused(ckpt, UnsafeCheckpointPathError, match="outside")
    assert shard.name in str(error)


def test_malformed_index_entries_are_checkpoint_errors(ckpt: Path) -> None:
    _edit_json(ckpt / INDEX, lambda d: d["weight_map"].update({next(iter(d["weight_map"])): 5}))
    _refused(ckpt, match="weight_map")
    _edit_json(ckpt / INDEX, lambda d: d.update(weight_map=list(d["weight_map"])))
    _refused(ckpt, match="weight_map")
    _write(ckpt / INDEX, '{"weight_map":' * 100_000 + "{}" + "}" * 100_000)
    _refused(ckpt, match="nested")


def test_hugging_face_cache_layout_still_loads(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # snapshots/<rev>/<file> -> ../../blobs/<hash>: the one legitimate symlink out of the folder.
    repo = tmp_path / "models--nvidia--NVLM-D-72B"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for number, source in enumerate(sorted(tiny_checkpoint.iterdir())):
        blob = blobs / f"blob{number:04d}"
        shutil.copyfile(source, blob)
        (snapshot / source.name).symlink_to(Path("../../blobs") / blob.name)
    assert _load(snapshot).model is not None


# --- tokenizer files: huge vocabularies, a million added tokens (M7) ------------------------


def _grow_vocab(folder: Path, extra: int) -> None:
    """Add `extra` base tokens to vocab.json; the added tokens move up so that ids stay contiguous."""
    text = (folder / "vocab.json").read_text(encoding="utf-8")
    base = len(json.loads(text))
    _write(folder / "vocab.json", text.rstrip()[:-1] + "".join(f',"~{i}":{base + i}' for i in range(extra)) + "}")
    _edit_json(
        folder / "tokenizer_config.json",
        lambda c: c.update(added_tokens_decoder={str(int(k) + extra): v for k, v in c["added_tokens_decoder"].items()}),
    )


def test_huge_vocab_file_is_refused_before_it_is_parsed(ckpt: Path) -> None:
    _grow_vocab(ckpt, 1_000_000)  # ~20 MB; the unfixed loader parsed it for seconds, then accepted it
    _refused(ckpt, match="vocab.json")


def test_vocab_larger_than_the_embedding_is_refused(ckpt: Path) -> None:
    base = len(json.loads((ckpt / "vocab.json").read_text(encoding="utf-8")))
    added = len(json.loads((ckpt / "tokenizer_config.json").read_text())["added_tokens_decoder"])
    _grow_vocab(ckpt, _rows(ckpt) - base - added + 1)  # one token more than the embedding has rows
    error = _refused(ckpt, match="rows")
    assert f"{_rows(ckpt):,}" in str(error)


def _add_tokens(folder: Path, count: int) -> None:
    """Declare `count` more added tokens in tokenizer_config.json, after the ones there (written as text: fast)."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    declared = config["added_tokens_decoder"]
    start = max(int(k) for k in declared) + 1
    config["added_tokens_decoder"] = "@@"
    more = "".join(f',"{start + i}":{{"content":"<a{i}>","special":true}}' for i in range(count))
    _write(path, json.dumps(config).replace('"@@"', json.dumps(declared)[:-1] + more + "}"))


def test_a_million_added_tokens_are_refused_quickly(ckpt: Path) -> None:
    _add_tokens(ckpt, 1_000_000)  # the unfixed loader added them one call at a time: 300+ s
    _refused(ckpt, match="tokenizer_config.json")


def test_more_added_tokens_than_embedding_rows_are_refused(ckpt: Path) -> None:
    _add_tokens(ckpt, 10_000)
    error = _refused(ckpt, match="added")
    assert f"{_rows(ckpt):,}" in str(error)


def test_added_tokens_in_tokenizer_json_are_bounded_by_the_embedding(ckpt: Path) -> None:
    backend = load_tokenizer(ckpt).backend_tokenizer
    extra = _rows(ckpt) - backend.get_vocab_size(with_added_tokens=True) + 1  # one id past the last row
    backend.add_tokens([AddedToken(f"<a{i}>", special=True) for i in range(extra)])
    backend.save(str(ckpt / "tokenizer.json"))
    _refused(ckpt, match="rows")


def test_many_added_tokens_are_added_in_one_call(tmp_path: Path) -> None:
    # 8,000 declared added tokens: adding them one call at a time took ~15 s (quadratic), one call ~0.1 s.
    write_tiny_tokenizer(tmp_path)
    _add_tokens(tmp_path, 8_000)
    with _quickly():
        tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.convert_tokens_to_ids("<a7999>") == len(tokenizer) - 1


def test_deeply_nested_tokenizer_config_is_a_checkpoint_error(ckpt: Path) -> None:
    _write(ckpt / "tokenizer_config.json", '{"a":' * 100_000 + "1" + "}" * 100_000)
    _refused(ckpt, match="nested")


@pytest.mark.parametrize(
    ("key", "value"),
    [("added_tokens_decoder", ["<|im_end|>"]), ("model_max_length", "long"), ("chat_template", [{"template": "x"}]),
     ("additional_special_tokens", ["<|never_declared|>"])],
)
def test_wrong_types_in_tokenizer_config_are_checkpoint_errors(ckpt: Path, key: str, value: Any) -> None:
    _edit_json(ckpt / "tokenizer_config.json", lambda c: c.update({key: value}))
    _refused(ckpt, match=key)
