"""A terminal conversation with ChatNVLM: history, images, system prompt, save and resume.

Used by `nvlm-chat`; holds LangChain messages and a `ChatNVLM`, and knows the transcript file
format (JSON: {"version": 1, "model": ..., "system": ..., "messages": [LangChain message dicts]}).
A message that fails can be taken back (`take_back`): its text returns to the caller and its
images to the attachments, so nothing typed or attached is lost. Image blocks arrive checked
(`cli_images.check_image`). Knows nothing of click or terminals.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    messages_from_dict,
    messages_to_dict,
)

from .chat_models import ChatNVLM

TRANSCRIPT_VERSION = 1


class SessionError(Exception):
    """A transcript or image the session cannot use; the message says what to do."""


@dataclass
class ChatSession:
    """The running conversation."""

    llm: ChatNVLM
    system: str | None = None
    history: list[BaseMessage] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def open(cls, model: str, *, system: str | None, dtype: str | None, max_tiles: int | None, allow_urls: bool,
             generation: Mapping[str, Any], placement: Mapping[str, Any], progress: Any = None) -> ChatSession:
        """Make the chat model and load its weights now, so errors surface before the first question.

        `placement` holds ChatNVLM's placement fields (device_map, max_memory, context_length,
        batch_size, quantization, tensor_parallel, compile, download, revision); None or False
        values are left out.
        `progress` goes to `ChatNVLM.load` (None: the engine's default, a bar on a terminal).
        """
        options = {k: v for k, v in {**generation, **placement}.items() if v is not None and v is not False}
        llm = ChatNVLM(model=model, dtype=dtype, max_tiles=max_tiles, allow_url_fetch=allow_urls, **options)
        llm.load(progress=progress)
        return cls(llm=llm, system=system)

    def add_image(self, block: dict[str, Any]) -> None:
        """Attach a checked image block to the next message."""
        self.pending.append(block)

    def add_user(self, text: str, blocks: list[dict[str, Any]]) -> None:
        content: list[dict[str, Any]] = [*self.pending, *blocks, {"type": "text", "text": text}]
        self.pending = []
        self.history.append(HumanMessage(content=content))

    def take_back(self) -> str:
        """Undo the last `add_user` after its answer failed: its images are attached again, its text returned."""
        if not self.history or not isinstance(self.history[-1], HumanMessage):
            return ""
        message = self.history.pop()
        blocks = message.content if isinstance(message.content, list) else [message.content]
        texts = [b["text"] for b in blocks if isinstance(b, dict) and b.get("type") == "text"]
        self.pending = [b for b in blocks if isinstance(b, dict) and b.get("type") == "image"] + self.pending
        return "".join(texts) or (message.content if isinstance(message.content, str) else "")

    def answer(self, on_token: Callable[[str], None] | None = None) -> AIMessage:
        """Answer the last user message; streams through `on_token` when given.

        A KeyboardInterrupt while streaming propagates after the stream is closed (the engine
        stops at once); the caller then calls `interrupted()`.
        """
        messages = self._messages()
        if on_token is None:
            reply = self.llm.invoke(messages)
            assert isinstance(reply, AIMessage)
            self.history.append(reply)
            return reply
        total: AIMessageChunk | None = None
        stream = self.llm.stream(messages)
        try:
            for chunk in stream:
                total = chunk if total is None else total + chunk
                if chunk.text:
                    on_token(chunk.text)
        finally:
            stream.close()
        reply = AIMessage(content=total.text if total else "", usage_metadata=total.usage_metadata if total else None,
                          response_metadata=dict(total.response_metadata) if total else {})
        self.history.append(reply)
        return reply

    def interrupted(self) -> None:
        """The answer was stopped: the user's question stays, unanswered, for the next turn to follow."""
        if self.history and isinstance(self.history[-1], HumanMessage):
            self.history.append(AIMessage(content=""))

    def reset(self) -> None:
        self.history.clear()
        self.pending.clear()

    def save(self, path: Path) -> Path:
        """Write the transcript to `path` (`~` expanded); the path written.

        Raises:
            SessionError: the file cannot be written (no such folder, no permission, a folder).
        """
        path = Path(path).expanduser()
        body = {"version": TRANSCRIPT_VERSION, "model": self.llm.model, "system": self.system,
                "messages": messages_to_dict(self.history)}
        try:
            path.write_text(json.dumps(body, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            raise SessionError(f"cannot write {path}: {e.strerror or e}; choose another path") from e
        return path

    def load(self, path: Path) -> None:
        """Resume a transcript written by `save` (its system prompt unless one is set).

        Raises:
            SessionError: not a transcript of this version, or unreadable.
        """
        path = Path(path).expanduser()
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
            if body.get("version") != TRANSCRIPT_VERSION:
                raise SessionError(f"{path} is a transcript of version {body.get('version')!r}; "
                                   f"expected {TRANSCRIPT_VERSION}")
            self.history = list(messages_from_dict(body["messages"]))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise SessionError(f"{path} is not a transcript saved by /save: {e}") from e
        if self.system is None:
            self.system = body.get("system")

    def _messages(self) -> list[BaseMessage]:
        return ([SystemMessage(content=self.system)] if self.system else []) + self.history
