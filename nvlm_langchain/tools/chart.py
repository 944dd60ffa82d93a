"""Chart tool: turn a chart into a data table (JSON and CSV) and answer a question about it.

Prompts: the question uses the ChartQA evaluation prompt (SPEC section 9,
"{question}\\nAnswer the question using a single word or phrase."). SPEC lists no trained
chart-to-table prompt, so `TABLE_PROMPT` asks for a markdown table with units in the headers,
the format `tables.parse_table` reads best; it is a field of the tool (`table_prompt`) so a
deployment can swap it for one its model answers better.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from .base import DocumentInput, DocumentTool, PageInfo, quote_answers
from .documents import PageImage
from .errors import DocumentInputError, ModelOutputError
from .parsing import parse_quantity
from .tables import Cell, TableParseError, parse_table

__all__ = ["CHART_QA_PROMPT", "TABLE_PROMPT", "ChartInput", "ChartPage", "ChartResult", "ChartTable", "ChartTool"]

TABLE_PROMPT = (
    "Convert the chart into a data table in markdown format. Use the first row for the column headers "
    "and write units in the headers, for example 'Revenue (USD)'."
)
CHART_QA_PROMPT = "{question}\nAnswer the question using a single word or phrase."


class ChartInput(DocumentInput):
    """Arguments of the chart tool."""

    question: str | None = Field(
        default=None,
        max_length=500,
        description=(
            "A question about the chart, answered with a single word, phrase or number, e.g. "
            "'What was the revenue in 2021?' or 'Which region grew fastest?'. Leave empty to only extract the table."
        ),
    )
    extract_table: bool = Field(
        default=True,
        description="Extract the chart's underlying data as a table (columns, rows, units). "
        "Set false when only the answer to `question` is needed (faster).",
    )


class ChartTable(BaseModel):
    """A chart's data: `rows[i][j]` is the value of column `columns[j]` (unit `units[j]`)."""

    title: str | None = None
    columns: list[str]
    units: list[str | None]
    rows: list[list[Cell]]
    issues: list[str] = Field(default_factory=list)


class ChartPage(BaseModel):
    """What was read from one chart image or PDF page.

    Attributes:
        page: which page, and its size in pixels.
        table: the parsed table; None when not asked for or when it could not be read
            (then `issues` says why and `raw_table_text` holds the answer).
        csv: the table as CSV text (header units in parentheses).
        answer: the short answer to the question, as the model wrote it.
        answer_value, answer_unit: the answer read as a number, when it is one.
        raw_table_text, raw_answer_text: the model's answers exactly as received.
    """

    page: PageInfo
    table: ChartTable | None = None
    csv: str | None = None
    answer: str | None = None
    answer_value: float | None = None
    answer_unit: str | None = None
    raw_table_text: str | None = None
    raw_answer_text: str | None = None
    issues: list[str] = Field(default_factory=list)


class ChartResult(BaseModel):
    """The chart tool's artifact: one entry per image or PDF page read."""

    question: str | None = None
    pages: list[ChartPage]


class ChartTool(DocumentTool):
    """Read a chart's data as a table, and answer a short question about it.

    Example:
        tool = ChartTool(llm=ChatNVLM(model="/models/NVLM-D-72B"))
        result = tool.invoke({"type": "tool_call", "id": "1", "name": tool.name,
                              "args": {"image": "sales.png", "question": "Which year was best?"}}).artifact
        result.pages[0].table.rows, result.pages[0].csv, result.pages[0].answer
    """

    name: str = "read_chart"
    description: str = (
        "Read a chart or plot (bar, line, pie, ...) from an image or PDF page: returns its data as a table "
        "(columns, rows, units; also as CSV) and, if a question is given, a short answer to it. "
        "Use it for numbers shown graphically."
    )
    args_schema: type[BaseModel] = ChartInput
    table_prompt: str = Field(default=TABLE_PROMPT, description="The prompt asking for the chart's data table.")
    question_prompt: str = Field(default=CHART_QA_PROMPT, description="The short-answer prompt; has {question}.")

    def _prompts(self, request: ChartInput, page: PageImage) -> list[str]:
        if not request.extract_table and not request.question:
            raise DocumentInputError("nothing to do: give a question, or leave extract_table true")
        prompts = [self.table_prompt] if request.extract_table else []
        if request.question:
            prompts.append(self.question_prompt.format(question=request.question.strip()))
        return prompts

    def _finish(self, request: ChartInput, pages: list[PageImage], answers: list[list[str]]) -> tuple[str, ChartResult]:
        results = [self._read_page(request, page, answer) for page, answer in zip(pages, answers, strict=True)]
        if request.extract_table and not request.question and not any(r.table for r in results):
            raws = [r.raw_table_text or "" for r in results]
            raise ModelOutputError(
                "no data table could be read in the model's answer (expected a markdown table, CSV lines or "
                "'label: value' lines). The model answered:\n" + quote_answers(pages, raws),
                raw_outputs=raws,
                issues=[i for r in results for i in r.issues],
            )
        result = ChartResult(question=request.question, pages=results)
        return self._clip(_content(result)), result

    def _read_page(self, request: ChartInput, page: PageImage, answers: list[str]) -> ChartPage:
        answers = list(answers)
        out = ChartPage(page=PageInfo.of(page))
        if request.extract_table:
            out.raw_table_text = answers.pop(0)
            try:
                table = parse_table(out.raw_table_text)
            except TableParseError as e:
                out.issues.append(f"{e}; the raw answer is in raw_table_text")
            else:
                out.table = ChartTable(**table.to_dict())
                out.csv = table.to_csv()
                out.issues.extend(table.issues)
        if request.question:
            out.raw_answer_text = answers.pop(0)
            out.answer = out.raw_answer_text.strip()
            quantity = parse_quantity(out.answer)
            if quantity is not None:
                out.answer_value, out.answer_unit = quantity.value, quantity.unit
        return out


def _content(result: ChartResult) -> str:
    parts = []
    for page in result.pages:
        info = page.page
        lines = [f"[page {info.page} of {info.page_count}]"] if info.page else []
        if page.table is not None:
            title = f" '{page.table.title}'" if page.table.title else ""
            lines.append(f"Table{title} ({len(page.table.rows)} rows), CSV:\n{(page.csv or '').rstrip()}")
        elif page.raw_table_text is not None:
            lines.append(f"No table could be read; the model answered: {page.raw_table_text.strip()!r}")
        if page.answer is not None:
            lines.append(f"Answer: {page.answer}")
        if page.issues and page.table is not None:
            lines.append("(" + "; ".join(page.issues) + ")")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
