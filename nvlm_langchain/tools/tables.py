"""Turn a model's answer to "convert this chart to a table" into a typed `Table`.

Pure functions over raw text. Models write tables in many ways, and this module reads the
ones seen in practice: markdown pipe tables (with or without outer pipes, separator row or
alignment colons), DePlot-style linearized tables (`TITLE | ... <0x0A> Year | Sales <0x0A> ...`),
tab- or comma-separated lines, simple HTML tables, and "label: value" lines; inside or outside
a code fence, with prose around them, and cut off at the end. Cells become numbers when the
whole cell is a number (see `parsing.parse_quantity`); units come from the header
("Revenue (USD)", "Share [%]", "Growth %") or, failing that, from the cells when every number
of the column carries the same one ("12%", "$3.4"). Knows nothing of models or images.
"""

from __future__ import annotations

import csv
import html
import io
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .parsing import parse_quantity

__all__ = ["Cell", "Table", "TableParseError", "parse_table", "split_unit"]

Cell = int | float | str | None

_EMPTY_CELLS = {"", "-", "--", "\u2014", "\u2013", "n/a", "na", "none", "null", "nan", "?"}
_UNIT_WORDS = (
    r"%|percent|\$|USD|EUR|GBP|JPY|CNY|\u20ac|\u00a3|\u00a5|"
    r"(?:\$|USD|EUR|\u20ac|\u00a3)?\s*(?:thousands?|millions?|billions?|trillions?|k|m|mn|bn)|"
    r"kg|tons?|tonnes|km|m|cm|mm|kwh|mwh|gwh|mw|gw|hours?|days?|years?|people|units"
)
_HEADER_BRACKET = re.compile(r"^(?P<name>.*?)\s*[(\[]\s*(?P<unit>[^()\[\]]{1,30}?)\s*[)\]]\s*$")
_HEADER_IN = re.compile(rf"^(?P<name>.+?)[\s,]+in\s+(?P<unit>{_UNIT_WORDS})\s*$", re.IGNORECASE)
_HEADER_TRAILING = re.compile(
    rf"^(?P<name>.+?)\s*,\s*(?P<unit>{_UNIT_WORDS})\s*$|^(?P<name2>.+?)\s*(?P<unit2>%)$", re.IGNORECASE
)
_SEPARATOR_ROW = re.compile(r"^[\s|:\-+=]+$")
_FENCE = re.compile(r"```[\w-]*[ \t]*\n?(?P<body>.*?)(?:```|$)", re.DOTALL)
_KEY_VALUE = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])?\s*(?P<key>[^:=|\t]{1,80}?)\s*[:=]\s*(?P<value>\S.*?)\s*$")
_HTML_ROW = re.compile(r"<tr[^>]*>(.*?)(?:</tr>|(?=<tr)|$)", re.DOTALL | re.IGNORECASE)
_HTML_CELL = re.compile(r"<t([hd])[^>]*>(.*?)(?:</t[hd]>|(?=<t[hd])|$)", re.DOTALL | re.IGNORECASE)
_TITLE = re.compile(r"^\s*(?:TITLE|Title|title)\s*[|:]\s*(?P<title>.*)$")


class TableParseError(ValueError):
    """No table could be read from the text."""


@dataclass
class Table:
    """A data table read from a model's answer.

    Attributes:
        columns: column names, units taken out ("Revenue (USD)" -> "Revenue").
        units: one unit per column, None where none is written.
        rows: one list per data row, as long as `columns`: numbers as int (written without
            a decimal point or multiplier) or float, other text as str, empty cells as None.
        title: the table's title when the model gave one.
        issues: what was repaired or dropped (short rows padded, extra cells cut), one
            sentence each.
    """

    columns: list[str]
    units: list[str | None]
    rows: list[list[Cell]]
    title: str | None = None
    issues: list[str] = field(default_factory=list)

    def records(self) -> list[dict[str, Cell]]:
        """Rows as dictionaries keyed by column name."""
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary: title, columns, units, rows, issues."""
        return {
            "title": self.title,
            "columns": list(self.columns),
            "units": list(self.units),
            "rows": [list(row) for row in self.rows],
            "issues": list(self.issues),
        }

    def to_csv(self) -> str:
        """CSV text: a header row with units in parentheses, then the rows; numbers unformatted."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([f"{c} ({u})" if u else c for c, u in zip(self.columns, self.units, strict=True)])
        for row in self.rows:
            writer.writerow(["" if v is None else f"{v:.15g}" if isinstance(v, float) else v for v in row])
        return buffer.getvalue()


def parse_table(text: str) -> Table:
    """Read the first table in a model's answer.

    Formats are tried in this order: HTML `<table>`, pipe-separated (markdown or DePlot),
    tab-separated, comma- or semicolon-separated, "label: value" lines. The first row is the
    header when the format says so (a markdown separator row under it, `<th>` cells,
    "label: value") or when it does not look like data (numbers in every column after the
    first, other than years). A row shorter
    than the header (cut-off output) is padded with None; cells beyond the header are dropped;
    both are noted in `issues`.

    Args:
        text: the model's raw answer.

    Returns:
        The table.

    Raises:
        TableParseError: no format gives at least one data row and two columns.
    """
    body, title = _unwrap(text)
    for reader in (_html_rows, _pipe_rows, _tab_rows, _delimited_rows, _key_value_rows):
        grid, has_header = reader(body)
        if len(grid) >= 2 and max(len(r) for r in grid) >= 2:
            return _build(grid, title, has_header)
    raise TableParseError(
        "no table found: expected a markdown table (| a | b |), CSV or tab-separated lines, "
        "an HTML <table> or 'label: value' lines"
    )


def split_unit(header: str) -> tuple[str, str | None]:
    """Split a column header into its name and unit.

    "Revenue (USD)" -> ("Revenue", "USD"); "Share [%]" -> ("Share", "%");
    "Growth %" -> ("Growth", "%"); "Sales in millions" -> ("Sales", "millions");
    "Sales, USD" -> ("Sales", "USD"). Brackets holding only a number or year are not a unit
    ("Sales (2019)" stays as it is).
    """
    header = _clean_cell(header)
    match = _HEADER_BRACKET.match(header)
    if match and match["name"] and not re.fullmatch(r"[\d\s.,/-]+", match["unit"]):
        unit = match["unit"].strip()
        if unit.lower() in ("in %", "percent", "in percent", "percentage"):
            unit = "%"
        return match["name"].strip(), re.sub(r"^in\s+", "", unit, flags=re.IGNORECASE)
    match = _HEADER_IN.match(header)
    if match:
        return match["name"].strip(), match["unit"].strip()
    match = _HEADER_TRAILING.match(header)
    if match:
        if match["name"]:
            return match["name"].strip(), match["unit"].strip()
        return match["name2"].strip(), "%"
    return header, None


# --- finding the rows --------------------------------------------------------------------


def _unwrap(text: str) -> tuple[str, str | None]:
    """The part of the answer that holds the table, and a DePlot-style title if any."""
    text = text.replace("<0x0A>", "\n").replace("\r\n", "\n")
    fence = _FENCE.search(text)
    if fence and fence["body"].strip():
        text = fence["body"]
    title = None
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.strip():
            match = _TITLE.match(line)
            if match:
                title = match["title"].strip(" |") or None
                lines = lines[:i] + lines[i + 1 :]
            break
    return "\n".join(lines), title


def _block(lines: list[str], keep: Any) -> list[str]:
    """The first run of consecutive lines for which keep(line) holds (blank lines end it)."""
    block: list[str] = []
    for line in lines:
        if keep(line):
            block.append(line)
        elif block:
            break
    return block


# Each reader returns (rows of cell texts, whether the first row is known to be a header).
Grid = tuple[list[list[str]], bool]


def _pipe_rows(text: str) -> Grid:
    lines = _block(text.split("\n"), lambda line: "|" in line)
    rows: list[list[str]] = []
    has_header = False
    for line in lines:
        if _SEPARATOR_ROW.match(line):
            has_header = has_header or len(rows) == 1
            continue
        line = line.strip()
        line = line.removeprefix("|")
        if line.endswith("|") and not line.endswith("\\|"):
            line = line[:-1]
        rows.append([cell.replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)])
    return rows, has_header


def _tab_rows(text: str) -> Grid:
    return [line.split("\t") for line in _block(text.split("\n"), lambda line: "\t" in line.strip())], False


def _delimited_rows(text: str) -> Grid:
    # Both delimiters are tried; the one giving the longer run of rows wins ("DE;12,5" is a
    # semicolon row with a decimal comma, not two comma cells).
    best: list[list[str]] = []
    for delimiter in (",", ";"):
        rows = _delimited_run(text.split("\n"), delimiter)
        if len(rows) > len(best):
            best = rows
    return (best, False) if len(best) >= 2 else ([], False)


def _delimited_run(lines: list[str], delimiter: str) -> list[list[str]]:
    parsed = [next(csv.reader([line], delimiter=delimiter, skipinitialspace=True), []) for line in lines]
    widths = Counter(len(row) for row in parsed if len(row) >= 2)
    if not widths:
        return []
    width = widths.most_common(1)[0][0]
    # The first run of rows of the common width; a shorter last row is a cut-off row.
    rows: list[list[str]] = []
    for row in parsed:
        if len(row) == width or (rows and 2 <= len(row) < width):
            rows.append(row)
            if len(row) < width:
                break
        elif rows:
            break
    return rows


def _key_value_rows(text: str) -> Grid:
    matches = [_KEY_VALUE.match(line) for line in text.split("\n") if line.strip()]
    pairs = [[m["key"], m["value"]] for m in matches if m]
    # Prose with one colon in it is not a table: most of the non-empty lines must be pairs,
    # and at least one value must be a number.
    if len(pairs) < 2 or len(pairs) < len(matches) / 2:
        return [], False
    if not any(parse_quantity(v, strict=True) for _, v in pairs):
        return [], False
    return [["label", "value"], *pairs], True


def _html_rows(text: str) -> Grid:
    if not re.search(r"<t[rdh][\s>]", text, re.IGNORECASE):
        return [], False
    cells = [_HTML_CELL.findall(row) for row in _HTML_ROW.findall(text)]
    cells = [row for row in cells if row]
    has_header = bool(cells) and all(kind.lower() == "h" for kind, _ in cells[0])
    return [[cell for _, cell in row] for row in cells], has_header


# --- typing the cells --------------------------------------------------------------------


def _build(grid: list[list[str]], title: str | None, has_header: bool) -> Table:
    grid = [[_clean_cell(c) for c in row] for row in grid if any(_clean_cell(c) for c in row)]
    issues: list[str] = []
    header_given = has_header or not _looks_like_data(grid[0])
    header = grid[0] if header_given else []
    data = grid[1:] if header_given else grid
    common = Counter(len(r) for r in data).most_common(1)[0][0] if data else 0
    # The header decides the width, unless every data row is longer (the header lost cells).
    width = len(header) if header and not all(len(r) > len(header) for r in data) else max(len(header), common)
    names, units = [], []
    for i in range(width):
        name, unit = split_unit(header[i]) if i < len(header) and header[i] else (f"column_{i + 1}", None)
        names.append(name or f"column_{i + 1}")
        units.append(unit)

    rows: list[list[str]] = []
    for number, raw in enumerate(data, start=1):
        if len(raw) < width:
            issues.append(f"row {number} has {len(raw)} of {width} cells; padded with empty cells (output cut off?)")
            raw = raw + [""] * (width - len(raw))
        elif len(raw) > width:
            issues.append(f"row {number} has {len(raw)} cells, more than the {width} columns; extra cells dropped")
            raw = raw[:width]
        rows.append(raw)

    typed: list[list[Cell]] = [[None] * width for _ in rows]
    for col in range(width):
        cell_units = set()
        for r, row in enumerate(rows):
            value, unit = _typed_cell(str(row[col]))
            typed[r][col] = value
            if isinstance(value, (int, float)):
                cell_units.add(unit)
        if units[col] is None and len(cell_units) == 1:
            units[col] = cell_units.pop()
    if not header_given:
        issues.append("no header row; columns named column_1, column_2, ...")
    return Table(columns=names, units=units, rows=typed, title=title, issues=issues)


def _typed_cell(text: str) -> tuple[Cell, str | None]:
    if text.lower() in _EMPTY_CELLS:
        return None, None
    quantity = parse_quantity(text, strict=True)
    if quantity is None:
        return text, None
    value = quantity.value
    # "1,234" and "2019" stay integers; "12.0", "1.2M", "1e3" and "12,5" are floats.
    written_as_integer = value.is_integer() and abs(value) < 2**53 and not re.search(r"[.eE]|\d,\d{1,2}(?!\d)", text)
    return (int(value) if written_as_integer else value), quantity.unit


def _looks_like_data(row: list[str]) -> bool:
    """A first row whose cells after the first are all numbers, not all years, is data."""
    rest = [c for c in row[1:] if c]
    if len(row) < 2 or not rest:
        return False
    values = [parse_quantity(c, strict=True) for c in rest]
    if any(v is None for v in values):
        return False
    # "| Region | 2019 | 2020 |" is the header of a wide table, not a data row.
    return not all(re.fullmatch(r"(1[89]|2[01])\d\d", c) for c in rest)


def _clean_cell(cell: str) -> str:
    cell = html.unescape(re.sub(r"<[^>]+>", "", cell)).strip()
    # Markdown emphasis and code around a whole cell are formatting, not content.
    cell = re.sub(r"^(\*\*|__|\*|_|`)(.*)\1$", r"\2", cell).strip()
    return cell.strip('"').strip()
