"""Parse what NVLM-D writes when asked for boxes, quadrilaterals or numbers.

Pure functions over the model's raw answer text. This module knows the box syntax NVLM-D was
trained on (SPEC section 9, Qwen-VL style: `<ref>text</ref><box>(x1,y1),(x2,y2)</box>` and
`<quad>(x1,y1),...,(x4,y4)</quad>`) and the variants real models drift into: InternVL's
`<box>[[x1, y1, x2, y2]]</box>`, several boxes in one tag, Qwen2-VL's `<|box_start|>` markers,
extra spaces, upper-case or HTML-escaped tags, a missing `<ref>` (the text before the box is
then the label), a missing closing tag, or output cut off in the middle of a box. It knows
nothing about images or pixels: coordinates come back exactly as written, on the model's
scale (see `coords.py` for the conversion), and nothing about LangChain.

Tables are parsed in `tables.py`; numbers ("1,234.5", "$1.2M", "(45)", "12 %") here.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = [
    "Grounding",
    "Quantity",
    "RefBox",
    "RefQuad",
    "parse_boxes",
    "parse_grounding",
    "parse_number",
    "parse_quads",
    "parse_quantity",
]

Point = tuple[float, float]


@dataclass(frozen=True)
class RefBox:
    """An axis-aligned box as the model wrote it, corners reordered so x1 <= x2 and y1 <= y2.

    Attributes:
        x1, y1, x2, y2: coordinates on the model's scale (0..1000 for NVLM-D).
        ref: the label: the `<ref>` text, else the text just before the box on its line, else None.
    """

    x1: float
    y1: float
    x2: float
    y2: float
    ref: str | None = None

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)


@dataclass(frozen=True)
class RefQuad:
    """A quadrilateral as the model wrote it: four (x, y) points in the order given."""

    points: tuple[Point, Point, Point, Point]
    ref: str | None = None

    @property
    def bounding_box(self) -> tuple[float, float, float, float]:
        xs = [p[0] for p in self.points]
        ys = [p[1] for p in self.points]
        return (min(xs), min(ys), max(xs), max(ys))


Shape = RefBox | RefQuad


@dataclass(frozen=True)
class Grounding:
    """Everything found in one grounded answer, in text order.

    Attributes:
        shapes: boxes and quadrilaterals in the order they appear.
        issues: what was seen but could not be used (a truncated box, a `<ref>` without a box...),
            one sentence each, for logs and error messages.
    """

    shapes: list[Shape] = field(default_factory=list)
    issues: list[str] = field(default_factory=list)

    @property
    def boxes(self) -> list[RefBox]:
        return [s for s in self.shapes if isinstance(s, RefBox)]

    @property
    def quads(self) -> list[RefQuad]:
        return [s for s in self.shapes if isinstance(s, RefQuad)]


# --- grounded answers --------------------------------------------------------------------

# Qwen2-VL's markers and HTML-escaped tags are rewritten into the Qwen-VL tags first.
_ALIASES: list[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]] = [
    (re.compile(r"<\|object_ref_start\|>", re.IGNORECASE), "<ref>"),
    (re.compile(r"<\|object_ref_end\|>", re.IGNORECASE), "</ref>"),
    (re.compile(r"<\|box_start\|>", re.IGNORECASE), "<box>"),
    (re.compile(r"<\|box_end\|>", re.IGNORECASE), "</box>"),
    (re.compile(r"<\|quad_start\|>", re.IGNORECASE), "<quad>"),
    (re.compile(r"<\|quad_end\|>", re.IGNORECASE), "</quad>"),
    # "< box >", "<BOX>", "</ box>": one spelling.
    (re.compile(r"<\s*(/?)\s*(ref|box|quad)\s*>", re.IGNORECASE), lambda m: f"<{m[1]}{m[2].lower()}>"),
]
# An element is a <ref> or a <box>/<quad>; a missing closing tag ends it at the next tag,
# the end of the line or the end of the text (truncated output).
_ELEMENT = re.compile(
    r"<ref>(?P<ref>.*?)(?:</ref>|(?=<(?:ref|box|quad)>)|(?=\n)|$)"
    r"|<(?P<kind>box|quad)>(?P<body>.*?)(?:</(?:box|quad)>|(?=<(?:ref|box|quad)>)|(?=\n)|$)",
    re.DOTALL,
)
_NUM = r"[-+]?\d+(?:\.\d+)?"
_NUMBER = re.compile(_NUM)
_GROUP = re.compile(r"\(([^()]*)\)|\[([^\[\]]*)\]")
# Untagged answers ("The total is at (612,840),(702,866).") : two points, or [x1, y1, x2, y2].
_BARE_BOX = re.compile(
    rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,?\s*(?:to|-)?\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)"
    rf"|\[\s*\[?\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]?\s*\]"
)
_MAX_LABEL_CHARS = 300


def parse_grounding(text: str) -> Grounding:
    """Find every box and quadrilateral in a grounded answer, with its label.

    Rules, in order:
      1. `<ref>`, `<box>`, `<quad>` (any case, spaces inside the brackets, HTML-escaped, or
         Qwen2-VL's `<|box_start|>` spelling) are recognised; a missing closing tag ends the
         element at the next tag or line end.
      2. A tag body holds points `(x,y)` or bracketed groups `[x1,y1,x2,y2]`, or bare numbers:
         in `<box>`, two points or four numbers make a box, four points make a quadrilateral;
         in `<quad>`, four points or eight numbers make a quadrilateral. Several shapes in one
         tag are all kept; leftover numbers (cut-off output) are reported in `issues`.
      3. A shape right after a `<ref>` takes it as label. Otherwise its label is the text
         between it and the previous shape (the last line of it) when there is any, else the
         previous shape's label: one `<ref>` labels every box after it until the next label.
      4. Only when the text has no tags at all, untagged boxes `(x1,y1),(x2,y2)` or
         `[x1, y1, x2, y2]` are accepted, labelled by the text before them on their line.

    Args:
        text: the model's raw answer.

    Returns:
        The shapes in text order, coordinates as written (box corners reordered), and issues.
    """
    text = _normalize_tags(text)
    if not _ELEMENT.search(text):
        return _parse_untagged(text)

    shapes: list[Shape] = []
    issues: list[str] = []
    pending_ref: str | None = None
    ref_used = True
    last_end = 0
    for match in _ELEMENT.finditer(text):
        between = _label_text(text[last_end : match.start()])
        last_end = match.end()
        if match["ref"] is not None:
            if not ref_used:
                issues.append(f"<ref>{pending_ref}</ref> has no box after it")
            pending_ref, ref_used = _clean_label(match["ref"]), False
            continue
        if ref_used and between:
            pending_ref = between  # later boxes with nothing in between share this label
        label = pending_ref
        found, problem = _shapes_in_body(match["kind"], match["body"], label)
        if problem:
            issues.append(problem)
        shapes.extend(found)
        ref_used = True
    if not ref_used:
        issues.append(f"<ref>{pending_ref}</ref> has no box after it (output cut off?)")
    return Grounding(shapes, issues)


def parse_boxes(text: str) -> list[RefBox]:
    """The axis-aligned boxes of a grounded answer (see `parse_grounding` for the rules)."""
    return parse_grounding(text).boxes


def parse_quads(text: str) -> list[RefQuad]:
    """The quadrilaterals of a grounded answer (see `parse_grounding` for the rules)."""
    return parse_grounding(text).quads


def _normalize_tags(text: str) -> str:
    if "&lt;" in text:
        text = re.sub(r"&lt;(\s*/?\s*(?:ref|box|quad)\s*)&gt;", r"<\1>", text, flags=re.IGNORECASE)
    for pattern, replacement in _ALIASES:
        text = pattern.sub(replacement, text)
    return text


def _shapes_in_body(kind: str, body: str, label: str | None) -> tuple[list[Shape], str | None]:
    """Shapes in one tag body, and a sentence about anything left over."""
    groups = [[float(n) for n in _NUMBER.findall(a or b)] for a, b in _GROUP.findall(body)]
    if not groups:
        groups = [[float(n) for n in _NUMBER.findall(body)]]
    points: list[Point] = []
    shapes: list[Shape] = []
    leftover: list[float] = []
    for numbers in groups:
        if len(numbers) == 2:
            points.append((numbers[0], numbers[1]))
            continue
        # A group of 4 is a box, of 8 a quad; a bare-number body is split the same way.
        size = 8 if kind == "quad" and len(numbers) % 8 == 0 else 4
        usable = len(numbers) - len(numbers) % size
        for i in range(0, usable, size):
            shapes.append(_make_shape(numbers[i : i + size], label))
        leftover.extend(numbers[usable:])
    step = 4 if kind == "quad" or len(points) == 4 else 2
    usable = len(points) - len(points) % step
    for i in range(0, usable, step):
        flat = [c for p in points[i : i + step] for c in p]
        shapes.append(_make_shape(flat, label))
    leftover.extend(c for p in points[usable:] for c in p)
    # Numbers outside any closed group ("(12,34),(56" cut off) are left over too.
    ungrouped = len(_NUMBER.findall(body)) > sum(len(g) for g in groups)
    written = f"<{kind}>{body.strip()[:80]}</{kind}>"
    if not shapes:
        return [], f"{written} holds no complete {kind} (output cut off or malformed)"
    if leftover or ungrouped:
        return shapes, f"{written} ends with an incomplete {kind} (output cut off?)"
    return shapes, None


def _make_shape(numbers: list[float], label: str | None) -> Shape:
    if len(numbers) == 8:
        p = numbers
        return RefQuad(((p[0], p[1]), (p[2], p[3]), (p[4], p[5]), (p[6], p[7])), label)
    x1, y1, x2, y2 = numbers
    return RefBox(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2), label)


def _parse_untagged(text: str) -> Grounding:
    shapes: list[Shape] = []
    last_end = 0
    for match in _BARE_BOX.finditer(text):
        numbers = [float(n) for n in match.groups() if n is not None]
        shapes.append(_make_shape(numbers, _label_text(text[last_end : match.start()]) or None))
        last_end = match.end()
    return Grounding(shapes, [])


def _label_text(between: str) -> str | None:
    """The label a run of plain text gives the box after it: its last line, cleaned."""
    line = between.rstrip().rsplit("\n", 1)[-1]
    return _clean_label(line) or None


def _clean_label(text: str) -> str | None:
    text = html.unescape(text).strip()
    # List markers, trailing separators and quotes around the label are not part of it.
    text = re.sub(r"^(?:[-*\u2022]|\d+[.)])\s+", "", text)
    text = text.strip(" \t:;,=").strip("\"'\u201c\u201d").strip()
    if not text:
        return None
    return text[:_MAX_LABEL_CHARS]


# --- numbers -----------------------------------------------------------------------------


class Quantity(NamedTuple):
    """A number read from text, with the unit written next to it (`%`, `$`, `kg`...) if any."""

    value: float
    unit: str | None


_MINUS = "-\u2212\u2013\u2012"  # ASCII hyphen, minus sign, en dash, figure dash
_CURRENCY = "$\u20ac\u00a3\u00a5\u20b9"  # $ EUR GBP JPY INR
_MULTIPLIERS = {
    "k": 1e3, "thousand": 1e3, "thousands": 1e3,
    "m": 1e6, "mm": 1e6, "mn": 1e6, "million": 1e6, "millions": 1e6,
    "b": 1e9, "bn": 1e9, "billion": 1e9, "billions": 1e9,
    "t": 1e12, "tn": 1e12, "trillion": 1e12, "trillions": 1e12,
}  # fmt: skip
# Suffixes of one or two letters are multipliers only in these spellings: "5 m" is metres,
# "5 mm" millimetres, "5 t" tonnes, but "5M", "5MM", "5bn" are millions and billions.
_SHORT_MULTIPLIERS = {"k", "K", "M", "MM", "Mn", "mn", "B", "Bn", "bn", "T", "tn"}
# Outside strict mode the word after a number is usually just the next word ("45 and 50"):
# only these count as units there.
_KNOWN_UNITS = {
    "usd", "eur", "gbp", "jpy", "cny", "inr", "chf", "kg", "g", "mg", "lb", "lbs", "t", "km", "m", "cm",
    "mm", "mi", "ft", "l", "ml", "s", "ms", "h", "hrs", "min", "kwh", "mwh", "gwh", "kw", "mw", "gw",
    "mph", "km/h", "m/s", "pts", "bps", "x", "°", "°c", "°f", "gb", "mb", "tb",
}  # fmt: skip
_QUANTITY = re.compile(
    # Not glued to a word before it: "Q1", "FY2019" and "x2" hold no number.
    rf"(?<![\w.])(?P<open>\()?\s*(?P<sign>[{_MINUS}+])?\s*(?P<currency>[{_CURRENCY}]|USD|EUR|GBP)?\s*"
    rf"(?P<sign2>[{_MINUS}+])?(?P<digits>\d[\d,.\u00a0\u202f\u2009']*|\.\d+)"
    r"(?:[eE](?P<exp>[-+]?\d+))?"
    r"(?:\s*(?P<suffix>%|[A-Za-z]{1,5}/[A-Za-z]{1,5}\b|[A-Za-z]{1,10}\b|°[CF]?))?"
    r"\s*(?P<close>\))?"
)
_SPACE_THOUSANDS = re.compile(r"(?<=\d) (?=\d{3}(?!\d))")


def parse_quantity(text: str, *, strict: bool = False) -> Quantity | None:
    """Read the first number in `text`, with its unit.

    Accepted: thousands separators (`1,234,567`, `1 234`, `1.234.567`, `1'234`), a decimal
    comma when unambiguous (`12,5`; `1.234,5`), a sign (ASCII or Unicode minus), accounting
    negatives `(1,234)`, a leading currency (`$`, `EUR`...), exponents (`1.2e3`), a trailing
    `%`, a multiplier (`k`, `M`, `bn`, `million`: the value is scaled, so `$1.2M` is 1,200,000
    in `$`) or a unit word (`kg`, `USD`, `km/h`). A comma followed by exactly three digits is
    a thousands separator (`1,234` is 1234); `1.234` is one point two three four.

    Args:
        text: a table cell, a short answer or a sentence.
        strict: the whole text must be the number and its decoration (for table cells:
            "Q1" and "2019 Q1" are not numbers), and any short word after it is its unit;
            otherwise only common unit words count as units.

    Returns:
        The value and unit (None when no unit is written), or None when there is no number.
    """
    text = _SPACE_THOUSANDS.sub("", text.strip().replace("**", ""))
    match = _QUANTITY.fullmatch(text) if strict else _QUANTITY.search(text)
    if match is None:
        return None
    value = _read_digits(match["digits"])
    if value is None:
        return None
    if match["exp"]:
        value *= 10.0 ** int(match["exp"])
    unit = match["currency"]
    suffix = match["suffix"]
    if suffix:
        key = suffix.lower()
        if key in _MULTIPLIERS and (len(suffix) > 2 or suffix in _SHORT_MULTIPLIERS):
            value *= _MULTIPLIERS[key]
        elif key in ("%", "percent"):
            unit = "%"
        elif strict or key in _KNOWN_UNITS:
            unit = suffix if unit is None else f"{unit} {suffix}"
    negative = any(match[g] is not None and match[g] in _MINUS for g in ("sign", "sign2"))
    if match["open"] and match["close"]:
        negative = True  # accounting: (1,234) is -1234
    elif strict and (match["open"] or match["close"]):
        return None
    return Quantity(-value if negative else value, unit)


def parse_number(text: str, *, strict: bool = False) -> float | None:
    """The first number in `text` as a float, or None (see `parse_quantity` for what is accepted).

    >>> parse_number("1,234.5"), parse_number("$1.2M"), parse_number("(45)"), parse_number("n/a")
    (1234.5, 1200000.0, -45.0, None)
    """
    quantity = parse_quantity(text, strict=strict)
    return None if quantity is None else quantity.value


def _read_digits(digits: str) -> float | None:
    digits = re.sub(r"[\u00a0\u202f\u2009' ]", "", digits).rstrip(".,")
    if not digits:
        return None
    commas, dots = digits.count(","), digits.count(".")
    if commas and dots:
        # Whichever comes last is the decimal separator: 1,234.5 and 1.234,5.
        if digits.rfind(",") > digits.rfind("."):
            digits = digits.replace(".", "").replace(",", ".")
        else:
            digits = digits.replace(",", "")
    elif commas:
        groups = digits.split(",")
        if commas > 1 or len(groups[1]) == 3:
            digits = digits.replace(",", "")  # 1,234 and 1,234,567 (and Indian 1,23,456)
        else:
            digits = digits.replace(",", ".")  # 12,5
    elif dots > 1:
        digits = digits.replace(".", "")  # 1.234.567
    try:
        return float(digits)
    except ValueError:
        return None
