"""A scripted chat model for the document-tool tests: fakes live at the package boundary only."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from PIL import Image


class RecordingChatModel(BaseChatModel):
    """A chat model that answers from a script and records what it was sent.

    `answers` is a list (used in order, the last one repeated) or a function of the prompt text.
    """

    answers: list[str] | Callable[[str], str]
    calls: list[list[BaseMessage]] = []

    @property
    def _llm_type(self) -> str:
        return "recording-fake"

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        self.calls.append(list(messages))
        prompt = prompt_of(messages[-1])
        if callable(self.answers):
            text = self.answers(prompt)
        else:
            text = self.answers[min(len(self.calls) - 1, len(self.answers) - 1)]
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))])

    def sent_images(self) -> list[Image.Image]:
        """The images of every call, decoded."""
        return [image_of(m[-1]) for m in self.calls]


def prompt_of(message: BaseMessage) -> str:
    return "".join(b["text"] for b in message.content if isinstance(b, dict) and b.get("type") == "text")


def image_of(message: BaseMessage) -> Image.Image:
    (block,) = [b for b in message.content if isinstance(b, dict) and b.get("type") == "image"]
    assert block["mime_type"] == "image/png"
    return Image.open(io.BytesIO(base64.b64decode(block["base64"])))
