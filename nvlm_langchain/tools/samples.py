"""Synthetic documents drawn with Pillow: a multi-page PDF invoice and a bar chart.

For the examples, the tests and a first smoke test of a deployment: they need no files, no
fonts beyond Pillow's built-in one and no network. Each function also returns where it drew
things (pixel boxes in the image, or in the page rendered at `dpi`) so a test can check a
located box against the truth. Knows nothing of models or tools.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

__all__ = ["InvoiceDocument", "draw_bar_chart", "make_invoice_pdf"]

_LETTER_IN = (8.5, 11.0)
_ITEMS = [
    ("Vision tower license", 1, 1200.00),
    ("GPU hours (H100)", 64, 2.75),
    ("Annotation service", 12, 45.50),
    ("Document scanning", 300, 0.40),
    ("Support plan (monthly)", 3, 99.00),
    ("Storage, 2 TB", 2, 20.00),
]


@dataclass
class InvoiceDocument:
    """What `make_invoice_pdf` wrote.

    Attributes:
        path: the PDF file.
        pages: number of pages.
        total: the amount due printed on the last page.
        boxes: text -> (page, (x1, y1, x2, y2) in pixels of the page rendered at `dpi`).
        dpi: the resolution the boxes refer to (the pages were drawn at it).
    """

    path: Path
    pages: int
    total: float
    dpi: int
    boxes: dict[str, tuple[int, tuple[int, int, int, int]]] = field(default_factory=dict)


def make_invoice_pdf(path: str | Path, *, dpi: int = 144) -> InvoiceDocument:
    """Write a 3-page US Letter invoice (header, line items, totals) as a PDF with Pillow.

    Args:
        path: where to write the PDF.
        dpi: the resolution the pages are drawn at and stored with (a page rendered back at
            the same dpi has the same pixels' geometry).
    """
    path = Path(path)
    size = (round(_LETTER_IN[0] * dpi), round(_LETTER_IN[1] * dpi))
    font = ImageFont.load_default(size=max(10, dpi // 7))
    big = ImageFont.load_default(size=max(14, dpi // 4))
    doc = InvoiceDocument(path=path, pages=3, total=0.0, dpi=dpi)
    pages = [Image.new("RGB", size, "white") for _ in range(3)]
    margin = dpi // 2

    Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

    def write(page: int, xy: tuple[int, int], text: str, use: Font = font) -> None:
        draw = ImageDraw.Draw(pages[page - 1])
        draw.text(xy, text, fill="black", font=use)
        box = draw.textbbox(xy, text, font=use)
        doc.boxes.setdefault(text, (page, (int(box[0]), int(box[1]), int(box[2]), int(box[3]))))

    # Page 1: header and addresses.
    write(1, (margin, margin), "INVOICE", big)
    write(1, (margin, margin + dpi // 2), "Invoice No. INV-2024-0417")
    write(1, (margin, margin + dpi * 3 // 4), "Date: 2024-04-17")
    write(1, (margin, margin + dpi * 3 // 2), "Bill to: Example Labs Inc., 1 Market St, Springfield")
    write(1, (margin, margin + dpi * 2), "Payment terms: 30 days")
    # Page 2: line items.
    write(2, (margin, margin), "Line items", big)
    subtotal = 0.0
    for row, (name, quantity, price) in enumerate(_ITEMS):
        y = margin + dpi * 3 // 4 + row * dpi // 3
        amount = quantity * price
        subtotal += amount
        write(2, (margin, y), name)
        write(2, (size[0] // 2, y), f"{quantity} x {price:,.2f}")
        write(2, (size[0] * 3 // 4, y), f"{amount:,.2f}")
    # Page 3: totals.
    tax = round(subtotal * 0.08, 2)
    doc.total = round(subtotal + tax, 2)
    write(3, (margin, margin), "Summary", big)
    write(3, (margin, margin + dpi), f"Subtotal: {subtotal:,.2f} USD")
    write(3, (margin, margin + dpi * 3 // 2), f"Tax (8%): {tax:,.2f} USD")
    write(3, (margin, margin + dpi * 2), f"Total due: {doc.total:,.2f} USD", big)
    buffer = io.BytesIO()
    pages[0].save(buffer, format="PDF", save_all=True, append_images=pages[1:], resolution=float(dpi))
    path.write_bytes(buffer.getvalue())
    return doc


def draw_bar_chart(
    path: str | Path | None = None,
    *,
    data: dict[str, float] | None = None,
    title: str = "Revenue by quarter (USD k)",
    size: tuple[int, int] = (800, 600),
) -> tuple[Image.Image, dict[str, tuple[int, int, int, int]]]:
    """Draw a labelled bar chart; save it as PNG when `path` is given.

    Returns:
        The image and each bar's pixel box, keyed by its category.
    """
    data = data or {"Q1": 120.0, "Q2": 135.5, "Q3": 98.0, "Q4": 160.25}
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font_px = max(12, height // 30)
    font = ImageFont.load_default(size=font_px)
    left, right, top, bottom = width // 8, width - width // 16, height // 6, height - height // 8
    draw.text((left, height // 20), title, fill="black", font=ImageFont.load_default(size=max(14, height // 22)))
    draw.line((left, bottom, right, bottom), fill="black", width=2)
    draw.line((left, top, left, bottom), fill="black", width=2)
    peak = max(data.values()) or 1.0
    slot = (right - left) / len(data)
    bars: dict[str, tuple[int, int, int, int]] = {}
    for i, (label, value) in enumerate(data.items()):
        x1 = round(left + slot * i + slot * 0.2)
        x2 = round(left + slot * (i + 1) - slot * 0.2)
        y1 = round(bottom - (bottom - top) * value / peak)
        draw.rectangle((x1, y1, x2 - 1, bottom - 1), fill=(66, 114, 196))
        draw.text((x1, y1 - font_px - 4), f"{value:g}", fill="black", font=font)
        draw.text((x1, bottom + 6), label, fill="black", font=font)
        bars[label] = (x1, y1, x2, bottom)
    if path is not None:
        image.save(path, format="PNG")
    return image, bars
