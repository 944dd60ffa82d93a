"""`NVLMDocumentToolkit`: the three document tools sharing one vision chat model.

    toolkit = NVLMDocumentToolkit.from_checkpoint("/models/NVLM-D-72B")    # loads NVLM-D once
    tools = toolkit.get_tools()          # [OCRTool, ChartTool, LocateTool], same `llm` object

or, with any vision chat model (ChatNVLM(base_url=...) for a remote server, or another provider):

    toolkit = NVLMDocumentToolkit(llm=my_chat_model, root_dir="/srv/scans", allow_url_fetch=True)

The calling model names documents by path only under `root_dir` (no local file without it),
and by http(s) URL only with `allow_url_fetch`; `document=` binds one file instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.tools import BaseTool, BaseToolkit
from pydantic import ConfigDict, Field

from .chart import ChartTool
from .coords import DEFAULT_SCALE
from .documents import DEFAULT_DPI, DEFAULT_MAX_PAGES
from .localize import LocateTool
from .ocr import OCRTool

__all__ = ["NVLMDocumentToolkit"]


class NVLMDocumentToolkit(BaseToolkit):
    """Hands out the OCR, chart and localization tools, all calling the same `llm`.

    Attributes:
        llm: the vision chat model every tool calls (one loaded model for all of them).
        document: a fixed document every tool reads (an agent over one file then only
            chooses pages and options, never a path); None lets the caller pass `image`.
        root_dir: the folder whose files the calling model may name in `image` (after
            symlinks and `..` are resolved; relative paths start there); None: no local
            file (see `FilePolicy`).
        dpi, max_pages, allow_url_fetch, coordinate_scale: passed to every tool (see
            `DocumentTool`).
        annotate: the localization tool adds annotated page images to its artifact.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    llm: BaseChatModel
    document: str | None = None
    root_dir: Path | None = None
    dpi: float = Field(default=DEFAULT_DPI, gt=0)
    max_pages: int = Field(default=DEFAULT_MAX_PAGES, ge=1)
    allow_url_fetch: bool = False
    coordinate_scale: float = Field(default=DEFAULT_SCALE, gt=0)
    annotate: bool = False

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, *, toolkit_options: dict[str, Any] | None = None, **engine_options: Any
    ) -> NVLMDocumentToolkit:
        """Load an NVLM-D checkpoint folder once, as a `ChatNVLM`, and build the toolkit on it.

        Args:
            path: the checkpoint folder (the published NVLM-D-72B download, or a tiny test one).
            toolkit_options: fields of the toolkit (`dpi`, `max_pages`, `annotate`, ...).
            **engine_options: passed to `ChatNVLM` (`device_map`, `dtype`, `max_tokens`, ...).
        """
        from nvlm_langchain.chat_models import ChatNVLM

        return cls(llm=ChatNVLM(model=str(path), **engine_options), **(toolkit_options or {}))

    def get_tools(self) -> list[BaseTool]:
        """The three tools, each holding this toolkit's `llm` (not a copy)."""
        options: dict[str, Any] = {
            "llm": self.llm,
            "document": self.document,
            "root_dir": self.root_dir,
            "dpi": self.dpi,
            "max_pages": self.max_pages,
            "allow_url_fetch": self.allow_url_fetch,
            "coordinate_scale": self.coordinate_scale,
        }
        return [OCRTool(**options), ChartTool(**options), LocateTool(annotate=self.annotate, **options)]
