"""langchain-tests' standard suites for each tool: `ToolsUnitTests` and `ToolsIntegrationTests`.

The integration suites run each tool against a scripted chat model that answers what NVLM-D
answers (boxes, a markdown table, text), and, for the tools whose output any answer satisfies
(plain OCR, chart question), against ChatNVLM on the tiny checkpoint. The localization tool
on the tiny checkpoint is in test_tool_e2e.py: random weights give no box, so its result there
is the error path, which the standard suite (it wants an artifact) does not accept.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from langchain_core.tools import BaseTool
from langchain_tests.integration_tests import ToolsIntegrationTests
from langchain_tests.unit_tests import ToolsUnitTests
from tool_fakes import RecordingChatModel

from nvlm_langchain.tools import ChartTool, LocateTool, OCRTool
from nvlm_langchain.tools.samples import draw_bar_chart


def _chart_data_url() -> str:
    image, _ = draw_bar_chart(size=(400, 300))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


CHART = _chart_data_url()


def _nvlm_like_answer(prompt: str) -> str:
    if prompt.startswith("Locate the text") or "bounding box coordinate" in prompt:
        return "<ref>Q4</ref><box>(775,880),(810,915)</box>"
    if "data table" in prompt:
        return "| Quarter | Revenue (USD k) |\n|---|---|\n| Q1 | 120 |\n| Q2 | 135.5 |\n| Q3 | 98 |\n| Q4 | 160.25 |"
    if "single word or phrase" in prompt:
        return "Q4"
    return "Revenue by quarter (USD k)\n120 135.5 98 160.25\nQ1 Q2 Q3 Q4"


def _scripted() -> RecordingChatModel:
    return RecordingChatModel(answers=_nvlm_like_answer, calls=[])


# --- unit --------------------------------------------------------------------------------


class TestOCRToolUnit(ToolsUnitTests):
    @property
    def tool_constructor(self) -> type[BaseTool]:
        return OCRTool

    @property
    def tool_constructor_params(self) -> dict[str, Any]:
        return {"llm": _scripted()}

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"image": CHART, "grounded": False}


class TestChartToolUnit(ToolsUnitTests):
    @property
    def tool_constructor(self) -> type[BaseTool]:
        return ChartTool

    @property
    def tool_constructor_params(self) -> dict[str, Any]:
        return {"llm": _scripted()}

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"image": CHART, "question": "Which quarter had the highest revenue?"}


class TestLocateToolUnit(ToolsUnitTests):
    @property
    def tool_constructor(self) -> type[BaseTool]:
        return LocateTool

    @property
    def tool_constructor_params(self) -> dict[str, Any]:
        return {"llm": _scripted(), "annotate": True}

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"image": CHART, "query": "Q4", "target": "text"}


# --- integration, scripted model ------------------------------------------------------------


class TestOCRToolIntegration(ToolsIntegrationTests):
    tool_constructor = TestOCRToolUnit.tool_constructor
    tool_constructor_params = TestOCRToolUnit.tool_constructor_params
    tool_invoke_params_example = TestOCRToolUnit.tool_invoke_params_example


class TestChartToolIntegration(ToolsIntegrationTests):
    tool_constructor = TestChartToolUnit.tool_constructor
    tool_constructor_params = TestChartToolUnit.tool_constructor_params
    tool_invoke_params_example = TestChartToolUnit.tool_invoke_params_example


class TestLocateToolIntegration(ToolsIntegrationTests):
    tool_constructor = TestLocateToolUnit.tool_constructor
    tool_constructor_params = TestLocateToolUnit.tool_constructor_params
    tool_invoke_params_example = TestLocateToolUnit.tool_invoke_params_example


# --- integration, ChatNVLM on the tiny checkpoint ------------------------------------------


class TestOCRToolTinyNVLM(ToolsIntegrationTests):
    @property
    def tool_constructor(self) -> type[BaseTool]:
        return OCRTool

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"image": CHART}

    @pytest.fixture
    def tool(self, chat_nvlm: Any) -> BaseTool:
        return OCRTool(llm=chat_nvlm)


class TestChartToolTinyNVLM(ToolsIntegrationTests):
    @property
    def tool_constructor(self) -> type[BaseTool]:
        return ChartTool

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"image": CHART, "question": "Which quarter had the highest revenue?", "extract_table": False}

    @pytest.fixture
    def tool(self, chat_nvlm: Any) -> BaseTool:
        return ChartTool(llm=chat_nvlm)
