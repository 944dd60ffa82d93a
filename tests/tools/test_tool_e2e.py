"""Each tool end to end through ChatNVLM on the tiny random checkpoint: a multi-page PDF made
in the test, a 4000x3000 photo, sync and async, the toolkit loading the checkpoint itself.

Random weights answer noise, so a tool's result is either a parsed artifact or a
`ModelOutputError` quoting the answer. Either way the raw text the tool reports must be exactly
what ChatNVLM answers, asked directly with the documented message (image block, then prompt):
that pins down the image the tool rendered, the prompt and the message format.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import HumanMessage, ToolMessage

from nvlm_langchain.tools import (
    ChartResult,
    ChartTool,
    LocateResult,
    LocateTool,
    ModelOutputError,
    NVLMDocumentToolkit,
    OCRResult,
    OCRTool,
    load_pages,
)
from nvlm_langchain.tools.documents import encode_png_base64
from nvlm_langchain.tools.ocr import GROUNDED_OCR_PROMPT, PLAIN_OCR_PROMPT
from nvlm_langchain.tools.samples import InvoiceDocument

pytestmark = pytest.mark.slow


def call(tool, **args: Any) -> ToolMessage:
    return tool.invoke({"type": "tool_call", "id": "call-e2e", "name": tool.name, "args": args})


def ask_directly(llm: Any, source: Any, prompt: str, page: int | None = None) -> str:
    """What ChatNVLM answers for this page and prompt, asked without the tool."""
    (image,) = load_pages(source, page)
    message = HumanMessage(
        content=[
            {"type": "image", "base64": encode_png_base64(image.image), "mime_type": "image/png"},
            {"type": "text", "text": prompt},
        ]
    )
    return llm.invoke([message]).text


def test_ocr_reads_every_page_of_a_pdf(chat_nvlm, invoice_pdf: InvoiceDocument) -> None:
    message = call(OCRTool(llm=chat_nvlm, root_dir=invoice_pdf.path.parent), image=str(invoice_pdf.path))
    assert message.status == "success"
    result: OCRResult = message.artifact
    assert [p.page.page for p in result.pages] == [1, 2, 3]
    assert all((p.page.width, p.page.height, p.page.dpi) == (1224, 1584, 144.0) for p in result.pages)
    assert result.pages[1].raw_text == ask_directly(chat_nvlm, str(invoice_pdf.path), PLAIN_OCR_PROMPT, 2)
    assert "[page 3 of 3, 1224x1584 px]" in message.content


def test_grounded_ocr_gives_spans_or_quotes_the_answer(chat_nvlm, invoice_pdf: InvoiceDocument) -> None:
    tool = OCRTool(llm=chat_nvlm, handle_tool_error=False, root_dir=invoice_pdf.path.parent)
    expected = ask_directly(chat_nvlm, str(invoice_pdf.path), GROUNDED_OCR_PROMPT, 1)
    try:
        result: OCRResult = tool.invoke({"image": str(invoice_pdf.path), "pages": "1", "grounded": True})
    except ModelOutputError as e:
        assert e.raw_outputs == [expected] and expected in str(e)
    else:
        # tool.invoke without a tool call returns the content only; ask again for the artifact.
        tool = OCRTool(llm=chat_nvlm, root_dir=invoice_pdf.path.parent)
        result = call(tool, image=str(invoice_pdf.path), pages=1, grounded=True).artifact
        assert result.pages[0].raw_text == expected
        assert all(
            0 <= s.box[0] <= s.box[2] <= 1224 and 0 <= s.box[1] <= s.box[3] <= 1584 for s in result.pages[0].spans
        )


def test_chart_table_and_answer(chat_nvlm, chart_png: Path) -> None:
    tool = ChartTool(llm=chat_nvlm, root_dir=chart_png.parent)
    message = call(tool, image=str(chart_png), question="Which quarter had the highest revenue?")
    assert message.status == "success"  # with a question, an unreadable table is reported, not fatal
    result: ChartResult = message.artifact
    (page,) = result.pages
    assert (page.page.width, page.page.height) == (800, 600)
    assert page.raw_table_text == ask_directly(chat_nvlm, str(chart_png), tool.table_prompt)
    assert page.answer == page.raw_answer_text.strip()
    assert (page.table is None) == (page.csv is None)
    assert f"Answer: {page.answer}" in message.content


def test_locate_on_a_4000x3000_photo(chat_nvlm, large_jpeg: Path) -> None:
    message = call(
        LocateTool(llm=chat_nvlm, annotate=True, root_dir=large_jpeg.parent),
        image=str(large_jpeg),
        query="the dark square",
        target="object",
    )
    expected = ask_directly(
        chat_nvlm,
        str(large_jpeg),
        "Please provide the bounding box coordinate of the region this sentence describes: <ref>the dark square</ref>",
    )
    if message.status == "error":
        assert "no box for 'the dark square'" in message.content and expected in message.content
    else:
        result: LocateResult = message.artifact
        (page,) = result.pages
        assert (page.page.width, page.page.height) == (4000, 3000) and page.raw_text == expected
        assert all(0 <= b.box[0] <= b.box[2] <= 4000 and 0 <= b.box[1] <= b.box[3] <= 3000 for b in page.boxes)
        assert page.annotated_image().size == (4000, 3000)


def test_ocr_and_chart_on_the_4000x3000_photo(chat_nvlm, large_jpeg: Path) -> None:
    ocr = call(OCRTool(llm=chat_nvlm, root_dir=large_jpeg.parent), image=str(large_jpeg))
    assert ocr.status == "success"
    assert (ocr.artifact.pages[0].page.width, ocr.artifact.pages[0].page.height) == (4000, 3000)
    chart = ChartTool(llm=chat_nvlm, root_dir=large_jpeg.parent)
    chart = call(chart, image=str(large_jpeg), question="How many squares?", extract_table=False)
    assert chart.status == "success" and chart.artifact.pages[0].answer is not None


def test_async_tools_on_pdf_pages(chat_nvlm, invoice_pdf: InvoiceDocument) -> None:
    chart = ChartTool(llm=chat_nvlm, root_dir=invoice_pdf.path.parent)
    locate = LocateTool(llm=chat_nvlm, root_dir=invoice_pdf.path.parent)

    async def run() -> tuple[ToolMessage, ToolMessage]:
        first = await chart.ainvoke(
            {
                "type": "tool_call",
                "id": "a1",
                "name": chart.name,
                "args": {
                    "image": str(invoice_pdf.path),
                    "pages": "3",
                    "question": "What is the total due?",
                    "extract_table": False,
                },
            }
        )
        second = await locate.ainvoke(
            {
                "type": "tool_call",
                "id": "a2",
                "name": locate.name,
                "args": {"image": str(invoice_pdf.path), "pages": "2-3", "query": "Total due"},
            }
        )
        return first, second

    answer, located = asyncio.run(run())
    assert answer.status == "success" and answer.artifact.pages[0].page.page == 3
    assert (
        answer.artifact.pages[0].answer
        == ask_directly(
            chat_nvlm,
            str(invoice_pdf.path),
            "What is the total due?\nAnswer the question using a single word or phrase.",
            3,
        ).strip()
    )
    if located.status == "error":
        assert "--- page 2 of 3 ---" in located.content and "--- page 3 of 3 ---" in located.content
    else:
        assert [p.page.page for p in located.artifact.pages] == [2, 3]


def test_page_out_of_range_never_reaches_the_model(chat_nvlm, invoice_pdf: InvoiceDocument) -> None:
    message = call(OCRTool(llm=chat_nvlm, root_dir=invoice_pdf.path.parent), image=str(invoice_pdf.path), pages="4")
    assert message.status == "error" and message.content.startswith("page 4 is out of range: the PDF has 3 pages")


def test_toolkit_from_checkpoint_shares_one_model(tiny_checkpoint: Path, chart_png: Path) -> None:
    pytest.importorskip("nvlm_langchain.chat_models", reason="nvlm_langchain.chat_models (ChatNVLM) is not there yet")
    toolkit = NVLMDocumentToolkit.from_checkpoint(
        tiny_checkpoint, device_map="cpu", dtype="float32", max_tokens=4, toolkit_options={"document": str(chart_png)}
    )
    tools = toolkit.get_tools()
    assert len({id(t.llm) for t in tools}) == 1
    assert "image" not in tools[1].tool_call_schema.model_json_schema()["properties"]
    message = call(tools[1], question="Which quarter is highest?", extract_table=False)
    assert message.status == "success" and message.artifact.pages[0].page.width == 800
