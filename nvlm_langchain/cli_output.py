"""What `nvlm-chat` writes: answers that cannot drive the terminal, JSON summaries, timing lines.

Model output is untrusted text: an answer holding ESC or CSI bytes could move the cursor,
retitle the window or hide what was printed. `AnswerWriter` escapes C0 and C1 control
characters (all but newline and tab) as `\\xNN` when it writes to a terminal; a pipe or file
gets the text unchanged. JSON output escapes them always (`json_text`).
Knows nothing of click or LangChain beyond reading an `AIMessage`'s fields.
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import IO, Any

__all__ = ["AnswerWriter", "for_terminal", "json_text", "summary", "timing_line"]

_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 but \t and \n, DEL, C1


def for_terminal(text: str) -> str:
    """`text` with every control character but newline and tab written as a visible `\\xNN`."""
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class AnswerWriter:
    """Writes answer text to stdout as it streams, flushed per piece; escaped on a terminal."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.terminal = _is_terminal(self.stream)
        self.ended_with_newline = True

    def write(self, text: str) -> None:
        if not text:
            return
        self.stream.write(for_terminal(text) if self.terminal else text)
        self.stream.flush()
        self.ended_with_newline = text.endswith("\n")

    def end(self) -> None:
        """Finish the answer's line."""
        self.stream.write("\n")
        self.stream.flush()
        self.ended_with_newline = True


def json_text(body: Any) -> str:
    """Compact JSON with non-ASCII kept readable but C1 controls escaped (JSON escapes C0 itself)."""
    text = json.dumps(body, ensure_ascii=False)
    return re.sub("[\x7f-\x9f]", lambda m: f"\\u{ord(m.group()):04x}", text)


def summary(answer: Any, started: float) -> dict[str, Any]:
    """The one JSON object of `--json`: text, finish_reason, usage, timings."""
    usage = answer.usage_metadata or {}
    meta = answer.response_metadata or {}
    return {
        "text": answer.text,
        "finish_reason": meta.get("finish_reason"),
        "usage": {"prompt_tokens": usage.get("input_tokens"), "completion_tokens": usage.get("output_tokens"),
                  "total_tokens": usage.get("total_tokens")},
        "timings": {**(meta.get("timings") or {}), "wall": round(time.perf_counter() - started, 4)},
    }


def timing_line(answer: Any, started: float) -> str:
    """`[N prompt + M answer tokens in S s, first token F s]` for --verbose."""
    usage = answer.usage_metadata or {}
    seconds = time.perf_counter() - started
    tokens = usage.get("output_tokens", 0)
    first = (answer.response_metadata or {}).get("timings", {}).get("first_token")
    first_text = f", first token {first:.2f}s" if isinstance(first, (int, float)) else ""
    return f"[{usage.get('input_tokens', 0)} prompt + {tokens} answer tokens in {seconds:.2f}s{first_text}]"
