"""Localization tool: find a piece of text or a described region, as pixel boxes.

Prompts: text uses NVLM-D's referring-grounding training prompt (SPEC section 9)
`Locate the text "{query}" in the image.`; an object or region description uses InternVL's
RefCOCO prompt ("Please provide the bounding box coordinate of the region this sentence
describes: <ref>{query}</ref>"), the family NVLM-D's vision tower and grounding data come
from; both are tool fields. The answer's `<box>` / `<quad>` coordinates (0..scale grid) are
converted to pixel edges of the displayed image with `coords.to_pixel_coords`.
"""

from __future__ import annotations

import base64
import io
from typing import Literal

from PIL import Image
from pydantic import BaseModel, Field

from .annotate import draw_boxes
from .base import DocumentInput, DocumentTool, LocatedBox, PageInfo, quote_answers
from .documents import PageImage, encode_png_base64
from .errors import DocumentInputError, ModelOutputError
from .parsing import parse_grounding

__all__ = ["LOCATE_OBJECT_PROMPT", "LOCATE_TEXT_PROMPT", "LocateInput", "LocatePage", "LocateResult", "LocateTool"]

LOCATE_TEXT_PROMPT = 'Locate the text "{query}" in the image.'
LOCATE_OBJECT_PROMPT = (
    "Please provide the bounding box coordinate of the region this sentence describes: <ref>{query}</ref>"
)


class LocateInput(DocumentInput):
    """Arguments of the localization tool."""

    query: str = Field(
        min_length=1,
        max_length=300,
        description=(
            "What to find. With target='text': the exact text to look for, e.g. 'Total due' or 'INV-2024-001'. "
            "With target='object': a description of a region or object, e.g. 'the company logo' or "
            "'the table of line items'."
        ),
    )
    target: Literal["text", "object"] = Field(
        default="text",
        description="'text' to find where a piece of text is written; 'object' to find a described region or object.",
    )


class LocatePage(BaseModel):
    """What was found on one image or PDF page.

    Attributes:
        page: which page, and its size in pixels (the boxes' coordinate system).
        boxes: every box the model gave, in pixels; empty when it gave none on this page.
        raw_text: the model's answer exactly as received.
        issues: what could not be parsed (a cut-off box...).
        annotated_png_base64: with the tool's `annotate=True`, a PNG (base64) of the page
            with the boxes drawn; `annotated_image()` decodes it.
    """

    page: PageInfo
    boxes: list[LocatedBox]
    raw_text: str
    issues: list[str] = Field(default_factory=list)
    annotated_png_base64: str | None = None

    def annotated_image(self) -> Image.Image | None:
        if self.annotated_png_base64 is None:
            return None
        return Image.open(io.BytesIO(base64.b64decode(self.annotated_png_base64))).convert("RGB")


class LocateResult(BaseModel):
    """The localization tool's artifact."""

    query: str
    target: Literal["text", "object"]
    pages: list[LocatePage]

    @property
    def boxes(self) -> list[tuple[int | None, LocatedBox]]:
        """Every box found, with its page number (None for an image)."""
        return [(p.page.page, b) for p in self.pages for b in p.boxes]


class LocateTool(DocumentTool):
    """Find text or a described region in an image or PDF pages; boxes in pixels of the page image.

    Errors: when no page's answer holds a box, a `ModelOutputError` quoting every answer.

    Example:
        tool = LocateTool(llm=ChatNVLM(model="/models/NVLM-D-72B"), annotate=True)
        result = tool.invoke({"type": "tool_call", "id": "1", "name": tool.name,
                              "args": {"image": "invoice.png", "query": "Total"}}).artifact
        result.pages[0].boxes[0].box          # (x1, y1, x2, y2) pixels
        result.pages[0].annotated_image().save("found.png")
    """

    name: str = "locate_in_document"
    description: str = (
        "Find where a piece of text (target='text') or a described object or region (target='object') is in a "
        "document image or PDF page. Returns pixel boxes [x1, y1, x2, y2] of the page image (origin top-left), "
        "which the OCR tool's region argument accepts."
    )
    args_schema: type[BaseModel] = LocateInput
    annotate: bool = Field(default=False, description="Add a PNG of each page with the boxes drawn to the artifact.")
    text_prompt: str = Field(default=LOCATE_TEXT_PROMPT, description="Prompt for target='text'; has {query}.")
    object_prompt: str = Field(default=LOCATE_OBJECT_PROMPT, description="Prompt for target='object'; has {query}.")

    def _prompts(self, request: LocateInput, page: PageImage) -> list[str]:
        query = request.query.strip()
        if not query:
            raise DocumentInputError("query is empty: say which text or object to find")
        template = self.text_prompt if request.target == "text" else self.object_prompt
        return [template.format(query=query.replace('"', "'"))]

    def _finish(
        self, request: LocateInput, pages: list[PageImage], answers: list[list[str]]
    ) -> tuple[str, LocateResult]:
        results = []
        for page, (raw,) in zip(pages, answers, strict=True):
            grounding = parse_grounding(raw)
            boxes = [self._locate(shape, page) for shape in grounding.shapes]
            for located in boxes:
                located.label = located.label or request.query
            annotated = encode_png_base64(draw_boxes(page.image, boxes)) if self.annotate and boxes else None
            results.append(
                LocatePage(
                    page=PageInfo.of(page),
                    boxes=boxes,
                    raw_text=raw,
                    issues=grounding.issues,
                    annotated_png_base64=annotated,
                )
            )
        if not any(r.boxes for r in results):
            raws = [r.raw_text for r in results]
            raise ModelOutputError(
                f"no box for {request.query!r} could be read in the model's answer (expected "
                f"'<ref>...</ref><box>(x1,y1),(x2,y2)</box>' on a 0..{self.coordinate_scale:g} grid); the model may "
                "not have found it. The model answered:\n" + quote_answers(pages, raws),
                raw_outputs=raws,
                issues=[i for r in results for i in r.issues],
            )
        result = LocateResult(query=request.query, target=request.target, pages=results)
        return self._clip(_content(result)), result


def _content(result: LocateResult) -> str:
    lines = []
    for page in result.pages:
        info = page.page
        where = f"page {info.page} of {info.page_count}" if info.page else "the image"
        if not page.boxes:
            lines.append(f"{where}: not found (the model answered {page.raw_text.strip()[:200]!r})")
            continue
        found = "; ".join(f"{list(b.box)} {b.label!r}" for b in page.boxes)
        lines.append(f"{where} ({info.width}x{info.height} px): {len(page.boxes)} box(es) [x1, y1, x2, y2]: {found}")
    return f"Locations of {result.query!r}:\n" + "\n".join(lines)
