"""Reading JSON files of a checkpoint that may be hostile: bounded size and nesting, typed fields.

`read_json_object` is shared by the readers of config.json, the tensor index and the tokenizer
config; `JsonFields` reads typed values from one object of config.json, a wrong type being a
`CheckpointError` that names the field. Knows nothing of what the fields mean (see `config.py`).
"""

from __future__ import annotations

import json
import math
import reprlib
import sys
from pathlib import Path
from typing import Any

from .errors import CheckpointError

__all__ = ["JsonFields", "check_range", "json_type", "read_json_object"]


def read_json_object(path: Path, *, max_bytes: int) -> dict[str, Any]:
    """The JSON object stored in `path`, read within bounds that a hostile file cannot get past.

    At most `max_bytes + 1` bytes are read (a link to `/dev/zero` or a file that grows is cut
    off), and nesting deeper than the parser's recursion limit is a `CheckpointError`, not a
    `RecursionError`. Shared by the readers of config.json, the tensor index and the tokenizer config.

    Raises:
        CheckpointError: unreadable, larger than `max_bytes`, not JSON, too deep, or not an object.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise CheckpointError(f"{path} is not readable JSON ({e}); re-download it.") from e
    if len(raw) > max_bytes:
        raise CheckpointError(
            f"{path} is over {max_bytes:,} bytes, the limit for this file (the published NVLM-D-72B one "
            "is far smaller): it is not a checkpoint file as published. Re-download it."
        )
    try:
        data = json.loads(raw)
    except RecursionError as e:
        raise CheckpointError(
            f"{path} is nested too deeply to parse (more than {sys.getrecursionlimit()} levels); "
            "it is not a checkpoint file as published. Re-download it."
        ) from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({e}); re-download it.") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {json_type(data)}; re-download it.")
    return data


class JsonFields:
    """Typed reads from one JSON object of config.json; a wrong type is a `CheckpointError` naming the field.

    A missing key or JSON null takes the default, as in transformers' configs. Ranges are not
    checked here but in the dataclasses' `__post_init__`, which also guards configs built in code.
    """

    def __init__(self, raw: Any, where: str) -> None:
        if not isinstance(raw, dict):
            raise CheckpointError(
                f"config.json: {where} must be a JSON object, got {json_type(raw)}. "
                "The file is not an NVLM-D config as published; re-download it."
            )
        self.raw, self.where = raw, where

    def _value(self, key: str, default: Any) -> Any:
        value = self.raw.get(key)
        return default if value is None else value

    def _wrong(self, key: str, expected: str, value: Any) -> CheckpointError:
        return CheckpointError(
            f"config.json: {self.where}.{key} must be {expected}, got {json_type(value)} {reprlib.repr(value)}. "
            "Fix that field or re-download config.json."
        )

    def integer(self, key: str, default: int, *, value: Any = None) -> int:
        value = self._value(key, default) if value is None else value
        if isinstance(value, bool) or not isinstance(value, int):  # 2.5, "64" and true are not sizes
            raise self._wrong(key, "an integer", value)
        return value

    def number(self, key: str, default: float) -> float:
        value = self._value(key, default)
        if not isinstance(value, bool) and isinstance(value, (int, float)):
            try:
                if math.isfinite(value):
                    return float(value)
            except OverflowError:  # an integer beyond any float
                pass
        raise self._wrong(key, "a finite number", value)

    def flag(self, key: str, default: bool) -> bool:
        value = self._value(key, default)
        if isinstance(value, int) and value in (0, 1):  # 0/1 flags occur in these configs (use_llm_lora: 0)
            return bool(value)
        raise self._wrong(key, "true or false", value)

    def text(self, key: str, default: str) -> str:
        value = self._value(key, default)
        if not isinstance(value, str):
            raise self._wrong(key, "a string", value)
        return value

    def texts(self, key: str) -> list[str]:
        value = self._value(key, [])
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self._wrong(key, "an array of strings", value)
        return value

    def section(self, key: str) -> JsonFields | None:
        value = self.raw.get(key)
        return None if value is None else JsonFields(value, f"{self.where}.{key}")


def check_range(where: str, name: str, value: Any, low: float, high: float, *, open_low: bool = False) -> None:
    """`low <= value <= high` (`low < value` with `open_low`); NaN and non-numbers fail too."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{where}.{name} must be a number, got {json_type(value)} {reprlib.repr(value)}.")
    if not ((low < value) if open_low else (low <= value)) or not value <= high:
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        raise CheckpointError(
            f"{where}.{name} is {reprlib.repr(value)}; expected a value in {interval}. config.json does not "
            "describe a usable NVLM-D model: fix that field or re-download the file."
        )


def json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
