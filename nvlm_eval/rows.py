"""The model card's benchmark rows: the card's numbers and how each row is run.

One data file, `card.json` beside this module, holds every row of NVLM-D-72B's tables: the
Hugging Face and Megatron numbers of its card and NVIDIA's Megatron-Core re-run, which harness
runs it, with which task(s), which result key is its score and at what scale (OCRBench is out
of 1000), whether `nvlm-eval run` runs it by default, and why a row is approximate or cannot
be reproduced. A rows file (`--rows-file`) adds rows in the same shape, or replaces rows by key.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import RowsError

__all__ = ["CARD_COLUMNS", "HARNESSES", "Row", "load_rows", "select_rows"]

HARNESSES = ("lmms-eval", "lm-eval")
CARD_COLUMNS = ("hf", "megatron", "mcore")


@dataclass(frozen=True)
class Row:
    """One row of the card's table.

    Attributes:
        key: the name used on the command line (`--rows chartqa`) and as its results folder.
        label: the benchmark as the table shows it.
        group: "vision" or "text".
        card: the published numbers by column ("hf", "megatron", "mcore"), on the card's scale.
        harness: "lmms-eval", "lm-eval", or None for a row that cannot be run.
        tasks: the harness's task (or group) names for the row.
        metric: the result key of the score (`"relaxed_overall,none"`), read for the row's
            first task.
        scale: the factor from the harness's fraction to the card's scale (100 or 1000).
        default: run when no `--rows` are given.
        status: "reproducible", "approximate", "validation split", "needs a judge", or "not reproducible".
        note: why the row is what its status says.
        num_fewshot: few-shot examples (lm-eval), None for the task's own.
        unsafe_code: the row executes generated code (HumanEval).
    """

    key: str
    label: str
    group: str
    card: Mapping[str, float]
    harness: str | None
    tasks: tuple[str, ...]
    metric: str | None
    scale: float = 100
    default: bool = False
    status: str = "reproducible"
    note: str = ""
    num_fewshot: int | None = None
    unsafe_code: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def runnable(self) -> bool:
        return self.harness is not None and bool(self.tasks) and self.metric is not None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> Row:
        """A row from its JSON object; a missing or wrong field is a `RowsError` naming it."""
        try:
            harness = data.get("harness")
            if harness is not None and harness not in HARNESSES:
                raise ValueError(f"harness must be one of {list(HARNESSES)} or null, got {harness!r}")
            card = {str(k): float(v) for k, v in (data.get("card") or {}).items() if v is not None}
            known = {f for f in cls.__dataclass_fields__ if f != "extra"}
            return cls(
                key=str(data["key"]), label=str(data["label"]), group=str(data.get("group", "vision")), card=card,
                harness=harness, tasks=tuple(str(t) for t in data.get("tasks") or ()), metric=data.get("metric"),
                scale=float(data.get("scale", 100)), default=bool(data.get("default", False)),
                status=str(data.get("status", "reproducible")), note=str(data.get("note", "")),
                num_fewshot=data.get("num_fewshot"), unsafe_code=bool(data.get("unsafe_code", False)),
                extra={k: v for k, v in data.items() if k not in known},
            )
        except (KeyError, TypeError, ValueError) as e:
            missing = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise RowsError(f"{where}: a row is malformed ({missing})") from e


def _read(text: str, where: str) -> list[Row]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RowsError(f"{where} is not valid JSON: {e}") from e
    entries = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise RowsError(f"{where} must hold a list of rows (or an object with 'rows')")
    return [Row.from_dict(entry, where) for entry in entries]


def load_rows(extra: Path | None = None) -> list[Row]:
    """The card's rows, then those of `extra` (a row with a card row's key replaces it)."""
    rows = _read(resources.files(__package__).joinpath("card.json").read_text(encoding="utf-8"), "card.json")
    if extra is None:
        return rows
    try:
        text = Path(extra).read_text(encoding="utf-8")
    except OSError as e:
        raise RowsError(f"cannot read the rows file {str(extra)!r}: {e.strerror or e}") from e
    by_key = {row.key: row for row in rows}
    for row in _read(text, str(extra)):
        by_key[row.key] = row
    return list(by_key.values())


def select_rows(rows: Sequence[Row], spec: str | Iterable[str] | None) -> list[Row]:
    """The rows a `--rows` value names, in card order.

    `None` or "default": the default rows; "all": every runnable row; else comma-separated keys.

    Raises:
        RowsError: an unknown key (with the closest known one), or a row that cannot be run.
    """
    if spec is None or spec == "default":
        return [row for row in rows if row.default and row.runnable]
    if spec == "all":
        return [row for row in rows if row.runnable]
    keys = [k.strip() for k in (spec.split(",") if isinstance(spec, str) else spec) if k.strip()]
    by_key = {row.key: row for row in rows}
    for key in keys:
        if key not in by_key:
            close = difflib.get_close_matches(key, list(by_key), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RowsError(f"unknown row {key!r}{hint}; rows: {', '.join(by_key)}")
        if not by_key[key].runnable:
            raise RowsError(f"{by_key[key].label} cannot be run: {by_key[key].note}")
    wanted = set(keys)
    return [row for row in rows if row.key in wanted]
