"""The three tools and the toolkit against a scripted chat model (the package boundary):
prompts and message format, content and artifact, errors quoting the raw answer, async."""

from __future__ import annotations

import asyncio
import base64
import io
import re
from pathlib import Path

import pytest
from langchain_core.messages import ToolMessage
from langchain_core.tools import ToolException
from PIL import Image
from tool_fakes import prompt_of

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
    to_model_coords,
)
from nvlm_langchain.tools.coords import format_box
from nvlm_langchain.tools.samples import InvoiceDocument


def call(tool, **args) -> ToolMessage:
    return tool.invoke({"type": "tool_call", "id": "call-1", "name": tool.name, "args": args})


# --- OCR ---------------------------------------------------------------------------------


def test_ocr_plain_sends_image_then_prompt_and_returns_text(recording, chart_png: Path) -> None:
    llm = recording(["Revenue by quarter (USD k)\n120 135.5 98 160.25\nQ1 Q2 Q3 Q4"])
    message = call(OCRTool(llm=llm, root_dir=chart_png.parent), image=str(chart_png))
    assert message.status == "success"
    (sent,) = llm.calls
    (human,) = sent
    assert [b["type"] for b in human.content] == ["image", "text"]
    assert prompt_of(human) == "Transcribe the document as plain text."
    assert llm.sent_images()[0].size == (800, 600)
    assert message.content == "Revenue by quarter (USD k)\n120 135.5 98 160.25\nQ1 Q2 Q3 Q4"
    result = message.artifact
    assert isinstance(result, OCRResult) and result.mode == "plain" and result.pages[0].spans is None
    assert result.pages[0].raw_text == llm.answers[0]


def test_ocr_grounded_on_pdf_pages_gives_pixel_spans(recording, invoice_pdf: InvoiceDocument) -> None:
    answers = {
        1: "<ref>INVOICE</ref><box>(59,51),(173,68)</box>\n"
        "<ref>Invoice No. INV-2024-0417</ref><box>(58,96),(305,108)</box>",
        3: "<ref>Total due: 2,569.32 USD</ref><box>(58,190),(402,210)</box>\n<ref>Tax (8%): 190.32",  # cut off
    }
    order = iter([1, 3])
    llm = recording(lambda prompt: answers[next(order)])
    tool = OCRTool(llm=llm, root_dir=invoice_pdf.path.parent)
    message = call(tool, image=str(invoice_pdf.path), pages="1,3", grounded=True)
    assert all(
        prompt_of(c[-1]) == "Extract all texts and their bounding boxes from the given image using grounded OCR."
        for c in llm.calls
    )
    result: OCRResult = message.artifact
    assert result.mode == "grounded" and [p.page.page for p in result.pages] == [1, 3]
    first = result.pages[0]
    assert first.text == "INVOICE\nInvoice No. INV-2024-0417"
    w, h = first.page.width, first.page.height
    assert first.spans[0].box == (
        round(59 * w / 1000),
        round(51 * h / 1000),
        round(173 * w / 1000),
        round(68 * h / 1000),
    )
    # The drawn "INVOICE" heading is where the box says, within the grid's resolution.
    page, truth = invoice_pdf.boxes["INVOICE"]
    assert page == 1 and all(abs(a - b) <= 3 for a, b in zip(first.spans[0].box, truth, strict=True))
    last = result.pages[1]
    assert [s.label for s in last.spans] == ["Total due: 2,569.32 USD"]
    assert last.issues and "no box after it" in last.issues[0]
    assert "[page 3 of 3" in message.content and "Total due: 2,569.32 USD\t[" in message.content


def test_ocr_grounded_without_any_box_is_an_error_quoting_the_answer(recording, chart_png: Path) -> None:
    llm = recording(["Revenue by quarter (USD k) Q1 Q2 Q3 Q4"])
    message = call(OCRTool(llm=llm, root_dir=chart_png.parent), image=str(chart_png), grounded=True)
    assert message.status == "error"
    assert "no text box could be read" in message.content
    assert "Revenue by quarter (USD k) Q1 Q2 Q3 Q4" in message.content
    assert "grounded=false" in message.content
    with pytest.raises(ModelOutputError) as raised:
        OCRTool(llm=recording(["plain words"]), handle_tool_error=False, root_dir=chart_png.parent).invoke(
            {"image": str(chart_png), "grounded": True}
        )
    assert raised.value.raw_outputs == ["plain words"]


def test_ocr_region_returns_the_region_as_span(recording, chart_png: Path) -> None:
    tool = OCRTool(llm=recording(["160.25"]), root_dir=chart_png.parent)
    message = call(tool, image=str(chart_png), region=[620, 80, 718, 100])
    result: OCRResult = message.artifact
    assert result.mode == "region"
    (span,) = result.pages[0].spans
    assert span.label == "160.25" and span.box == (620, 80, 718, 100)


@pytest.mark.parametrize(
    ("region", "message"),
    [
        ([0, 0, 900, 10], "not inside the image \\(800x600 px\\)"),
        ([5, 5, 5, 9], "need 0 <= x1 < x2"),
        ([1, 2, 3], "region: List should have at least 4 items"),
    ],
)
def test_ocr_bad_region(recording, chart_png: Path, region: list[int], message: str) -> None:
    result = call(OCRTool(llm=recording(["x"]), root_dir=chart_png.parent), image=str(chart_png), region=region)
    assert result.status == "error"
    assert re.search(message, result.content), result.content


def test_long_text_is_clipped_for_the_model_but_whole_in_the_artifact(recording, chart_png: Path) -> None:
    text = "word " * 2000
    tool = OCRTool(llm=recording([text]), max_content_chars=500, root_dir=chart_png.parent)
    message = call(tool, image=str(chart_png))
    assert len(message.content) < 600 and "more characters in the tool's artifact" in message.content
    assert message.artifact.pages[0].text == text.strip()


# --- chart -------------------------------------------------------------------------------

TABLE_ANSWER = "| Quarter | Revenue (USD k) |\n|---|---|\n| Q1 | 120 |\n| Q2 | 135.5 |\n| Q3 | 98 |\n| Q4 | 160.25 |"


def test_chart_table_and_question(recording, chart_png: Path) -> None:
    llm = recording(lambda prompt: TABLE_ANSWER if "data table" in prompt else "160.25")
    tool = ChartTool(llm=llm, root_dir=chart_png.parent)
    message = call(tool, image=str(chart_png), question="What is the highest revenue?")
    assert [prompt_of(c[-1]) for c in llm.calls] == [
        "Convert the chart into a data table in markdown format. Use the first row for the column headers "
        "and write units in the headers, for example 'Revenue (USD)'.",
        "What is the highest revenue?\nAnswer the question using a single word or phrase.",
    ]
    result: ChartResult = message.artifact
    (page,) = result.pages
    assert page.table.columns == ["Quarter", "Revenue"] and page.table.units == [None, "USD k"]
    assert page.table.rows == [["Q1", 120], ["Q2", 135.5], ["Q3", 98], ["Q4", 160.25]]
    assert page.csv == "Quarter,Revenue (USD k)\nQ1,120\nQ2,135.5\nQ3,98\nQ4,160.25\n"
    assert (page.answer, page.answer_value) == ("160.25", 160.25)
    assert "Quarter,Revenue (USD k)" in message.content and "Answer: 160.25" in message.content
    assert result.model_dump(mode="json")["pages"][0]["table"]["rows"][1] == ["Q2", 135.5]


def test_chart_question_only(recording, chart_png: Path) -> None:
    llm = recording(["Q4"])
    tool = ChartTool(llm=llm, root_dir=chart_png.parent)
    message = call(tool, image=str(chart_png), question="Which quarter is highest?", extract_table=False)
    assert len(llm.calls) == 1 and message.artifact.pages[0].table is None
    assert message.content == "Answer: Q4"


def test_chart_unparseable_table_is_an_error_quoting_the_answer(recording, chart_png: Path) -> None:
    tool = ChartTool(llm=recording(["The chart shows revenue going up."]), root_dir=chart_png.parent)
    message = call(tool, image=str(chart_png))
    assert message.status == "error"
    assert "no data table could be read" in message.content
    assert "--- the image ---\nThe chart shows revenue going up." in message.content


def test_chart_unparseable_table_with_an_answer_keeps_the_answer(recording, chart_png: Path) -> None:
    llm = recording(lambda prompt: "It goes up." if "data table" in prompt else "Q4")
    message = call(ChartTool(llm=llm, root_dir=chart_png.parent), image=str(chart_png), question="Best quarter?")
    assert message.status == "success"
    page = message.artifact.pages[0]
    assert page.table is None and page.raw_table_text == "It goes up." and page.answer == "Q4"
    assert "No table could be read; the model answered: 'It goes up.'" in message.content


def test_chart_with_nothing_to_do(recording, chart_png: Path) -> None:
    tool = ChartTool(llm=recording(["x"]), root_dir=chart_png.parent)
    message = call(tool, image=str(chart_png), extract_table=False)
    assert message.status == "error" and "nothing to do" in message.content


# --- localization ------------------------------------------------------------------------


def test_locate_text_on_a_pdf_gives_pixel_boxes_and_annotation(recording, invoice_pdf: InvoiceDocument) -> None:
    label = f"Total due: {invoice_pdf.total:,.2f} USD"
    page_number, truth = invoice_pdf.boxes[label]
    (rendered,) = load_pages(str(invoice_pdf.path), page_number)
    pages = {}

    def answer(prompt: str) -> str:
        pages.setdefault("n", 0)
        pages["n"] += 1
        if pages["n"] < 3:
            return "The text is not on this page."
        return (
            f"<ref>Total due</ref>{format_box(to_model_coords(truth, rendered.width, rendered.height, integer=True))}"
        )

    llm = recording(answer)
    tool = LocateTool(llm=llm, annotate=True, root_dir=invoice_pdf.path.parent)
    message = call(tool, image=str(invoice_pdf.path), query="Total due")
    assert prompt_of(llm.calls[0][-1]) == 'Locate the text "Total due" in the image.'
    result: LocateResult = message.artifact
    assert [len(p.boxes) for p in result.pages] == [0, 0, 1]
    (located,) = result.pages[2].boxes
    assert located.label == "Total due"
    assert all(abs(a - b) <= 1 for a, b in zip(located.box, truth, strict=True)), (located.box, truth)
    assert result.boxes == [(3, located)]
    annotated = result.pages[2].annotated_image()
    assert annotated.size == (result.pages[2].page.width, result.pages[2].page.height)
    assert result.pages[0].annotated_png_base64 is None
    assert "page 1 of 3: not found" in message.content and f"{list(located.box)}" in message.content


def test_locate_object_prompt_and_quads(recording, chart_png: Path) -> None:
    llm = recording(["<ref>the tallest bar</ref><quad>(775,166),(898,166),(898,875),(775,875)</quad>"])
    tool = LocateTool(llm=llm, root_dir=chart_png.parent)
    message = call(tool, image=str(chart_png), query="the tallest bar", target="object")
    assert prompt_of(llm.calls[0][-1]) == (
        "Please provide the bounding box coordinate of the region this sentence describes: <ref>the tallest bar</ref>"
    )
    (located,) = message.artifact.pages[0].boxes
    assert located.quad == [(620, 100), (718, 100), (718, 525), (620, 525)]
    assert located.box == (620, 100, 718, 525) and len(located.model_coords) == 8


def test_locate_without_any_box_is_an_error_quoting_every_answer(recording, invoice_pdf: InvoiceDocument) -> None:
    llm = recording(["not here", "not here either", "<ref>Total</ref><box>(12,3"])
    message = call(LocateTool(llm=llm, root_dir=invoice_pdf.path.parent), image=str(invoice_pdf.path), query="Total")
    assert message.status == "error"
    for text in (
        "--- page 1 of 3 ---\nnot here",
        "--- page 2 of 3 ---\nnot here either",
        "--- page 3 of 3 ---\n<ref>Total</ref><box>(12,3",
    ):
        assert text in message.content


def test_coordinate_scale_is_configurable(recording, chart_png: Path) -> None:
    llm = recording(["<box>(0.25,0.5),(0.5,1)</box>"])
    message = call(LocateTool(llm=llm, coordinate_scale=1, root_dir=chart_png.parent), image=str(chart_png), query="x")
    assert message.artifact.pages[0].boxes[0].box == (200, 300, 400, 600)


# --- common ------------------------------------------------------------------------------


def test_input_errors_are_tool_errors(recording, invoice_pdf: InvoiceDocument, tmp_path: Path) -> None:
    tool = LocateTool(llm=recording(["x"]), root_dir=invoice_pdf.path.parent)
    cases = {
        "page 7 is out of range: the PDF has 3 pages": {"image": str(invoice_pdf.path), "pages": "7", "query": "x"},
        "nope.png': no such file under": {"image": str(invoice_pdf.path.parent / "nope.png"), "query": "x"},
        "outside the folder this tool may read": {"image": str(tmp_path / "nope.png"), "query": "x"},
        "invalid arguments \\(query: String should have at least 1 character": {"image": "x", "query": ""},
        "invalid arguments \\(target: Input should be 'text' or 'object'": {
            "image": "x",
            "query": "a",
            "target": "face",
        },
    }
    for expected, args in cases.items():
        message = call(tool, **args)
        assert message.status == "error" and re.search(expected, message.content), message.content
    with pytest.raises(ToolException, match="out of range"):
        LocateTool(llm=recording(["x"]), handle_tool_error=False, root_dir=invoice_pdf.path.parent).invoke(
            {"image": str(invoice_pdf.path), "pages": 9, "query": "x"}
        )


def test_async_tools_match_sync(recording, invoice_pdf: InvoiceDocument, chart_png: Path) -> None:
    async def run() -> list[ToolMessage]:
        ocr = OCRTool(llm=recording(["page text"]), root_dir=invoice_pdf.path.parent)
        chart = ChartTool(llm=recording([TABLE_ANSWER]), root_dir=chart_png.parent)
        locate = LocateTool(llm=recording(["<ref>Total</ref><box>(1,2),(3,4)</box>"]), root_dir=chart_png.parent)
        return await asyncio.gather(
            ocr.ainvoke(
                {
                    "type": "tool_call",
                    "id": "1",
                    "name": ocr.name,
                    "args": {"image": str(invoice_pdf.path), "pages": "2-3"},
                }
            ),
            chart.ainvoke({"type": "tool_call", "id": "2", "name": chart.name, "args": {"image": str(chart_png)}}),
            locate.ainvoke(
                {
                    "type": "tool_call",
                    "id": "3",
                    "name": locate.name,
                    "args": {"image": str(chart_png), "query": "Total"},
                }
            ),
        )

    ocr_message, chart_message, locate_message = asyncio.run(run())
    assert [p.page.page for p in ocr_message.artifact.pages] == [2, 3]
    assert chart_message.artifact.pages[0].table.rows[0] == ["Q1", 120]
    assert locate_message.artifact.pages[0].boxes[0].box == (1, 1, 2, 2)


def test_toolkit_tools_share_one_llm(recording) -> None:
    llm = recording(["x"])
    toolkit = NVLMDocumentToolkit(llm=llm, dpi=100, max_pages=2, annotate=True)
    tools = toolkit.get_tools()
    assert [t.name for t in tools] == ["ocr_document", "read_chart", "locate_in_document"]
    assert all(t.llm is llm for t in tools)
    assert all(t.dpi == 100 and t.max_pages == 2 and t.response_format == "content_and_artifact" for t in tools)
    assert tools[2].annotate is True
    for tool in tools:
        schema = tool.tool_call_schema.model_json_schema()
        assert schema["required"][0] == "image"
        assert all(field.get("description") for field in schema["properties"].values())


def test_data_url_image_input(recording) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), "white").save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    message = call(OCRTool(llm=recording(["blank"])), image=url)
    assert message.artifact.pages[0].page.width == 20


def test_tools_bound_to_one_document_do_not_offer_image(recording, invoice_pdf: InvoiceDocument) -> None:
    llm = recording(["<ref>Total due</ref><box>(40,100),(330,126)</box>"])
    tools = NVLMDocumentToolkit(llm=llm, document=str(invoice_pdf.path)).get_tools()
    for tool in tools:
        properties = tool.tool_call_schema.model_json_schema()["properties"]
        assert "image" not in properties and "pages" in properties
    locate = tools[2]
    message = call(locate, pages="3", query="Total due")
    assert message.status == "success" and message.artifact.pages[0].page.page == 3
    # An image argument sent anyway is ignored in favour of the bound document.
    message = call(locate, image="/elsewhere.png", pages=3, query="Total due")
    assert message.status == "success" and message.artifact.pages[0].page.page_count == 3
