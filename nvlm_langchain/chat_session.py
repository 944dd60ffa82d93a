"""A terminal conversation with ChatNVLM: history, images, system prompt, save and resume.

Used by `nvlm-chat`; holds LangChain messages and a `ChatNVLM`, and knows the transcript file
format (JSON: {"version": 1, "model": ..., "system": ..., "messages": [LangChain message dicts]}).
Knows nothing of click or terminals.
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


def image_block(source: str, page: int | None) -> dict[str, Any]:
    """A LangChain image block for a path, URL, or PDF page (`doc.pdf#2` or `page`)."""
    path_text, _, hash_page = source.partition("#")
    if path_text.lower().endswith(".pdf"):
        from .tools.documents import encode_png_base64, load_pages
        from .tools.errors import DocumentInputError

        number = int(hash_page) if hash_page else (page or 1)
        try:
            rendered = load_pages(Path(path_text).expanduser(), pages=number)[0]
        except DocumentInputError as e:
            raise SessionError(str(e)) from e
        return {"type": "image", "base64": encode_png_base64(rendered.image), "mime_type": "image/png"}
    if source.startswith(("http://", "https://")):
        return {"type": "image", "url": source}
    return {"type": "image", "url": str(Path(source).expanduser().resolve())}


@dataclass
class ChatSession:
    """The running conversation."""

    llm: ChatNVLM
    system: str | None = None
    history: list[BaseMessage] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def open(cls, model: str, *, system: str | None, device_map: Any, dtype: str | None, max_tiles: int | None,
             allow_urls: bool, generation: Mapping[str, Any],
             progress: Callable[[Path, int, int], None] | None = None) -> ChatSession:
        """Make the chat model and load its weights now (with `progress`), so errors surface early."""
        options = {k: v for k, v in generation.items() if v is not None}
        llm = ChatNVLM(model=model, device_map=device_map, dtype=dtype, max_tiles=max_tiles,
                       allow_url_fetch=allow_urls, **options)
        llm.load(progress=progress)
        return cls(llm=llm, system=system)

    def add_image(self, source: str, page: int | None) -> None:
        self.pending.append(image_block(source, page))

    def add_user(self, text: str, blocks: list[dict[str, Any]]) -> None:
        content: list[dict[str, Any]] = [*self.pending, *blocks, {"type": "text", "text": text}]
        self.pending = []
        self.history.append(HumanMessage(content=content))

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

    def drop_last_user(self) -> None:
        if self.history and isinstance(self.history[-1], HumanMessage):
            self.history.pop()

    def reset(self) -> None:
        self.history.clear()
        self.pending.clear()

    def save(self, path: Path) -> None:
        body = {"version": TRANSCRIPT_VERSION, "model": self.llm.model, "system": self.system,
                "messages": messages_to_dict(self.history)}
        path.write_text(json.dumps(body, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

    def load(self, path: Path) -> None:
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
            if body.get("version") != TRANSCRIPT_VERSION:
                raise SessionError(f"{path} is a transcript of version {body.get('version')!r}; expected {TRANSCRIPT_VERSION}")
            self.history = list(messages_from_dict(body["messages"]))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise SessionError(f"{path} is not a transcript saved by /save: {e}") from e
        if self.system is None:
            self.system = body.get("system")

    def _messages(self) -> list[BaseMessage]:
        return ([SystemMessage(content=self.system)] if self.system else []) + self.history
