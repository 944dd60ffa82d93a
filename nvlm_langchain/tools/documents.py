"""Turn what a tool caller passes as `image` (and `pages`) into upright RGB page images.

Knows the sources an agent can name (a path, a `file://`, `data:` or http(s) URL, base64 of
the file) and the two kinds of file behind them: images, decoded by `nvlm_engine.load_image`
(EXIF orientation applied, so every box is in the orientation a viewer shows), and PDFs,
rendered by `nvlm_langchain.pdf` (pypdfium2, the renderer ChatNVLM's PDF blocks use) at `dpi`
dots per inch with the page's own /Rotate applied. A source a tool caller chose goes through
the tool's `FilePolicy` first (`file_policy.py`). Knows nothing of models or prompts. Every
failure is a `DocumentInputError` (a LangChain `ToolException`) that says what to change and
never quotes a file's bytes.
"""

from __future__ import annotations

import base64
import io
import os
import re
from dataclasses import dataclass

from PIL import Image

from nvlm_engine import ImageError, load_image
from nvlm_engine.images import DEFAULT_MAX_PIXELS, ImageSource
from nvlm_engine.images import read_source as read_image_source  # same limits, SSRF policy and messages

from ..pdf import (
    DEFAULT_DPI,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PAGE_PIXELS,
    DEFAULT_MAX_PAGES,
    PDFError,
    PDFPageLimitError,
    render_pdf,
)
from .errors import DocumentInputError
from .file_policy import FilePolicy

__all__ = [
    "DEFAULT_DPI",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PAGES",
    "DEFAULT_MAX_PAGE_PIXELS",
    "PageImage",
    "encode_png_base64",
    "load_pages",
    "parse_page_spec",
]

# DEFAULT_DPI (144: 2 pixels per PDF point, so pixel boxes convert to points by halving) and
# the limits are nvlm_langchain.pdf's, shared with ChatNVLM's PDF blocks.
_PDF_MAGIC = b"%PDF-"


@dataclass(frozen=True)
class PageImage:
    """One image the model will look at.

    Attributes:
        image: upright RGB image (EXIF orientation applied; PDF pages rendered).
        page: 1-based PDF page number, None for an image file.
        page_count: pages in the PDF, None for an image file.
        dpi: the resolution a PDF page was rendered at (pixels = points * dpi / 72), None
            for an image file. Lower than asked when the page would exceed the pixel limit.
    """

    image: Image.Image
    page: int | None = None
    page_count: int | None = None
    dpi: float | None = None

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

    @property
    def label(self) -> str:
        return "the image" if self.page is None else f"page {self.page} of {self.page_count}"


PageSpec = int | str | None


def load_pages(
    source: ImageSource,
    pages: PageSpec = None,
    *,
    dpi: float = DEFAULT_DPI,
    max_pages: int = DEFAULT_MAX_PAGES,
    allow_url_fetch: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_page_pixels: int = DEFAULT_MAX_PAGE_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    policy: FilePolicy | None = None,
) -> list[PageImage]:
    """Read an image or the requested pages of a PDF.

    Args:
        source: a path, `file://` / `data:` / http(s) URL, base64 text, bytes or PIL image.
        pages: for PDFs, which pages (see `parse_page_spec`); None means all of them. For an
            image only None or 1 is accepted.
        dpi: PDF rendering resolution.
        max_pages: the most pages one call may render.
        allow_url_fetch: fetch http(s) URLs (off by default: text from a model must not make
            the process open connections unless the application allows it).
        max_pixels: the most pixels per image (a larger one is refused) or rendered page.
        max_page_pixels: the pixel budget of a rendered PDF page: a page that would exceed it
            (or `max_pixels`) at `dpi` is rendered at a lower dpi that fits, and its `dpi` says so.
        max_bytes: the most bytes of the file (a file is measured before it is read).
        policy: the file rules for an untrusted source (a tool argument the calling model
            wrote: see `FilePolicy`), applied before anything is opened; None when the source
            is the application's own, which may name any file.

    Returns:
        The pages in the order asked.

    Raises:
        DocumentInputError: unreadable, missing or refused source, not an image or PDF, page
            out of range, too many pages.
    """
    label = describe_source(source)
    if policy is not None and isinstance(source, (str, os.PathLike)):
        source = policy.admit(os.fsdecode(source))
        if isinstance(source, bytes) and not label.startswith("the base64"):
            label += " (read as base64)"
    if isinstance(source, Image.Image):
        data: ImageSource = source
    else:
        try:
            data, _ = read_image_source(
                source, allow_url_fetch=allow_url_fetch, max_bytes=max_bytes, fetch_timeout_s=10.0
            )
        except ImageError as e:
            raise DocumentInputError(f"cannot read {label}: {e}") from e
        if _PDF_MAGIC in data[:1024]:  # PDF readers accept the header anywhere in the first 1 KiB
            return _render_pdf(
                data, pages, label=label, dpi=dpi, max_pages=max_pages, max_pixels=min(max_pixels, max_page_pixels)
            )
    if not _single(pages):
        raise DocumentInputError(f"pages={pages!r} was given but {label} is an image, not a PDF; leave pages empty")
    return [PageImage(_load_image(data, label, max_pixels))]


def parse_page_spec(spec: PageSpec, page_count: int) -> list[int]:
    """Page numbers (1-based, in the order given, without repeats) from a page spec.

    Accepted: None, "" or "all" (every page); an int; "3"; "2-4"; "1,3,5"; "1-2, 7";
    open ranges "3-" (to the end) and "-2" (from the start); "last".

    Raises:
        DocumentInputError: malformed spec, a reversed range, or a page outside 1..page_count.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return list(range(1, page_count + 1))
    text = str(spec).strip().lower().replace("last", str(page_count))
    numbers: list[int] = []
    for part in re.split(r"\s*[,;]\s*|\s+and\s+", text):
        match = re.fullmatch(r"(?:pages?\s*)?(\d*)\s*(?:(-|\u2013|to|\.\.)\s*(\d*))?", part.strip())
        if not part.strip() or match is None or not (match[1] or match[3]):
            raise DocumentInputError(
                f"cannot read pages={spec!r}: use a page number ('2'), a range ('1-3') or a list ('1,3,5'); "
                "pages are numbered from 1"
            )
        first = int(match[1]) if match[1] else 1
        last = (int(match[3]) if match[3] else page_count) if match[2] else first
        if first > last:
            raise DocumentInputError(f"pages={spec!r} has a reversed range {first}-{last}; write {last}-{first}")
        for number in (first, last):
            if not 1 <= number <= page_count:
                raise DocumentInputError(
                    f"page {number} is out of range: the PDF has {page_count} page"
                    f"{'s' if page_count != 1 else ''} (1-{page_count}); pages are numbered from 1"
                )
        numbers.extend(n for n in range(first, last + 1) if n not in numbers)
    return numbers


def encode_png_base64(image: Image.Image) -> str:
    """PNG-encode an image as base64 text: lossless, so the model sees the decoded pixels exactly."""
    buffer = io.BytesIO()
    # compress_level 1: a 12 MP photo encodes in a fraction of the default's time, and the
    # bytes only travel in memory or over a local link.
    image.save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def describe_source(source: object) -> str:
    """A short name for a source, for messages (never the whole base64 payload)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"the given bytes ({len(source)} bytes)"
    if isinstance(source, Image.Image):
        return f"the {source.width}x{source.height} PIL image"
    if isinstance(source, os.PathLike):
        return f"file {os.fspath(source)!r}"
    if isinstance(source, str):
        head = source.lstrip()[:16].lower()
        if head.startswith("data:"):
            return f"the data URL ({source.strip()[:40]}..., {len(source)} chars)"
        # Decided without looking at the disk: a label must not tell whether a file exists.
        if head.startswith(("http://", "https://", "file:")) or len(source) < 300:
            return repr(source.strip()) if len(source) < 300 else repr(source[:300] + "...")
        return f"the base64 text ({len(source)} chars)"
    return f"a {type(source).__name__}"


def _single(pages: PageSpec) -> bool:
    return pages is None or str(pages).strip().lower() in ("", "1", "all", "last", "1-1")


def _load_image(source: ImageSource, label: str, max_pixels: int) -> Image.Image:
    try:
        return load_image(source, max_pixels=max_pixels)
    except ImageError as e:
        if isinstance(e.__cause__, Image.UnidentifiedImageError):
            # Say only that it is no image: a tool caller must never see a file's first bytes,
            # whatever the engine's message holds (it used to quote them).
            raise DocumentInputError(
                f"cannot read {label} as an image or PDF: not an image format Pillow can read; "
                "pass a PNG, JPEG, WebP, TIFF or PDF file"
            ) from e
        raise DocumentInputError(f"cannot read {label} as an image or PDF: {e}") from e


def _render_pdf(
    data: bytes, pages: PageSpec, *, label: str, dpi: float, max_pages: int, max_pixels: int
) -> list[PageImage]:
    try:
        rendered = render_pdf(
            data,
            lambda count: parse_page_spec(pages, count),
            dpi=dpi,
            max_pages=max_pages,
            max_page_pixels=max_pixels,
            label=label,
        )
    except ImportError as e:  # an optional dependency: images work without it
        raise DocumentInputError(
            f"{label} is a PDF, and reading PDFs needs pypdfium2: pip install 'pypdfium2>=4.30'"
        ) from e
    except PDFPageLimitError as e:
        raise DocumentInputError(
            f"{e.asked} pages asked of {label} ({e.page_count} pages), at most {e.max_pages} per call; pass a "
            f"smaller range such as pages='1-{min(e.max_pages, e.page_count)}' and call again for the rest"
        ) from e
    except PDFError as e:
        raise DocumentInputError(str(e)) from e
    return [PageImage(image=p.image, page=p.number, page_count=p.page_count, dpi=p.dpi) for p in rendered]
