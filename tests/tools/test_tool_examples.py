"""The examples run end to end on the tiny checkpoint (noise answers, real plumbing)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from langchain_core.messages import ToolMessage

from nvlm_langchain.tools import OCRResult

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

pytestmark = pytest.mark.slow


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_chart_to_table_example(chat_nvlm, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example("chart_to_table")
    summary = example.main(["--checkpoint", str(tiny_checkpoint), "--max-tokens", "8", "--device-map", "cpu"])
    assert set(summary) == {"table", "csv", "answer", "error", "raw"}
    assert summary["answer"] is not None  # the question is always answered
    assert (summary["csv"] is None) == (summary["table"] is None)
    out = capsys.readouterr().out
    assert "Answer to 'Which quarter had the highest revenue?'" in out


def test_document_qa_agent_example(chat_nvlm, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example("document_qa_agent")
    run = example.main(
        [
            "--checkpoint",
            str(tiny_checkpoint),
            "--max-tokens",
            "4",
            "--planner-max-tokens",
            "64",
            "--max-steps",
            "1",
            "--device-map",
            "cpu",
        ]
    )
    # The first turn is forced to call the OCR tool; it ran on the generated 3-page invoice.
    tool_messages = run.tool_messages
    assert tool_messages, run.messages
    first = tool_messages[0]
    assert isinstance(first, ToolMessage)
    if first.name == "ocr_document" and first.status == "success":
        assert isinstance(first.artifact, OCRResult)
        assert 1 <= len(first.artifact.pages) <= 3 and first.artifact.pages[0].page.page_count == 3
    else:  # a malformed call from random weights still comes back to the planner as an error
        assert first.status == "error" and first.content
    assert isinstance(run.answer, str)
    out = capsys.readouterr().out
    assert "-> " in out and "Answer:" in out
