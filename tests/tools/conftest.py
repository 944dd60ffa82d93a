"""Fixtures of the document-tool tests: a recording chat model at the package boundary, sample
documents, and ChatNVLM on the tiny checkpoint (skipped while `nvlm_langchain.chat_models`
does not exist)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from langchain_core.language_models import BaseChatModel
from PIL import Image
from tool_fakes import RecordingChatModel

from nvlm_langchain.tools.samples import InvoiceDocument, draw_bar_chart, make_invoice_pdf

# The e2e tests generate this many tokens per answer: enough to exercise parsing and keep a
# test at a second or two on two CPU cores.
TINY_MAX_TOKENS = 8


@pytest.fixture
def recording() -> Callable[..., RecordingChatModel]:
    def make(answers: list[str] | Callable[[str], str]) -> RecordingChatModel:
        return RecordingChatModel(answers=answers, calls=[])

    return make


@pytest.fixture(scope="session")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of the sample documents: the `root_dir` tools need to read them by path."""
    return tmp_path_factory.mktemp("docs")


@pytest.fixture(scope="session")
def invoice_pdf(docs: Path) -> InvoiceDocument:
    """A 3-page invoice PDF, made in the test session with Pillow."""
    return make_invoice_pdf(docs / "invoice.pdf")


@pytest.fixture(scope="session")
def chart_png(docs: Path) -> Path:
    path = docs / "chart.png"
    draw_bar_chart(path)
    return path


@pytest.fixture(scope="session")
def large_jpeg(docs: Path) -> Path:
    """A 4000x3000 photo-sized JPEG with a dark square at (3000..3400, 2000..2300)."""
    image = Image.new("RGB", (4000, 3000), (235, 235, 225))
    image.paste((20, 20, 20), (3000, 2000, 3400, 2300))
    path = docs / "large.jpg"
    image.save(path, format="JPEG", quality=85)
    return path


@pytest.fixture(scope="session")
def chat_nvlm(tiny_checkpoint: Path) -> BaseChatModel:
    """ChatNVLM on the tiny random checkpoint, greedy (its answers are noise; the plumbing is real)."""
    module = pytest.importorskip(
        "nvlm_langchain.chat_models", reason="nvlm_langchain.chat_models (ChatNVLM) is not there yet"
    )
    return module.ChatNVLM(
        model=str(tiny_checkpoint), device_map="cpu", dtype="float32", max_tokens=TINY_MAX_TOKENS, temperature=0.0
    )


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> Iterator[None]:
    """Mark the async tests of this folder (langchain-tests' async suites) for pytest-asyncio.

    pytest-asyncio runs in strict mode here and only runs marked coroutines; the standard
    suites' async tests carry no mark. This inner wrapper marks them before pytest-asyncio's
    outer one looks, and leaves every other folder's tests alone.
    """
    outcome = yield
    if not inspect.iscoroutinefunction(obj) or Path(__file__).parent not in Path(str(collector.path)).parents:
        return
    result = outcome.get_result()
    for item in result if isinstance(result, list) else [result]:
        if isinstance(item, pytest.Function):
            item.add_marker(pytest.mark.asyncio)
