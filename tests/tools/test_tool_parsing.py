"""Parsers of raw model output: boxes, quads, numbers, tables. Tables of realistic answers,
malformed and cut-off ones included; no model."""

from __future__ import annotations

import math

import pytest

from nvlm_langchain.tools.parsing import (
    RefBox,
    RefQuad,
    parse_boxes,
    parse_grounding,
    parse_number,
    parse_quads,
    parse_quantity,
)
from nvlm_langchain.tools.tables import TableParseError, parse_table, split_unit

# --- grounded answers: (raw answer, [(label, x1, y1, x2, y2) or (label, 8 quad numbers)], issues expected)

B = RefBox


def Q(ref: str | None, *n: float) -> RefQuad:
    return RefQuad(((n[0], n[1]), (n[2], n[3]), (n[4], n[5]), (n[6], n[7])), ref)


GROUNDING_CASES = [
    # The trained format, one box.
    ("<ref>Total</ref><box>(612,840),(702,866)</box>", [B(612, 840, 702, 866, "Total")], False),
    # Grounded OCR, several lines.
    (
        "<ref>INVOICE</ref><box>(58,51),(172,68)</box>\n"
        "<ref>Invoice No. INV-2024-0417</ref><box>(58,96),(305,108)</box>\n"
        "<ref>Date: 2024-04-17</ref><box>(58,119),(190,131)</box>",
        [
            B(58, 51, 172, 68, "INVOICE"),
            B(58, 96, 305, 108, "Invoice No. INV-2024-0417"),
            B(58, 119, 190, 131, "Date: 2024-04-17"),
        ],
        False,
    ),
    # Extra spaces everywhere.
    ("<ref> Total due </ref> <box>( 58 , 190 ) , ( 402 , 210 )</box>", [B(58, 190, 402, 210, "Total due")], False),
    # Upper-case and spaced tags.
    ("<REF>Tax</REF>< box >(10,20),(30,40)</ box >", [B(10, 20, 30, 40, "Tax")], False),
    # InternVL's double brackets.
    ("<ref>logo</ref><box>[[100, 50, 300, 150]]</box>", [B(100, 50, 300, 150, "logo")], False),
    # Several boxes in one tag (InternVL), one label for all.
    (
        "<ref>USD</ref><box>[[10, 20, 30, 40], [50, 60, 70, 80]]</box>",
        [B(10, 20, 30, 40, "USD"), B(50, 60, 70, 80, "USD")],
        False,
    ),
    # One ref, two box tags.
    (
        "<ref>2024</ref><box>(1,2),(3,4)</box><box>(5,6),(7,8)</box>",
        [B(1, 2, 3, 4, "2024"), B(5, 6, 7, 8, "2024")],
        False,
    ),
    # Corners given in the wrong order.
    ("<ref>x</ref><box>(300,400),(100,200)</box>", [B(100, 200, 300, 400, "x")], False),
    # No <ref>: the text before the box labels it.
    ("Subtotal: 2,379.00 USD<box>(58,120),(330,133)</box>", [B(58, 120, 330, 133, "Subtotal: 2,379.00 USD")], False),
    # No <ref>, list markers and a colon before the box.
    ("1. Payment terms: <box>(58,180),(260,192)</box>", [B(58, 180, 260, 192, "Payment terms")], False),
    # Truncated in the middle of the last box.
    ("<ref>A</ref><box>(1,2),(3,4)</box>\n<ref>B</ref><box>(5,6),(7", [B(1, 2, 3, 4, "A")], True),
    # Truncated inside the <ref> of the last span.
    ("<ref>A</ref><box>(1,2),(3,4)</box><ref>Bill to: Exam", [B(1, 2, 3, 4, "A")], True),
    # Missing </box> before the next span (a skipped token).
    ("<ref>A</ref><box>(1,2),(3,4)<ref>B</ref><box>(5,6),(7,8)</box>", [B(1, 2, 3, 4, "A"), B(5, 6, 7, 8, "B")], False),
    # Missing </ref>.
    ("<ref>Total<box>(1,2),(3,4)</box>", [B(1, 2, 3, 4, "Total")], False),
    # Missing <box> tags entirely: an untagged answer.
    ("The total is at (612,840),(702,866).", [B(612, 840, 702, 866, "The total is at")], False),
    # Untagged InternVL list.
    ("[120, 40, 380, 96]", [B(120, 40, 380, 96, None)], False),
    # Qwen2-VL markers.
    (
        "<|object_ref_start|>Total<|object_ref_end|><|box_start|>(612,840),(702,866)<|box_end|>",
        [B(612, 840, 702, 866, "Total")],
        False,
    ),
    # HTML-escaped tags (an answer passed through a markdown renderer).
    ("&lt;ref&gt;Total&lt;/ref&gt;&lt;box&gt;(1,2),(3,4)&lt;/box&gt;", [B(1, 2, 3, 4, "Total")], False),
    # Decimal coordinates.
    ("<ref>a</ref><box>(0.5,1.25),(10.75,20)</box>", [B(0.5, 1.25, 10.75, 20, "a")], False),
    # Bare numbers in the tag.
    ("<ref>a</ref><box>10 20 30 40</box>", [B(10, 20, 30, 40, "a")], False),
    # Quad, the trained format.
    (
        "<ref>STAMP</ref><quad>(100,100),(200,110),(195,160),(95,150)</quad>",
        [Q("STAMP", 100, 100, 200, 110, 195, 160, 95, 150)],
        False,
    ),
    # Quad written as eight bare numbers.
    ("<ref>x</ref><quad>1,2,3,4,5,6,7,8</quad>", [Q("x", 1, 2, 3, 4, 5, 6, 7, 8)], False),
    # Four points inside <box>: a quadrilateral.
    ("<ref>rot</ref><box>(1,2),(3,4),(5,6),(7,8)</box>", [Q("rot", 1, 2, 3, 4, 5, 6, 7, 8)], False),
    # Truncated quad: nothing usable.
    ("<ref>x</ref><quad>(1,2),(3,4),(5,6)", [], True),
    # Boxes and quads mixed, order kept.
    (
        "<ref>a</ref><box>(1,2),(3,4)</box><ref>b</ref><quad>(1,1),(2,1),(2,2),(1,2)</quad>",
        [B(1, 2, 3, 4, "a"), Q("b", 1, 1, 2, 1, 2, 2, 1, 2)],
        False,
    ),
    # Prose around the answer.
    (
        "Sure! The text appears here: <ref>Total due</ref><box>(58,190),(402,210)</box>. Let me know if you need more.",
        [B(58, 190, 402, 210, "Total due")],
        False,
    ),
    # Refusal, no coordinates at all.
    ('I cannot find the text "Total" in the image.', [], False),
    # Empty answer.
    ("", [], False),
    # A ref without any box.
    ("<ref>Total</ref>", [], True),
    # Empty box tag.
    ("<ref>Total</ref><box></box>", [], True),
    # Out-of-grid and negative values are kept as written (the conversion clamps them).
    ("<ref>edge</ref><box>(-5,990),(1003,1000)</box>", [B(-5, 990, 1003, 1000, "edge")], False),
    # Noise from a random model.
    ("ĠSeg beforehand<box>ivos 12 abc</box>", [], True),
]


@pytest.mark.parametrize(("raw", "expected", "has_issues"), GROUNDING_CASES)
def test_parse_grounding(raw: str, expected: list, has_issues: bool) -> None:
    grounding = parse_grounding(raw)
    assert grounding.shapes == expected
    assert bool(grounding.issues) == has_issues, grounding.issues
    assert parse_boxes(raw) == [s for s in expected if isinstance(s, RefBox)]
    assert parse_quads(raw) == [s for s in expected if isinstance(s, RefQuad)]


def test_quad_bounding_box() -> None:
    assert Q(None, 100, 100, 200, 110, 195, 160, 95, 150).bounding_box == (95, 100, 200, 160)


# --- numbers -----------------------------------------------------------------------------

NUMBER_CASES = [
    ("1,234.5", 1234.5, None),
    ("1234", 1234, None),
    ("$1,234", 1234, "$"),
    ("$1.2M", 1.2e6, "$"),
    ("\u20ac 3.4bn", 3.4e9, "\u20ac"),
    ("12%", 12, "%"),
    ("12 %", 12, "%"),
    ("-3.5", -3.5, None),
    ("\u22123.5", -3.5, None),  # Unicode minus
    ("(1,234)", -1234, None),  # accounting negative
    ("1.234,5", 1234.5, None),  # European
    ("12,5", 12.5, None),
    ("1 234 567", 1234567, None),
    ("1\u202f234", 1234, None),  # narrow no-break space
    ("1'234", 1234, None),
    ("1.2e3", 1200, None),
    ("45 kg", 45, "kg"),
    ("USD 99", 99, "USD"),
    ("3.5 million", 3.5e6, None),
    ("25k", 25000, None),
    ("5 m", 5, "m"),  # metres, not millions
    ("**42**", 42, None),  # markdown bold
    (".5", 0.5, None),
    ("+4.5%", 4.5, "%"),
    ("The answer is 45.", 45, None),
    ("about 45 to 50", 45, None),
    ("Q1", None, None),
    ("FY2019", None, None),
    ("n/a", None, None),
    ("-", None, None),
    ("", None, None),
    ("Yes", None, None),
]


@pytest.mark.parametrize(("text", "value", "unit"), NUMBER_CASES)
def test_parse_number(text: str, value: float | None, unit: str | None) -> None:
    quantity = parse_quantity(text)
    if value is None:
        assert quantity is None and parse_number(text) is None
        return
    assert quantity is not None
    assert math.isclose(quantity.value, value)
    assert quantity.unit == unit
    assert parse_number(text) == quantity.value


@pytest.mark.parametrize("text", ["Q1", "2019 Q1", "about 45", "45 and 50", "12)", "(12", "x2"])
def test_strict_numbers_must_fill_the_cell(text: str) -> None:
    assert parse_quantity(text, strict=True) is None


# --- tables ------------------------------------------------------------------------------

TABLE_CASES = [
    # Markdown with units in headers, alignment colons, prose before.
    (
        "Here is the data table:\n\n| Quarter | Revenue (USD k) | Growth (%) |\n|:--|--:|--:|\n"
        "| Q1 | 120 | 5.2 |\n| Q2 | 135.5 | 12.9 |",
        ["Quarter", "Revenue", "Growth"],
        [None, "USD k", "%"],
        [["Q1", 120, 5.2], ["Q2", 135.5, 12.9]],
    ),
    # No outer pipes, no separator row.
    ("Year | Sales\n2019 | 12.5\n2020 | 14", ["Year", "Sales"], [None, None], [[2019, 12.5], [2020, 14]]),
    # DePlot linearized, with title.
    (
        "TITLE | Revenue by quarter <0x0A> Quarter | Revenue <0x0A> Q1 | 120 <0x0A> Q2 | 135.5",
        ["Quarter", "Revenue"],
        [None, None],
        [["Q1", 120], ["Q2", 135.5]],
    ),
    # Inside a code fence, CSV.
    (
        '```csv\nRegion,Sales (EUR),Share\nNorth,"1,200",30%\nSouth,900,22.5%\n```',
        ["Region", "Sales", "Share"],
        [None, "EUR", "%"],
        [["North", 1200, 30], ["South", 900, 22.5]],
    ),
    # Tab-separated.
    ("Month\tVisitors\nJan\t1200\nFeb\t1350", ["Month", "Visitors"], [None, None], [["Jan", 1200], ["Feb", 1350]]),
    # Semicolons, decimal commas.
    ("Land;Wert\nDE;12,5\nFR;9,75", ["Land", "Wert"], [None, None], [["DE", 12.5], ["FR", 9.75]]),
    # Key: value lines.
    (
        "Q1: $120k\nQ2: $135.5k\nQ3: $98k",
        ["label", "value"],
        [None, "$"],
        [["Q1", 120000], ["Q2", 135500.0], ["Q3", 98000]],
    ),
    # Bulleted key: value lines after a sentence.
    (
        "The chart shows:\n- Apples: 45%\n- Pears: 30%\n- Plums: 25%",
        ["label", "value"],
        [None, "%"],
        [["Apples", 45], ["Pears", 30], ["Plums", 25]],
    ),
    # Cut off in the last row.
    (
        "| Year | A | B |\n|---|---|---|\n| 2019 | 1 | 2 |\n| 2020 | 3",
        ["Year", "A", "B"],
        [None, None, None],
        [[2019, 1, 2], [2020, 3, None]],
    ),
    # Cut off inside the code fence (no closing fence).
    ("```markdown\n| k | v |\n|---|---|\n| a | 1 |\n| b | 2 |", ["k", "v"], [None, None], [["a", 1], ["b", 2]]),
    # Units from the cells when the header has none.
    (
        "| Item | Price |\n|---|---|\n| Tea | $3.50 |\n| Cake | $4.25 |",
        ["Item", "Price"],
        [None, "$"],
        [["Tea", 3.5], ["Cake", 4.25]],
    ),
    # Wide table with years as headers.
    (
        "| Region | 2019 | 2020 |\n|---|---|---|\n| North | 12 | 15 |\n| South | 9 | 11 |",
        ["Region", "2019", "2020"],
        [None, None, None],
        [["North", 12, 15], ["South", 9, 11]],
    ),
    # Empty cells, dashes and n/a.
    (
        "| a | b |\n|---|---|\n| x | - |\n| y | n/a |\n| z |  |",
        ["a", "b"],
        [None, None],
        [["x", None], ["y", None], ["z", None]],
    ),
    # Bold headers and cells.
    ("| **Year** | **Value** |\n|---|---|\n| **2021** | 7 |", ["Year", "Value"], [None, None], [[2021, 7]]),
    # HTML table.
    (
        "<table><tr><th>Team</th><th>Wins</th></tr><tr><td>Red</td><td>10</td></tr><tr><td>Blue</td><td>8</td></tr></table>",
        ["Team", "Wins"],
        [None, None],
        [["Red", 10], ["Blue", 8]],
    ),
    # Extra cells beyond the header are dropped.
    ("| a | b |\n|---|---|\n| 1 | 2 | 3 |\n| 4 | 5 |", ["a", "b"], [None, None], [[1, 2], [4, 5]]),
    # Negative and accounting values.
    (
        "| Year | Profit (USD m) |\n|---|---|\n| 2019 | (12.5) |\n| 2020 | -3 |",
        ["Year", "Profit"],
        [None, "USD m"],
        [[2019, -12.5], [2020, -3]],
    ),
    # Headerless numeric table.
    ("2019 | 12\n2020 | 15", ["column_1", "column_2"], [None, None], [[2019, 12], [2020, 15]]),
    # Header 'Share %' and 'Sales in millions'.
    (
        "Brand, Share %, Sales in millions\nA, 40, 1.5\nB, 60, 2.25",
        ["Brand", "Share", "Sales"],
        [None, "%", "millions"],
        [["A", 40, 1.5], ["B", 60, 2.25]],
    ),
]


@pytest.mark.parametrize(("raw", "columns", "units", "rows"), TABLE_CASES)
def test_parse_table(raw: str, columns: list[str], units: list[str | None], rows: list[list]) -> None:
    table = parse_table(raw)
    assert table.columns == columns
    assert table.units == units
    assert table.rows == rows
    assert len(table.records()) == len(rows)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "The chart shows revenue rising steadily over the year.",
        "Sales: rising",  # one colon, no number: prose
        "ĠSeg beforehand ivos 12 abc",
        "| only one column |\n| still one |",
    ],
)
def test_parse_table_refuses_prose(raw: str) -> None:
    with pytest.raises(TableParseError, match="no table found"):
        parse_table(raw)


def test_table_title_issues_and_serializations() -> None:
    table = parse_table("TITLE | Sales <0x0A> Year | Sales (USD) <0x0A> 2019 | 1,200.5 <0x0A> 2020 | 1")
    assert table.title == "Sales"
    assert table.to_csv() == "Year,Sales (USD)\n2019,1200.5\n2020,1\n"
    assert table.to_dict() == {
        "title": "Sales",
        "columns": ["Year", "Sales"],
        "units": [None, "USD"],
        "rows": [[2019, 1200.5], [2020, 1]],
        "issues": [],
    }
    cut = parse_table("| a | b |\n|---|---|\n| 1 | 2 |\n| 3")
    assert cut.issues == ["row 2 has 1 of 2 cells; padded with empty cells (output cut off?)"]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Revenue (USD)", ("Revenue", "USD")),
        ("Share [%]", ("Share", "%")),
        ("Growth %", ("Growth", "%")),
        ("Sales in millions", ("Sales", "millions")),
        ("Sales, USD", ("Sales", "USD")),
        ("Sales (2019)", ("Sales (2019)", None)),
        ("Share (in percent)", ("Share", "%")),
        ("Region", ("Region", None)),
    ],
)
def test_split_unit(header: str, expected: tuple[str, str | None]) -> None:
    assert split_unit(header) == expected
