"""Errors of the document tools: LangChain `ToolException`s, so an agent sees the message.

With the tools' default `handle_tool_error=True`, LangChain turns these into a `ToolMessage`
with `status="error"` whose content is the message; with `handle_tool_error=False` they are
raised to the caller. Either way the message says what was wrong and what to do, and a model
answer that could not be parsed is quoted in full.
"""

from __future__ import annotations

from langchain_core.tools import ToolException

__all__ = ["DocumentInputError", "DocumentToolError", "ModelOutputError"]


class DocumentToolError(ToolException):
    """Base class of the document tools' errors."""


class DocumentInputError(DocumentToolError):
    """The `image` / `pages` / region input cannot be used (unreadable file, page out of range...)."""


class ModelOutputError(DocumentToolError):
    """The model answered, but not in a form the tool can read.

    Attributes:
        raw_outputs: the model's answers as received, one per page (or per prompt), in order.
        issues: what the parser saw but could not use.
    """

    def __init__(self, message: str, *, raw_outputs: list[str], issues: list[str] | None = None) -> None:
        super().__init__(message)
        self.raw_outputs = raw_outputs
        self.issues = issues or []
