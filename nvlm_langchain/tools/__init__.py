"""Document-understanding tools for LangChain agents, run by NVLM-D (or any vision chat model).

    from nvlm_langchain.tools import NVLMDocumentToolkit
    tools = NVLMDocumentToolkit.from_checkpoint("/models/NVLM-D-72B").get_tools()

- `OCRTool` ("ocr_document"): plain or grounded transcription, or the text of a region.
- `ChartTool` ("read_chart"): a chart's data table (JSON and CSV) and a short answer.
- `LocateTool` ("locate_in_document"): pixel boxes of a text or a described region.

Each takes an image path, URL, data URL or base64 (PDF pages by number or range; paths only
under the application's `root_dir`, URLs only with `allow_url_fetch`: see `FilePolicy`), returns
`(short text for the model, structured artifact)`, has an async version, and reports bad
input or unreadable model output as a `ToolException` quoting the model's raw answer.
The parsers (`parse_boxes`, `parse_quads`, `parse_table`, `parse_number`) and the coordinate
conversion (`to_pixel_coords`, `to_model_coords`) are pure functions, usable on their own.
"""

from .base import DocumentInput, DocumentTool, LocatedBox, PageInfo
from .chart import ChartInput, ChartPage, ChartResult, ChartTable, ChartTool
from .coords import DEFAULT_SCALE, quad_to_pixel, to_model_coords, to_pixel_coords
from .documents import DEFAULT_DPI, PageImage, load_pages, parse_page_spec
from .errors import DocumentInputError, DocumentToolError, ModelOutputError
from .file_policy import FilePolicy
from .localize import LocateInput, LocatePage, LocateResult, LocateTool
from .ocr import OCRInput, OCRPage, OCRResult, OCRTool
from .parsing import (
    Grounding,
    Quantity,
    RefBox,
    RefQuad,
    parse_boxes,
    parse_grounding,
    parse_number,
    parse_quads,
    parse_quantity,
)
from .tables import Table, TableParseError, parse_table, split_unit
from .toolkit import NVLMDocumentToolkit

__all__ = [
    "DEFAULT_DPI",
    "DEFAULT_SCALE",
    "ChartInput",
    "ChartPage",
    "ChartResult",
    "ChartTable",
    "ChartTool",
    "DocumentInput",
    "DocumentInputError",
    "DocumentTool",
    "DocumentToolError",
    "FilePolicy",
    "Grounding",
    "LocateInput",
    "LocatePage",
    "LocateResult",
    "LocateTool",
    "LocatedBox",
    "ModelOutputError",
    "NVLMDocumentToolkit",
    "OCRInput",
    "OCRPage",
    "OCRResult",
    "OCRTool",
    "PageImage",
    "PageInfo",
    "Quantity",
    "RefBox",
    "RefQuad",
    "Table",
    "TableParseError",
    "load_pages",
    "parse_boxes",
    "parse_grounding",
    "parse_number",
    "parse_page_spec",
    "parse_quads",
    "parse_quantity",
    "parse_table",
    "quad_to_pixel",
    "split_unit",
    "to_model_coords",
    "to_pixel_coords",
]
