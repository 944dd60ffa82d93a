"""Reading images and PDF pages from every source an agent can name, and the errors on the way."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from PIL import Image

from nvlm_langchain.tools import DocumentInputError, load_pages, parse_page_spec
from nvlm_langchain.tools.samples import InvoiceDocument


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, [1, 2, 3, 4, 5]),
        ("", [1, 2, 3, 4, 5]),
        ("all", [1, 2, 3, 4, 5]),
        (2, [2]),
        ("3", [3]),
        ("2-4", [2, 3, 4]),
        ("1,3,5", [1, 3, 5]),
        ("1-2, 5", [1, 2, 5]),
        ("4-", [4, 5]),
        ("-2", [1, 2]),
        ("last", [5]),
        ("2 to 3", [2, 3]),
        ("pages 2-3", [2, 3]),
        ("3,1,3", [3, 1]),
    ],
)
def test_parse_page_spec(spec, expected: list[int]) -> None:
    assert parse_page_spec(spec, 5) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("6", "page 6 is out of range: the PDF has 5 pages \\(1-5\\)"),
        ("0", "page 0 is out of range"),
        ("4-2", "reversed range 4-2; write 2-4"),
        ("two", "cannot read pages='two'"),
        ("1,,2", "cannot read pages"),
        ("3-9", "page 9 is out of range"),
    ],
)
def test_parse_page_spec_errors(spec: str, message: str) -> None:
    with pytest.raises(DocumentInputError, match=message):
        parse_page_spec(spec, 5)


def test_pdf_pages_render_at_the_documented_dpi(invoice_pdf: InvoiceDocument) -> None:
    pages = load_pages(str(invoice_pdf.path))
    assert [p.page for p in pages] == [1, 2, 3]
    assert all(p.page_count == 3 and p.dpi == 144 for p in pages)
    # US Letter (612 x 792 pt) at 144 dpi, 2 px per point: 1224 x 1584.
    assert all(abs(p.width - 1224) <= 1 and abs(p.height - 1584) <= 1 for p in pages)
    low = load_pages(str(invoice_pdf.path), "2", dpi=72)
    assert (low[0].page, abs(low[0].width - 612) <= 1, abs(low[0].height - 792) <= 1) == (2, True, True)
    # The page content is there: "Total due" is drawn on page 3 where make_invoice_pdf says.
    page, (x1, y1, x2, y2) = invoice_pdf.boxes[f"Total due: {invoice_pdf.total:,.2f} USD"]
    crop = pages[page - 1].image.crop((x1, y1, x2, y2)).convert("L")
    assert crop.getextrema()[0] < 80


def test_pdf_from_base64_and_data_url(invoice_pdf: InvoiceDocument) -> None:
    encoded = base64.b64encode(invoice_pdf.path.read_bytes()).decode()
    assert [p.page for p in load_pages(encoded, "2-3")] == [2, 3]
    assert [p.page for p in load_pages(f"data:application/pdf;base64,{encoded}", "last")] == [3]
    assert [p.page for p in load_pages(invoice_pdf.path.as_uri(), 1)] == [1]


def test_pdf_page_limit(invoice_pdf: InvoiceDocument) -> None:
    with pytest.raises(
        DocumentInputError, match="3 pages asked .* at most 2 per call; pass a smaller range such as pages='1-2'"
    ):
        load_pages(str(invoice_pdf.path), max_pages=2)


def test_huge_page_is_rendered_within_the_pixel_limit(invoice_pdf: InvoiceDocument) -> None:
    (page,) = load_pages(str(invoice_pdf.path), "1", dpi=600, max_pixels=4_000_000)
    assert page.width * page.height <= 4_000_000
    assert page.dpi is not None and page.dpi < 600 and abs(page.width - 8.5 * page.dpi) <= 1


def test_image_sources(tmp_path: Path) -> None:
    image = Image.new("RGB", (33, 21), (10, 200, 30))
    image.save(tmp_path / "a.png")
    raw = (tmp_path / "a.png").read_bytes()
    encoded = base64.b64encode(raw).decode()
    for source in (
        str(tmp_path / "a.png"),
        tmp_path / "a.png",
        encoded,
        f"data:image/png;base64,{encoded}",
        raw,
        image,
    ):
        (page,) = load_pages(source)
        assert (page.page, page.width, page.height, page.dpi) == (None, 33, 21, None)
        assert page.image.getpixel((0, 0)) == (10, 200, 30)
    assert len(load_pages(str(tmp_path / "a.png"), 1)) == 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: str(d / "missing.png"), "'.*missing.png' is neither an existing file nor base64"),
        (lambda d: "https://example.com/scan.png", "URL fetching is off"),
        (lambda d: "ftp://example.com/scan.png", "unsupported URL scheme"),
        (
            lambda d: _write(d / "bad.pdf", b"%PDF-1.7\n garbage"),
            "cannot open .* as a PDF .*damaged or password-protected",
        ),
        (lambda d: _write(d / "bad.png", b"\x89PNG\r\n\x1a\n\x00\x00"), "cannot read .*bad.png' as an image or PDF"),
        (lambda d: _write(d / "notes.txt", b"hello, world"), "not an image format Pillow can read"),
        (lambda d: str(d), "not a regular file"),
    ],
)
def test_unreadable_sources_say_what_to_do(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(DocumentInputError, match=message):
        load_pages(make(tmp_path))


def test_pages_on_an_image_is_an_error(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(DocumentInputError, match="pages='2' was given but .* is an image, not a PDF"):
        load_pages(str(tmp_path / "a.png"), "2")


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)
