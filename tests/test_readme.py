"""The README's LangChain quickstart runs as written (on a tiny checkpoint in a temp dir)."""

from __future__ import annotations

from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _block_after(marker: str) -> str:
    text = README.read_text()
    start = text.index("```python\n", text.index(marker)) + len("```python\n")
    return text[start : text.index("```", start)]


def test_langchain_quickstart_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = _block_after("From LangChain (this runs").replace("/tmp/", f"{tmp_path}/")
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "'name': 'get_weather'" in out and "'city': " in out
    assert "paid=" in out
