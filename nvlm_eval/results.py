"""The harnesses' result files -> one score per row, on the card's scale.

Both harnesses write `<output>/<model>/…results….json` with a `results` object keyed by task
(or group) name, each holding `"<metric>,<filter>"` values as fractions, and `n-samples` per
task. `nvlm-eval run` gives every row its own output folder (`<dir>/<row key>/`), so a row's
results are the newest such file under that folder that has the row's task and metric.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .rows import Row

__all__ = ["RowResult", "find_results", "read_result"]


@dataclass(frozen=True)
class RowResult:
    """A row's score.

    Attributes:
        score: on the card's scale (percent, or points out of 1000 for OCRBench).
        samples: questions scored (fewer than the benchmark's when run with --limit).
        path: the harness's results file.
    """

    score: float
    samples: int | None
    path: Path


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("results"), dict) else None


def _samples(data: dict[str, Any], task: str) -> int | None:
    entry = (data.get("n-samples") or {}).get(task)
    if isinstance(entry, dict):
        value = entry.get("effective", entry.get("original"))
        return int(value) if isinstance(value, (int, float)) else None
    # a group (mmlu_generative, minerva_math): the sum over its subtasks
    subtasks = (data.get("group_subtasks") or {}).get(task)
    if subtasks:
        counts = [_samples(data, sub) for sub in subtasks]
        return sum(counts) if all(c is not None for c in counts) else None  # type: ignore[misc]
    return None


def read_result(row: Row, path: Path) -> RowResult | None:
    """The row's score from one results file, or None when the file lacks the row's metric."""
    data = _load(path)
    if data is None or not row.tasks or row.metric is None:
        return None
    value = (data["results"].get(row.tasks[0]) or {}).get(row.metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    samples = _samples(data, row.tasks[0])
    fraction = float(value)
    # OCRBench's aggregation divides its count of right answers by 1000 whatever the number of
    # questions; with --limit the fraction of the questions asked is the comparable number.
    over = row.extra.get("aggregate_over")
    if over and samples:
        fraction = fraction * float(over) / samples
    return RowResult(score=fraction * row.scale, samples=samples, path=path)


def find_results(row: Row, folder: Path) -> RowResult | None:
    """The newest result of the row under its output folder, or None."""
    if not folder.is_dir():
        return None
    candidates = sorted(folder.rglob("*results*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        result = read_result(row, path)
        if result is not None:
            return result
    return None
