"""Token ids -> text deltas for streaming.

Guarantees, for every delta it hands out:
- no UTF-8 character is split (a token that ends inside a multi-byte character waits for the
  next one);
- no part of a stop string leaks (text that might be the start of a stop string is held back
  until it is clearly not one);
- the concatenated deltas equal the final text, which is stripped at both ends like the
  reference's `response.strip()` (leading whitespace is dropped, trailing whitespace is held
  until more text follows it); a continuation of a given text keeps its leading whitespace
  (`strip_leading=False`).

Knows nothing of models: it needs a tokenizer's `decode` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Decoder(Protocol):
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class TextStream:
    """Incremental detokenizer with stop strings; one per generated sequence."""

    def __init__(self, tokenizer: Decoder, stop: Sequence[str] = (), *, strip_leading: bool = True) -> None:
        self._tokenizer = tokenizer
        self._strip_leading = strip_leading
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._prefix_offset = 0  # ids before this are fully turned into text
        self._read_offset = 0
        self._text = ""  # all complete text so far, left-stripped
        self._emitted = 0  # characters of _text handed out
        self.stopped = False  # a stop string was found

    @property
    def text(self) -> str:
        """The text handed out so far (the final text once `finish()` was called)."""
        return self._text[: self._emitted]

    def push(self, token_id: int) -> str:
        """Add one generated token; returns the text that may be shown now (maybe empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        # Decode a small window of ids: the last complete piece plus the new ids. Decoding the
        # piece with its left context keeps byte-level merges and spaces right.
        before = self._decode(self._ids[self._prefix_offset : self._read_offset])
        after = self._decode(self._ids[self._prefix_offset :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # inside a multi-byte character (or a token with no text): wait
        self._append(after[len(before) :])
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: returns whatever was held back (except trailing whitespace)."""
        if not self.stopped and self._read_offset < len(self._ids):
            rest = self._decode(self._ids[self._prefix_offset :])
            before = self._decode(self._ids[self._prefix_offset : self._read_offset])
            self._append(rest[len(before) :])
            self._read_offset = len(self._ids)
        return self._release(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _append(self, piece: str) -> None:
        if not self._text and self._strip_leading:
            piece = piece.lstrip()
        self._text += piece
        for stop in self._stop:
            # Only the region that could contain a new match needs a look.
            start = max(0, self._emitted - len(stop) + 1)
            at = self._text.find(stop, start)
            if at != -1:
                self._text = self._text[:at]
                self.stopped = True
        if self.stopped:
            self._text = self._text.rstrip()

    def _release(self, *, final: bool) -> str:
        cut = len(self._text)
        if not (final or self.stopped):
            cut -= self._held_stop_prefix()
        # Trailing whitespace waits: the final text is stripped, and a stop string may follow it.
        end = max(len(self._text[:cut].rstrip()), self._emitted)
        delta = self._text[self._emitted : end]
        self._emitted = end
        return delta

    def _held_stop_prefix(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        held = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self._text)), held, -1):
                if self._text.endswith(stop[:n]):
                    held = n
                    break
        return held
