"""`nvlm-eval report`: a results folder -> the card's table side by side with ours, as markdown and a PNG.

Every row of the card is listed: a row that was run shows its score, the questions it was
scored on, and its gap to the card's Hugging Face and Megatron numbers; a row that was not run
or cannot be run shows the card's numbers and why. Rows run from a `--rows-file` are read back
from their run records. The chart is drawn with Pillow (a project dependency), bars in percent
(OCRBench's points out of 1000 divided by 10).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .errors import ResultsError
from .harness import RECORD
from .results import RowResult, find_results
from .rows import Row, load_rows

__all__ = ["ReportLine", "collect", "draw_chart", "markdown"]


@dataclass(frozen=True)
class ReportLine:
    """A card row and its result in the folder (None: not run, or no results)."""

    row: Row
    result: RowResult | None

    def gap(self, column: str) -> float | None:
        card = self.row.card.get(column)
        return None if self.result is None or card is None else self.result.score - card


def collect(output: Path, rows_file: Path | None = None) -> tuple[list[ReportLine], list[dict]]:
    """The report's lines, in card order then extra rows, and the run records found.

    Raises:
        ResultsError: the folder does not exist or holds no result of any row.
    """
    if not output.is_dir():
        raise ResultsError(f"no results folder at {output}; run `nvlm-eval run --output {output}` first")
    rows = {row.key: row for row in load_rows(rows_file)}
    records = []
    for path in sorted(output.glob(f"*/{RECORD}")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            row = Row.from_dict(record["row"], str(path))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a record from another version, or damaged: its row is still read from the card
        records.append(record)
        rows[row.key] = row  # the definition it was run with
    lines = [ReportLine(row, find_results(row, output / row.key) if row.runnable else None) for row in rows.values()]
    if not any(line.result for line in lines):
        raise ResultsError(f"{output} holds no harness results of any row; run `nvlm-eval run --output {output}` first")
    return lines, records


def _number(value: float | None, row: Row, *, signed: bool = False) -> str:
    """A score as the card writes it: points out of 1000 whole, percentages with one decimal."""
    if value is None:
        return "—"
    decimals = 0 if row.scale >= 1000 else 1
    return f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"


def markdown(lines: list[ReportLine], records: list[dict]) -> str:
    """The table, a line on what was run against, and the rows' notes."""
    out = []
    if records:
        first = records[0]
        tiles = first.get("server_max_tiles")
        limits = sorted({"all" if r.get("limit") is None else f"at most {r['limit']}" for r in records})
        out.append(f"Model `{first.get('model')}` at {first.get('base_url')}; tile budget "
                   f"{tiles if tiles is not None else 'not reported'}; questions per task: {', '.join(limits)}.\n")
    out += ["| Benchmark | This server | Questions | Card (HF) | Gap | Card (Megatron) | Gap | Megatron-Core re-run | Status |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for line in lines:
        row, result = line.row, line.result
        cells = [row.label, _number(result.score if result else None, row),
                 str(result.samples) if result and result.samples is not None else "—",
                 _number(row.card.get("hf"), row), _number(line.gap("hf"), row, signed=True),
                 _number(row.card.get("megatron"), row), _number(line.gap("megatron"), row, signed=True),
                 _number(row.card.get("mcore"), row), row.status]
        out.append("| " + " | ".join(cells) + " |")
    notes = [f"- **{line.row.label}** ({line.row.status}): {line.row.note}" for line in lines if line.row.note]
    if notes:
        out += ["", *notes]
    return "\n".join(out) + "\n"


_COLORS = {"ours": (31, 95, 170), "hf": (118, 185, 0), "megatron": (170, 170, 170)}
_NAMES = {"ours": "this server", "hf": "card (Hugging Face)", "megatron": "card (Megatron)"}


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def draw_chart(lines: list[ReportLine], path: Path) -> Path:
    """A grouped bar chart of the rows that were run: ours, the card's HF and Megatron numbers, in percent."""
    shown = [line for line in lines if line.result is not None]
    bar, gap, left, width = 14, 16, 230, 980
    height = 70 + len(shown) * (3 * bar + gap) + 30
    image = Image.new("RGB", (width, height), "white")
    draw, font, small = ImageDraw.Draw(image), _font(15), _font(12)
    draw.text((10, 10), "NVLM-D-72B: this server vs. the model card (percent; OCRBench / 10)", fill="black", font=font)
    for i, kind in enumerate(_COLORS):  # legend
        x = 10 + i * 230
        draw.rectangle((x, 38, x + 14, 50), fill=_COLORS[kind])
        draw.text((x + 20, 36), _NAMES[kind], fill="black", font=small)
    span = width - left - 80
    y = 70
    for line in shown:
        divisor = line.row.scale / 100
        label = line.row.label[:30] + (" (/10)" if divisor > 1 else "")
        draw.text((10, y + bar), label, fill="black", font=small)
        values = {"ours": line.result.score if line.result else None, "hf": line.row.card.get("hf"),
                  "megatron": line.row.card.get("megatron")}
        for j, (kind, value) in enumerate(values.items()):
            top = y + j * bar
            if value is None:
                continue
            percent = value / divisor
            draw.rectangle((left, top, left + max(1, int(span * min(percent, 100) / 100)), top + bar - 2),
                           fill=_COLORS[kind])
            draw.text((left + int(span * min(percent, 100) / 100) + 6, top), f"{percent:.1f}", fill="black", font=small)
        y += 3 * bar + gap
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
