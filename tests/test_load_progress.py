"""Loading progress by default: a tqdm bar of bytes and shards, log lines, a callback, or nothing.

A tiny checkpoint of 3 shards is loaded for real with each `progress` option; the bar is written to
the captured stderr, the log lines to caplog.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from tqdm import tqdm

from nvlm_engine import NVLMEngine
from nvlm_engine.errors import LoadOptionsError
from nvlm_engine.load_progress import hub_progress, shard_progress


def shards_of(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def load(folder: Path, progress: Any) -> NVLMEngine:
    return NVLMEngine.from_pretrained(folder, device_map="cpu", dtype="float32", progress=progress)


def test_true_draws_a_bar_of_bytes_and_shards(tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shards = shards_of(tiny_checkpoint)
    assert len(shards) >= 2
    total = sum(p.stat().st_size for p in shards)
    load(tiny_checkpoint, True)
    err = capsys.readouterr().err
    size = tqdm.format_sizeof(total, divisor=1024)  # how tqdm writes the total with unit_scale
    assert f"{size}/{size}" in err  # bytes: done / total
    assert f"({len(shards)} shards)" in err and f"shard {len(shards)}/{len(shards)}" in err
    assert "100%" in err and err.endswith("\n")  # closed


def test_log_writes_one_info_line_per_shard(tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    shards = shards_of(tiny_checkpoint)
    with caplog.at_level(logging.INFO, logger="nvlm_engine.load_progress"):
        load(tiny_checkpoint, "log")
    lines = [r.getMessage() for r in caplog.records if r.name == "nvlm_engine.load_progress"]
    assert len(lines) == len(shards)
    for number, (line, shard) in enumerate(zip(lines, shards, strict=True), start=1):
        assert f"shard {number}/{len(shards)} ({shard.name}) done" in line
    assert "MB of" in lines[-1]
    assert "shard" not in capsys.readouterr().err  # no bar


def test_false_and_no_terminal_draw_nothing(tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    with caplog.at_level(logging.INFO, logger="nvlm_engine.load_progress"):
        load(tiny_checkpoint, False)
        err_false = capsys.readouterr().err
        load(tiny_checkpoint, None)  # the default: stderr is not a terminal under pytest
        err_none = capsys.readouterr().err
    assert "shard" not in err_false and "%" not in err_false
    assert "shard" not in err_none and "%" not in err_none
    assert not [r for r in caplog.records if r.name == "nvlm_engine.load_progress"]


def test_none_draws_a_bar_on_a_terminal(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with shard_progress(None, shards_of(tiny_checkpoint), title="tiny") as report:
        report(shards_of(tiny_checkpoint)[0], 1, 3)
    assert "Loading tiny (3 shards)" in capsys.readouterr().err


def test_a_callable_is_called_per_shard(tiny_checkpoint: Path) -> None:
    calls: list[tuple[Path, int, int]] = []
    load(tiny_checkpoint, lambda shard, number, count: calls.append((shard, number, count)))
    shards = shards_of(tiny_checkpoint)
    assert [(p.name, n, c) for p, n, c in calls] == [(p.name, i, len(shards)) for i, p in enumerate(shards, start=1)]


def test_a_wrong_progress_is_refused_before_reading(tmp_path: Path) -> None:
    with pytest.raises(LoadOptionsError, match="progress='yes' is not a progress option"):
        NVLMEngine.from_pretrained(tmp_path / "missing", progress="yes")  # type: ignore[arg-type]


def test_downloads_follow_the_same_choice() -> None:
    assert hub_progress(False) is False and hub_progress("log") is False
    assert hub_progress(None) is None and hub_progress(True) is None and hub_progress(print) is None


def test_chat_nvlm_passes_progress_revision_and_download(monkeypatch: pytest.MonkeyPatch) -> None:
    from nvlm_langchain import ChatNVLM
    from nvlm_langchain.engines import EngineSpec

    seen: dict[str, Any] = {}

    def fake_from_pretrained(path: str, **kwargs: Any) -> None:
        seen.update(path=path, **kwargs)

    monkeypatch.setattr(NVLMEngine, "from_pretrained", fake_from_pretrained)
    llm = ChatNVLM(model="org/name", revision="v2", download=True, progress="log")
    spec = llm.engine_spec()
    assert spec.path == "org/name"  # an id stays an id (it is no folder here)
    assert spec == EngineSpec(path="org/name", revision="v2") and spec != EngineSpec(path="org/name")
    spec.load()
    assert seen["path"] == "org/name" and seen["revision"] == "v2" and seen["download"] is True
    assert seen["progress"] == "log"
    spec.load(progress=False)  # the caller's choice wins over the field
    assert seen["progress"] is False
