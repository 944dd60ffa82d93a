"""PDF content blocks have the document tools' limits (bytes, pages, pixels per page), and one
renderer serves both, safe when threads render at once (PDFium itself is not thread-safe)."""

from __future__ import annotations

import asyncio
import io
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from langchain_core.messages import HumanMessage
from lc_inputs import b64, pdf_bytes, random_image

from nvlm_langchain.messages import ContentOptions, UnsupportedContentError, to_engine_messages

pdfium = pytest.importorskip("pypdfium2")

SECRET = b"SECRET-TOKEN=hunter2-do-not-leak\n" * 20


def pdf_block(source: str | bytes) -> dict:
    if isinstance(source, bytes):
        return {"type": "file", "base64": b64(source), "mime_type": "application/pdf"}
    return {"type": "file", "url": source, "mime_type": "application/pdf"}


def pages_of(block: dict, options: ContentOptions = ContentOptions()) -> list:
    (turn,) = to_engine_messages([HumanMessage([block, {"type": "text", "text": "Read it."}])], options).turns
    return [p["image"] for p in turn["content"] if p["type"] == "image"]


def blank_pdf(*sizes_pt: tuple[float, float]) -> bytes:
    """A PDF of empty pages of the given sizes in points: a few hundred bytes, however large the pages."""
    document = pdfium.PdfDocument.new()
    for width, height in sizes_pt:
        document.new_page(width, height).close()
    buffer = io.BytesIO()
    document.save(buffer)
    document.close()
    return buffer.getvalue()


def text_pdf(seed: int, pages: int = 3) -> bytes:
    """A PDF of text pages in a standard font: text rendering is where concurrent PDFium calls crash."""
    import ctypes

    import pypdfium2.raw as raw

    document = pdfium.PdfDocument.new()
    for number in range(pages):
        page = document.new_page(300, 400)
        for line in range(20):
            text = raw.FPDFPageObj_NewTextObj(document.raw, b"Helvetica", 10.0)
            words = f"document {seed}, page {number}, line {line}: the quick brown fox".encode("utf-16-le") + b"\0\0"
            raw.FPDFText_SetText(text, ctypes.cast(ctypes.c_char_p(words), ctypes.POINTER(raw.FPDF_WCHAR)))
            raw.FPDFPageObj_Transform(text, 1, 0, 0, 1, 10, 380 - 18 * line)
            raw.FPDFPage_InsertObject(page.raw, text)
        raw.FPDFPage_GenerateContent(page.raw)
        page.close()
    buffer = io.BytesIO()
    document.save(buffer)
    document.close()
    return buffer.getvalue()


def sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)  # no real bytes on disk, and reading it would still allocate `size`
    return path


@pytest.mark.parametrize("size", [1_100_000_000, 5_000_000_000])
def test_a_huge_pdf_file_is_refused_by_size_before_reading(tmp_path: Path, size: int) -> None:
    path = sparse_file(tmp_path / "x.pdf", size)
    for source in (str(path), path.as_uri()):
        tracemalloc.start()
        started = time.perf_counter()
        try:
            with pytest.raises(UnsupportedContentError, match="pdf_max_bytes") as raised:
                pages_of(pdf_block(source))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert time.perf_counter() - started < 2.0
        assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB allocated: the file was read"
        assert "message 0" in str(raised.value)


def test_inline_pdfs_over_the_byte_limit_are_refused() -> None:
    data = pdf_bytes(random_image(60, 80, 1))
    options = ContentOptions(pdf_max_bytes=len(data) - 1)
    for block in (pdf_block(data), pdf_block(f"data:application/pdf;base64,{b64(data)}")):
        with pytest.raises(UnsupportedContentError, match="pdf_max_bytes"):
            pages_of(block, options)
    assert len(pages_of(pdf_block(data), ContentOptions(pdf_max_bytes=len(data)))) == 1


def test_one_huge_page_renders_within_the_pixel_budget() -> None:
    from nvlm_langchain import pdf

    data = blank_pdf((7200, 7200))  # 100 x 100 inches: 14400 x 14400 px (207 MP) at 144 dpi
    assert len(data) < 1000
    started = time.perf_counter()
    (page,) = pages_of(pdf_block(data))
    assert time.perf_counter() - started < 10.0
    assert page.width * page.height <= pdf.DEFAULT_MAX_PAGE_PIXELS
    assert page.width * page.height > 0.95 * pdf.DEFAULT_MAX_PAGE_PIXELS and page.width == page.height
    (small,) = pages_of(pdf_block(data), ContentOptions(pdf_max_page_pixels=1_000_000))
    assert small.width * small.height <= 1_000_000
    # The largest page PDF allows, and a long thin one: still within the budget.
    for size in [(14400, 14400), (14400, 3), (3, 14400)]:
        (page,) = pages_of(pdf_block(blank_pdf(size)), ContentOptions(pdf_max_page_pixels=2_000_000))
        assert 0 < page.width * page.height <= 2_000_000, (size, page.size)


def test_ordinary_pages_render_at_the_asked_dpi() -> None:
    (page,) = pages_of(pdf_block(blank_pdf((612, 792))))
    assert page.size == (1224, 1584)  # US Letter at 144 dpi: 2 px per point
    (page,) = pages_of(pdf_block(blank_pdf((612, 792))), ContentOptions(pdf_dpi=72))
    assert page.size == (612, 792)


def test_too_many_pages_are_refused() -> None:
    data = blank_pdf(*[(100, 100)] * 9)
    with pytest.raises(UnsupportedContentError, match="9 pages.*at most 8.*pdf_max_pages"):
        pages_of(pdf_block(data))
    assert len(pages_of(pdf_block(data), ContentOptions(pdf_max_pages=9))) == 9


def test_pdf_errors_do_not_quote_the_file(tmp_path: Path) -> None:
    from nvlm_langchain import pdf

    fake = tmp_path / "fake.pdf"
    fake.write_bytes(SECRET)
    for block in (pdf_block(str(fake)), pdf_block(SECRET), pdf_block(b"%PDF-1.7\n" + SECRET)):
        with pytest.raises(UnsupportedContentError) as raised:
            pages_of(block)
        assert "SECRET" not in str(raised.value) and "hunter2" not in str(raised.value)
        assert isinstance(raised.value.__cause__, pdf.PDFError)


def test_messages_and_tools_render_the_same_pixels() -> None:
    from nvlm_langchain.tools import load_pages

    data = pdf_bytes(random_image(60, 80, 1), random_image(80, 60, 2))
    ours = pages_of(pdf_block(data))
    tools = [p.image for p in load_pages(data)]
    assert [a.tobytes() for a in ours] == [b.tobytes() for b in tools]
    huge = blank_pdf((7200, 7200))
    assert pages_of(pdf_block(huge))[0].size == load_pages(huge)[0].image.size


def test_threads_render_at_once_through_messages_and_tools() -> None:
    """8 threads (4 converting ChatNVLM messages, 4 in the tools' loader) render together."""
    from nvlm_langchain.tools import load_pages

    documents = [text_pdf(seed) for seed in range(8)]
    expected = [[page.tobytes() for page in pages_of(pdf_block(d))] for d in documents]
    assert len({tuple(e) for e in expected}) == 8 and all(len(set(page)) > 1 for page in expected[0])  # distinct, not blank
    barrier = threading.Barrier(8)

    def render(i: int) -> list[bytes]:
        barrier.wait()
        out = []
        for _ in range(12):  # without a lock this crashed the process (SIGSEGV/SIGABRT) in 2 of 3 runs of 3
            if i % 2:
                out = [page.image.tobytes() for page in load_pages(documents[i])]
            else:
                out = [page.tobytes() for page in pages_of(pdf_block(documents[i]))]
        return out

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(render, range(8)))
    assert results == expected


def test_tasks_render_at_once_in_executor_threads() -> None:
    documents = [text_pdf(seed, pages=2) for seed in range(8)]

    async def run() -> list[list]:
        return await asyncio.gather(*(asyncio.to_thread(pages_of, pdf_block(d)) for d in documents * 4))

    results = asyncio.run(run())
    assert [[p.tobytes() for p in pages] for pages in results] == [
        [p.tobytes() for p in pages_of(pdf_block(d))] for d in documents * 4
    ]


def test_chat_nvlm_refuses_a_huge_pdf_quickly(chat, tmp_path: Path) -> None:
    path = sparse_file(tmp_path / "x.pdf", 5_000_000_000)
    started = time.perf_counter()
    with pytest.raises(ValueError, match="pdf_max_bytes"):
        chat.invoke([HumanMessage([pdf_block(str(path)), {"type": "text", "text": "Summarize."}])])
    assert time.perf_counter() - started < 5.0
