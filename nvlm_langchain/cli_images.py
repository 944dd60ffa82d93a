"""Images named on `nvlm-chat`'s command line or with `/image`: parsed, then checked before use.

`parse_image_ref("scan.pdf#2")` reads the name only (a path that exists, or an http(s) URL, with
an optional `#PAGE` for PDFs): cheap, done while the flags are parsed. `check_image(ref)` does
what the model would do with it: decodes the image (a PDF page: renders it) and tiles it, so a
text file, a broken PNG or a page out of range is refused before the weights load, or at once
when attached with `/image`, never at the next message.

Errors are `ImageRefError`s: one line naming the source and what to do.
Knows nothing of click; imports torch and the PDF renderer only in `check_image`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

__all__ = ["ImageRef", "ImageRefError", "PageConflictError", "apply_page", "check_image", "parse_image_ref"]

PDF_MAGIC = b"%PDF-"


class ImageRefError(ValueError):
    """An image name or file that cannot be used; the message says which and what to do."""


class PageConflictError(ImageRefError):
    """--page contradicts the command line (a page given twice, or --page with no PDF)."""


@dataclass(frozen=True)
class ImageRef:
    """An image source as named: a local file (maybe a PDF and a page of it) or an http(s) URL."""

    label: str  # as the user wrote it
    location: str  # the URL, or the file's absolute path
    page: int | None = None  # the PDF page asked for (None: --page, or 1)
    is_pdf: bool = False

    @property
    def is_url(self) -> bool:
        return self.location.startswith(("http://", "https://"))


def parse_image_ref(text: str) -> ImageRef:
    """The reference in `text`: `path`, `~/path`, `doc.pdf#2`, or an http(s) URL (not fetched here).

    Raises:
        ImageRefError: not a file, a page that is not a number, or #PAGE on a file that is no PDF.
    """
    text = text.strip()
    if not text:
        raise ImageRefError("no image given: name a file (photo.png, scan.pdf#2) or an http(s) URL")
    if text.startswith(("http://", "https://")):
        return ImageRef(text, text)
    path, page_text = Path(text).expanduser(), ""
    if not path.is_file() and "#" in text:
        base, _, page_text = text.rpartition("#")
        path = Path(base).expanduser()
    if not path.is_file():
        what = "a folder, not a file" if path.is_dir() else "not a file"
        raise ImageRefError(f"{str(path)!r} is {what}; check the path")
    is_pdf = _looks_like_pdf(path)
    if page_text:
        if not page_text.isdigit() or int(page_text) < 1:
            raise ImageRefError(f"page {page_text!r} in {text!r} is not a page number; write file.pdf#2")
        if not is_pdf:
            raise ImageRefError(f"{text!r}: #{page_text} picks a PDF page, but {path.name} is not a PDF; "
                                f"drop #{page_text}")
    return ImageRef(text, str(path.resolve()), int(page_text) if page_text else None, is_pdf)


def apply_page(refs: Sequence[ImageRef], page: int | None) -> list[ImageRef]:
    """`--page N` applied to the PDFs that name no page of their own.

    Raises:
        PageConflictError: --page with no PDF among `refs`, or a PDF whose #PAGE differs from it.
    """
    if page is None:
        return list(refs)
    pdfs = [ref for ref in refs if ref.is_pdf]
    if not pdfs:
        names = ", ".join(ref.label for ref in refs) or "no -i at all"
        raise PageConflictError(f"--page {page} picks a PDF page, but no PDF was given ({names}); drop --page")
    for ref in pdfs:
        if ref.page is not None and ref.page != page:
            raise PageConflictError(f"{ref.label} names page {ref.page} but --page says {page}; give the page once")
    return [replace(ref, page=page) if ref.is_pdf and ref.page is None else ref for ref in refs]


def check_image(ref: ImageRef, *, max_tiles: int | None = None, allow_urls: bool = False) -> dict[str, Any]:
    """Decode and tile the image (render a PDF page) as the model will; its LangChain image block.

    A local image stays a path in the block (the model reads it again, unchanged); a PDF page
    and a fetched URL become base64 PNG, so the page is rendered and the URL fetched once.

    Raises:
        ImageRefError: an URL without `allow_urls`, a file that is no image or PDF, a broken or
            oversized image, a PDF page out of range.
    """
    from nvlm_engine import NVLMError, load_image, preprocess_image

    from .tools.documents import encode_png_base64, load_pages
    from .tools.errors import DocumentInputError

    if ref.is_url and not allow_urls:
        raise ImageRefError(f"{ref.label}: image URLs are off; pass --allow-urls to fetch them")
    try:
        if ref.is_pdf:
            image = load_pages(Path(ref.location), pages=ref.page or 1)[0].image
        else:
            image = load_image(ref.location, allow_url_fetch=ref.is_url)
        preprocess_image(image, max_tiles=max_tiles or 6)
    except (NVLMError, DocumentInputError, OSError, ValueError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ImageRefError(f"{ref.label} cannot be used: {message}") from e
    if ref.is_pdf or ref.is_url:
        return {"type": "image", "base64": encode_png_base64(image), "mime_type": "image/png"}
    return {"type": "image", "url": ref.location}


def _looks_like_pdf(path: Path) -> bool:
    """A `.pdf` name, or the PDF header within the first KiB (PDF readers accept it there)."""
    if path.suffix.lower() == ".pdf":
        return True
    try:
        with path.open("rb") as file:
            return PDF_MAGIC in file.read(1024)
    except OSError:
        return False
