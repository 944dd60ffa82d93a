"""OCR tool: transcribe an image or PDF pages, optionally with a pixel box per text span.

Prompts (SPEC section 9): grounded OCR uses the training prompt "Extract all texts and their
bounding boxes from the given image using grounded OCR." and reads
`<ref>text</ref><box>(x1,y1),(x2,y2)</box>` lines; a region uses the grounded-OCR training
prompt "Recognize the text in this region: <box>(x1,y1),(x2,y2)</box>."; plain transcription
uses the document-transcription training prompt without its "along with bounding boxes".
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from .base import DocumentInput, DocumentTool, LocatedBox, PageInfo, check_region, quote_answers
from .coords import format_box, to_model_coords
from .documents import PageImage
from .errors import ModelOutputError
from .parsing import parse_grounding

__all__ = [
    "GROUNDED_OCR_PROMPT",
    "PLAIN_OCR_PROMPT",
    "REGION_OCR_PROMPT",
    "OCRInput",
    "OCRPage",
    "OCRResult",
    "OCRTool",
]

PLAIN_OCR_PROMPT = "Transcribe the document as plain text."
GROUNDED_OCR_PROMPT = "Extract all texts and their bounding boxes from the given image using grounded OCR."
REGION_OCR_PROMPT = "Recognize the text in this region: {box}."


class OCRInput(DocumentInput):
    """Arguments of the OCR tool."""

    grounded: bool = Field(
        default=False,
        description=(
            "Also return where each piece of text is, as a pixel box [x1, y1, x2, y2] per text span. "
            "Use it when you need positions (to crop, highlight or read a region later); plain text otherwise."
        ),
    )
    region: list[Annotated[int, Field(ge=0, le=1_000_000)]] | None = Field(
        default=None,
        min_length=4,
        max_length=4,
        description=(
            "Read only this part of the page: [x1, y1, x2, y2] in pixels of the page image, e.g. a box "
            "returned by the locate tool. Leave empty to read the whole page."
        ),
    )


class OCRPage(BaseModel):
    """The transcription of one page.

    Attributes:
        page: which page, and its size in pixels (the boxes' coordinate system).
        text: the transcription (in grounded mode, the spans' texts one per line).
        spans: grounded mode or region: each text span with its pixel box; None in plain mode.
        raw_text: the model's answer exactly as received.
        issues: what could not be parsed (a cut-off box...).
    """

    page: PageInfo
    text: str
    spans: list[LocatedBox] | None = None
    raw_text: str
    issues: list[str] = Field(default_factory=list)


class OCRResult(BaseModel):
    """The OCR tool's artifact."""

    mode: Literal["plain", "grounded", "region"]
    pages: list[OCRPage]

    @property
    def text(self) -> str:
        """All pages' text, separated by blank lines."""
        return "\n\n".join(p.text for p in self.pages)


class OCRTool(DocumentTool):
    """Transcribe an image or PDF pages with a vision model (NVLM-D's OCR prompts).

    Example:
        tool = OCRTool(llm=ChatNVLM(model="/models/NVLM-D-72B"))
        message = tool.invoke({"type": "tool_call", "id": "1", "name": tool.name,
                               "args": {"image": "invoice.pdf", "pages": "1-2", "grounded": True}})
        message.content            # text for the model
        message.artifact.pages[0].spans[0].box   # (x1, y1, x2, y2) in pixels of page 1
    """

    name: str = "ocr_document"
    description: str = (
        "Read the text of a document image or PDF page (OCR). Returns the transcription as plain text; "
        "with grounded=true also each text span's pixel box [x1, y1, x2, y2]; with region=[x1, y1, x2, y2] "
        "only the text inside that box. Use it to read invoices, forms, receipts, scans, screenshots."
    )
    args_schema: type[BaseModel] = OCRInput

    def _prompts(self, request: OCRInput, page: PageImage) -> list[str]:
        region = check_region(request.region, page)
        if region is not None:
            model_box = to_model_coords(region, page.width, page.height, scale=self.coordinate_scale, integer=True)
            return [REGION_OCR_PROMPT.format(box=format_box(model_box))]
        return [GROUNDED_OCR_PROMPT if request.grounded else PLAIN_OCR_PROMPT]

    def _finish(self, request: OCRInput, pages: list[PageImage], answers: list[list[str]]) -> tuple[str, OCRResult]:
        mode: Literal["plain", "grounded", "region"] = (
            "region" if request.region is not None else "grounded" if request.grounded else "plain"
        )
        results = [self._read_page(mode, request, page, answer[0]) for page, answer in zip(pages, answers, strict=True)]
        if mode == "grounded" and not any(r.spans for r in results) and any(r.raw_text.strip() for r in results):
            raise ModelOutputError(
                "grounded OCR failed: no text box could be read in the model's answer (expected lines like "
                f"'<ref>text</ref><box>(x1,y1),(x2,y2)</box>' on a 0..{self.coordinate_scale:g} grid). "
                "Call again with grounded=false for plain text. The model answered:\n"
                + quote_answers(pages, [r.raw_text for r in results]),
                raw_outputs=[r.raw_text for r in results],
                issues=[i for r in results for i in r.issues],
            )
        result = OCRResult(mode=mode, pages=results)
        return self._clip(_content(result)), result

    def _read_page(self, mode: str, request: OCRInput, page: PageImage, raw: str) -> OCRPage:
        info = PageInfo.of(page)
        if mode == "plain":
            return OCRPage(page=info, text=raw.strip(), raw_text=raw)
        if mode == "region":
            region = check_region(request.region, page)
            assert region is not None
            box = tuple(int(round(v)) for v in region)
            span = LocatedBox(
                label=raw.strip(),
                box=box,  # type: ignore[arg-type]
                model_coords=list(to_model_coords(region, page.width, page.height, scale=self.coordinate_scale)),
            )
            return OCRPage(page=info, text=raw.strip(), spans=[span], raw_text=raw)
        grounding = parse_grounding(raw)
        spans = [self._locate(shape, page) for shape in grounding.shapes]
        issues = list(grounding.issues)
        if not spans and raw.strip():
            issues.append("no text box found in the answer; text is the raw answer")
            return OCRPage(page=info, text=raw.strip(), spans=[], raw_text=raw, issues=issues)
        text = "\n".join(s.label for s in spans if s.label)
        return OCRPage(page=info, text=text, spans=spans, raw_text=raw, issues=issues)


def _content(result: OCRResult) -> str:
    parts = []
    for page in result.pages:
        info = page.page
        header = f"[page {info.page} of {info.page_count}, {info.width}x{info.height} px]" if info.page else ""
        if page.spans:
            lines = [f"{s.label or ''}\t[{', '.join(map(str, s.box))}]" for s in page.spans]
            body = (
                f"Text spans with pixel boxes [x1, y1, x2, y2] on the {info.width}x{info.height} image:\n"
                + "\n".join(lines)
            )
        else:
            body = page.text or "(no text found)"
        if page.issues:
            body += "\n(" + "; ".join(page.issues) + ")"
        parts.append(f"{header}\n{body}" if header else body)
    return "\n\n".join(parts)
