"""PDF -> upright RGB page images: the package's one PDF renderer, and its limits.

ChatNVLM's PDF content blocks (`messages.py`) and the document tools (`tools/documents.py`)
both render here, so a page looks the same to the model either way and both have the same
limits:

- bytes: a file is measured with `stat` before it is read (`read_pdf_file`), inline base64
  before it is decoded, so a 5 GB file costs nothing and never becomes a MemoryError;
- pages: a call renders at most `max_pages` pages; asking for more is refused (the error
  says how many pages there are), never silently truncated;
- pixels per page: a page renders at `dpi` unless that would exceed `max_page_pixels`; then
  it renders at the highest resolution that fits (`RenderedPage.dpi` says which). A 331-byte
  PDF can declare a 200-inch page: at 144 dpi 28800 x 28800 px, 3.3 GB of bitmap. Scaling
  down keeps the page readable as a whole, which is what the model sees anyway (NVLM-D tiles
  an image into at most a few 448 px tiles).

PDFium is not thread-safe: pypdfium2 forbids two PDFium calls at once in one process, even on
different documents, and concurrent renders of text pages crash it (SIGSEGV). ChatNVLM converts
messages in executor threads and the async tools render in worker threads, so every PDFium call
here runs under one process-wide lock, and every PDFium object is closed explicitly under it
(a finalizer would otherwise close it later, in whatever thread the garbage collector runs).

Errors are `PDFError`s whose messages name the limit or the problem, never the file's bytes.
Knows nothing of LangChain, models or where the bytes came from.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = [
    "DEFAULT_DPI",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PAGES",
    "DEFAULT_MAX_PAGE_PIXELS",
    "PDFError",
    "PDFLimitError",
    "PDFPageLimitError",
    "RenderedPage",
    "check_byte_count",
    "page_scale",
    "read_pdf_file",
    "render_pdf",
]

# 144 dpi = exactly 2 pixels per PDF point: US Letter renders at 1224x1584 and A4 at 1191x1684,
# above the 896x1344 that six 448 px tiles cover, so rendering never limits what the model
# sees; 10-point text is 20 px tall.
DEFAULT_DPI = 144
DEFAULT_MAX_PAGES = 8
DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # scanned PDFs run larger than single images
# 12 MP per page: A2 (420x594 mm) still renders at 144 dpi; the bitmap PDFium fills (4 bytes
# a pixel) plus its RGB copy stay under 90 MB a page.
DEFAULT_MAX_PAGE_PIXELS = 12_000_000

_LOCK = threading.Lock()


class PDFError(ValueError):
    """A PDF that cannot be read (damaged, encrypted, no pages) or is over a limit."""


class PDFLimitError(PDFError):
    """A PDF over a limit (bytes or pages); the message names the limit."""


class PDFPageLimitError(PDFLimitError):
    """More pages asked than `max_pages`.

    Attributes:
        asked: how many pages were asked for.
        page_count: pages in the PDF.
        max_pages: the limit.
    """

    def __init__(self, message: str, *, asked: int, page_count: int, max_pages: int) -> None:
        super().__init__(message)
        self.asked, self.page_count, self.max_pages = asked, page_count, max_pages


@dataclass(frozen=True)
class RenderedPage:
    """One rendered page.

    Attributes:
        image: upright RGB image (the page's /Rotate applied), on white.
        number: 1-based page number.
        page_count: pages in the PDF.
        dpi: the resolution it was rendered at (pixels = points * dpi / 72); below the asked
            dpi when the page would have exceeded the pixel budget.
    """

    image: Image.Image
    number: int
    page_count: int
    dpi: float


def check_byte_count(size: int, max_bytes: int, label: str, limit_name: str = "max_bytes") -> None:
    """Raise `PDFLimitError` when `size` bytes exceed `max_bytes`."""
    if size > max_bytes:
        raise PDFLimitError(
            f"{label} has {size:,} bytes or more, above {limit_name}={max_bytes:,} ({max_bytes / 2**20:.0f} MiB); "
            f"pass a smaller file, or raise {limit_name} if you trust it"
        )


def read_pdf_file(path: str | os.PathLike[str], max_bytes: int, *, limit_name: str = "max_bytes") -> bytes:
    """The bytes of a local file, measured before it is read.

    Raises:
        PDFLimitError: the file is larger than `max_bytes`.
        PDFError: not a regular file, or unreadable.
    """
    path = Path(path)
    label = f"file {str(path)!r}"
    try:
        if not path.is_file():
            raise PDFError(f"{label} is {'not a regular file' if path.exists() else 'not found'}")
        check_byte_count(path.stat().st_size, max_bytes, label, limit_name)
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise PDFError(f"cannot read {label}: {e.strerror or type(e).__name__}") from e
    check_byte_count(len(data), max_bytes, label, limit_name)  # the file may have grown meanwhile
    return data


def page_scale(width_pt: float, height_pt: float, dpi: float, max_pixels: int) -> float:
    """The render scale (pixels per point) for a page: `dpi / 72`, or less so the page fits `max_pixels`.

    PDFium sizes the bitmap as ceil(width * scale) x ceil(height * scale); the returned scale
    keeps that product within `max_pixels`.
    """
    if not (width_pt > 0 and height_pt > 0):
        raise PDFError(f"the page has no area ({width_pt} x {height_pt} points)")
    scale = dpi / 72.0
    if math.ceil(width_pt * scale) * math.ceil(height_pt * scale) <= max_pixels:
        return scale
    scale = math.sqrt(max_pixels / (width_pt * height_pt))
    # ceil() adds up to a pixel per side, which a thin page feels most: shrink until it fits.
    while math.ceil(width_pt * scale) * math.ceil(height_pt * scale) > max_pixels:
        scale *= 0.99
    return scale


def render_pdf(
    data: bytes,
    choose_pages: Callable[[int], Sequence[int]] | None = None,
    *,
    dpi: float = DEFAULT_DPI,
    max_pages: int = DEFAULT_MAX_PAGES,
    max_page_pixels: int = DEFAULT_MAX_PAGE_PIXELS,
    label: str = "the PDF",
) -> list[RenderedPage]:
    """Render pages of a PDF held in memory.

    Args:
        data: the PDF file's bytes (the caller checked their count).
        choose_pages: page count -> the 1-based page numbers to render, in order (it may raise
            to refuse a page spec); None renders every page.
        dpi: the resolution pages render at when they fit the pixel budget.
        max_pages: the most pages one call renders.
        max_page_pixels: the pixel budget of one page (see the module docstring).
        label: how messages name the document.

    Raises:
        PDFPageLimitError: more than `max_pages` pages chosen.
        PDFError: not a PDF, damaged or encrypted, no pages, a page that will not render.
        ImportError: pypdfium2 is not installed (the optional `pdf` extra).
    """
    import pypdfium2 as pdfium

    if not dpi > 0:
        raise PDFError(f"dpi must be positive, got {dpi}")
    if max_pages < 1 or max_page_pixels < 1:
        raise PDFError(f"max_pages and max_page_pixels must be at least 1, got {max_pages} and {max_page_pixels}")
    with _LOCK:
        try:
            document = pdfium.PdfDocument(data)
        except pdfium.PdfiumError as e:
            # PdfiumError names PDFium's error code ("Data format error"), never the data.
            raise PDFError(
                f"cannot open {label} as a PDF ({e}); it is damaged or password-protected: re-save or decrypt it"
            ) from e
        try:
            count = len(document)
            if count == 0:
                raise PDFError(f"{label} has no pages")
            numbers = list(range(1, count + 1)) if choose_pages is None else list(choose_pages(count))
            if len(numbers) > max_pages:
                raise PDFPageLimitError(
                    f"{len(numbers)} pages asked of {label} ({count} pages), at most {max_pages}",
                    asked=len(numbers),
                    page_count=count,
                    max_pages=max_pages,
                )
            return [_render_page(document, n, count, dpi, max_page_pixels, label) for n in numbers]
        finally:
            document.close()


def _render_page(document: Any, number: int, count: int, dpi: float, max_pixels: int, label: str) -> RenderedPage:
    import pypdfium2 as pdfium

    page = bitmap = None
    try:
        page = document[number - 1]
        width_pt, height_pt = page.get_size()
        try:
            scale = page_scale(width_pt, height_pt, dpi, max_pixels)
        except PDFError as e:
            raise PDFError(f"cannot render page {number} of {label}: {e}") from e
        bitmap = page.render(scale=scale, fill_color=(255, 255, 255, 255))
        image = bitmap.to_pil().convert("RGB")  # a copy: the bitmap's buffer is freed below
    except pdfium.PdfiumError as e:
        raise PDFError(f"cannot render page {number} of {label} ({e})") from e
    finally:
        if bitmap is not None:
            bitmap.close()
        if page is not None:
            page.close()
    return RenderedPage(image=image, number=number, page_count=count, dpi=scale * 72.0)
