"""What the three document tools share: inputs, the model call, page loops, result pieces.

A document tool reads an image or PDF pages (`documents.py`), asks a vision chat model one
or more prompts about each page, and turns the raw answers into a structured artifact plus a
short text for the calling model. This module owns the loop (sync and async), the message
format sent to the model, and the conversion of parsed shapes into pixel boxes; each tool
module owns its prompts, its parsing and its result type. Works with any LangChain
`BaseChatModel` that accepts standard image content blocks (ChatNVLM, local or remote, or
another vision model); nothing here loads a model.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForToolRun, CallbackManagerForToolRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import HumanMessage
from langchain_core.tools import BaseTool, ToolException
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, create_model
from pydantic.v1 import ValidationError as ValidationErrorV1  # in BaseTool's own annotation

from nvlm_engine import NVLMError

from .coords import DEFAULT_SCALE, quad_to_pixel, to_pixel_coords
from .documents import DEFAULT_DPI, DEFAULT_MAX_PAGES, PageImage, encode_png_base64, load_pages
from .errors import DocumentInputError, DocumentToolError
from .file_policy import FilePolicy
from .parsing import RefBox, RefQuad, Shape

__all__ = ["DocumentInput", "DocumentTool", "LocatedBox", "PageInfo"]

logger = logging.getLogger(__name__)

IMAGE_DESCRIPTION = (
    "The document to read: a file path (PNG, JPEG, WebP, TIFF, ... or a PDF) or file:// URL in the folder "
    "the application allows (relative paths start there), a data: URL (data:image/png;base64,... or "
    "data:application/pdf;base64,...), the base64 of the file, or an http(s) URL when the application "
    "allows fetching."
)
PAGES_DESCRIPTION = (
    "PDFs only: which pages to read, numbered from 1: a page ('2'), a range ('1-3'), a list ('1,3') or "
    "'all'. Leave empty to read every page (up to the tool's page limit). Leave empty for images."
)


# Bounds on every free-form argument: they document the inputs for the calling model, and let
# grammar-constrained tool calling (ChatNVLM's tool_choice) always finish a call.
PageNumber = Annotated[int, Field(ge=1, le=100_000)]
PageSpecText = Annotated[str, Field(max_length=40)]


class DocumentInput(BaseModel):
    """Inputs every document tool takes."""

    image: str = Field(description=IMAGE_DESCRIPTION)
    pages: PageNumber | PageSpecText | None = Field(default=None, description=PAGES_DESCRIPTION)


class PageInfo(BaseModel):
    """Which image a result is about, and its size: boxes are pixel coordinates of this image.

    Attributes:
        page: 1-based PDF page number, None for an image file.
        page_count: pages in the PDF, None for an image file.
        width, height: size in pixels of the image the model saw (upright, as displayed;
            for a PDF page, rendered at `dpi`).
        dpi: PDF rendering resolution; PDF points = pixels * 72 / dpi.
    """

    page: int | None = None
    page_count: int | None = None
    width: int
    height: int
    dpi: float | None = None

    @classmethod
    def of(cls, page: PageImage) -> PageInfo:
        return cls(page=page.page, page_count=page.page_count, width=page.width, height=page.height, dpi=page.dpi)


class LocatedBox(BaseModel):
    """A box the model gave, in pixels of the page image.

    Attributes:
        label: the text or object the box belongs to (the model's `<ref>`), None if unlabelled.
        box: (x1, y1, x2, y2) pixel edges, 0 <= x1 <= x2 <= width: columns x1 .. x2 - 1.
        quad: four (x, y) pixel corners when the model gave a quadrilateral; `box` then bounds it.
        model_coords: the numbers as the model wrote them (0..scale grid): 4 for a box, 8 for a quad.
    """

    label: str | None = None
    box: tuple[int, int, int, int]
    quad: list[tuple[int, int]] | None = None
    model_coords: list[float]


def _validation_message(error: ValidationError | ValidationErrorV1) -> str:
    problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'input'}: {e['msg']}" for e in error.errors())
    return f"invalid arguments ({problems}); see the tool's argument descriptions"


class DocumentTool(BaseTool):
    """Base of the document tools: a vision chat model, page loading and the page loop.

    Subclasses set `name`, `description`, `args_schema` and implement `_prompts` (what to ask
    about one page) and `_finish` (raw answers -> (content, artifact)).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    llm: BaseChatModel = Field(description="A vision chat model; ChatNVLM or any model taking image content blocks.")
    document: str | None = Field(
        default=None,
        description="A fixed document (path, URL, data URL or base64) every call reads; the `image` argument "
        "is then not offered to the calling model, which only chooses pages and options.",
    )
    dpi: float = Field(default=DEFAULT_DPI, gt=0, description="PDF rendering resolution in dots per inch.")
    max_pages: int = Field(default=DEFAULT_MAX_PAGES, ge=1, description="The most PDF pages one call reads.")
    root_dir: Path | None = Field(
        default=None,
        description="The folder whose files the calling model may name (symlinks and '..' resolved before the "
        "check; relative paths start here). None: it may name no local file. `document` is not restricted.",
    )
    allow_url_fetch: bool = Field(default=False, description="Fetch http(s) image URLs named by the caller.")
    coordinate_scale: float = Field(default=DEFAULT_SCALE, gt=0, description="The model's box grid (0..scale).")
    max_content_chars: int = Field(default=6000, ge=200, description="Longest text returned to the calling model.")
    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    # Agents see the message of a ToolException as the tool's (error) result, and a precise
    # message for arguments that do not validate; pass False to get exceptions raised instead.
    handle_tool_error: bool | str | Callable[[ToolException], Any] | None = True
    handle_validation_error: bool | str | Callable[[ValidationError | ValidationErrorV1], str] | None = (
        _validation_message
    )

    _inputs: type[BaseModel] = PrivateAttr()
    _policy: FilePolicy = PrivateAttr()

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        self._policy = FilePolicy(root_dir=self.root_dir)  # ValueError (a validation error) if it is no folder
        assert isinstance(self.args_schema, type) and issubclass(self.args_schema, BaseModel)
        self._inputs = self.args_schema
        if self.document is not None and "image" in self.args_schema.model_fields:
            self.args_schema = _without_image(self.args_schema)

    # --- what subclasses provide ---------------------------------------------------------

    def _prompts(self, request: Any, page: PageImage) -> list[str]:
        raise NotImplementedError

    def _finish(self, request: Any, pages: list[PageImage], answers: list[list[str]]) -> tuple[str, Any]:
        raise NotImplementedError

    # --- the loop ------------------------------------------------------------------------

    def _run(self, run_manager: CallbackManagerForToolRun | None = None, **inputs: Any) -> tuple[str, Any]:
        request = self._request(inputs)
        pages = self._load(request)
        callbacks = run_manager.get_child() if run_manager else None
        answers = []
        for page in pages:
            image = encode_png_base64(page.image)
            answers.append([self._ask(image, prompt, page, callbacks) for prompt in self._prompts(request, page)])
        return self._finish(request, pages, answers)

    async def _arun(self, run_manager: AsyncCallbackManagerForToolRun | None = None, **inputs: Any) -> tuple[str, Any]:
        request = self._request(inputs)
        # Decoding, PDF rendering and PNG encoding are CPU work: keep them off the event loop.
        pages = await asyncio.to_thread(self._load, request)
        callbacks = run_manager.get_child() if run_manager else None
        answers = []
        for page in pages:  # one page at a time: a local model answers one request at a time anyway
            image = await asyncio.to_thread(encode_png_base64, page.image)
            answers.append(
                [await self._aask(image, prompt, page, callbacks) for prompt in self._prompts(request, page)]
            )
        return await asyncio.to_thread(self._finish, request, pages, answers)

    def _request(self, inputs: dict[str, Any]) -> Any:
        if self.document is not None:
            inputs = {**inputs, "image": self.document}
        return self._inputs.model_validate(inputs)

    def _load(self, request: DocumentInput) -> list[PageImage]:
        # The calling model's `image` is untrusted (prompt injection in any document it read
        # can choose it): it goes through the file policy. `document` is the application's.
        return load_pages(
            request.image,
            request.pages,
            dpi=self.dpi,
            max_pages=self.max_pages,
            allow_url_fetch=self.allow_url_fetch,
            policy=None if self.document is not None else self._policy,
        )

    def _ask(self, image_b64: str, prompt: str, page: PageImage, callbacks: Any) -> str:
        try:
            reply = self.llm.invoke([_message(image_b64, prompt)], config={"callbacks": callbacks})
        except NVLMError as e:
            raise DocumentToolError(f"the model could not read {page.label}: {e}") from e
        logger.debug("%s on %s: prompt %r -> %r", self.name, page.label, prompt, reply.text)
        return reply.text

    async def _aask(self, image_b64: str, prompt: str, page: PageImage, callbacks: Any) -> str:
        try:
            reply = await self.llm.ainvoke([_message(image_b64, prompt)], config={"callbacks": callbacks})
        except NVLMError as e:
            raise DocumentToolError(f"the model could not read {page.label}: {e}") from e
        return reply.text

    # --- helpers for subclasses ------------------------------------------------------------

    def _locate(self, shape: Shape, page: PageImage) -> LocatedBox:
        """A parsed shape in pixels of `page`."""
        scale = self.coordinate_scale
        if isinstance(shape, RefQuad):
            corners = quad_to_pixel(shape.points, page.width, page.height, scale=scale)
            xs, ys = [c[0] for c in corners], [c[1] for c in corners]
            return LocatedBox(
                label=shape.ref,
                box=(min(xs), min(ys), max(xs), max(ys)),
                quad=list(corners),
                model_coords=[c for point in shape.points for c in point],
            )
        assert isinstance(shape, RefBox)
        return LocatedBox(
            label=shape.ref,
            box=to_pixel_coords(shape.box, page.width, page.height, scale=scale),
            model_coords=list(shape.box),
        )

    def _clip(self, text: str) -> str:
        """Text for the calling model, cut at `max_content_chars` with a note saying where the rest is."""
        if len(text) <= self.max_content_chars:
            return text
        rest = len(text) - self.max_content_chars
        return text[: self.max_content_chars] + f"\n[... {rest} more characters in the tool's artifact]"


@functools.cache
def _without_image(schema: type[BaseModel]) -> type[BaseModel]:
    """The same input schema without its `image` field (for tools bound to one document)."""
    fields: Any = {name: (f.annotation, f) for name, f in schema.model_fields.items() if name != "image"}
    return create_model(schema.__name__, __doc__=schema.__doc__, **fields)


def _message(image_b64: str, prompt: str) -> HumanMessage:
    # LangChain v1 standard content blocks: the image first, as in the model card's "<image>\n{question}".
    return HumanMessage(
        content=[
            {"type": "image", "base64": image_b64, "mime_type": "image/png"},
            {"type": "text", "text": prompt},
        ]
    )


def check_region(region: Sequence[float] | None, page: PageImage) -> tuple[float, float, float, float] | None:
    """Validate a pixel region [x1, y1, x2, y2] against a page; None passes through."""
    if region is None:
        return None
    if len(region) != 4:
        raise DocumentInputError(f"region must be 4 numbers [x1, y1, x2, y2] in pixels, got {region!r}")
    x1, y1, x2, y2 = region
    if not (0 <= x1 < x2 <= page.width and 0 <= y1 < y2 <= page.height):
        raise DocumentInputError(
            f"region {list(region)!r} is not inside {page.label} ({page.width}x{page.height} px): "
            "need 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height"
        )
    return (x1, y1, x2, y2)


def quote_answers(pages: list[PageImage], raw: list[str]) -> str:
    """Every raw answer, headed by its page, for error messages: nothing is cut."""
    return "\n".join(f"--- {page.label} ---\n{text}" for page, text in zip(pages, raw, strict=True))
