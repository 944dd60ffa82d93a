"""Token log-probabilities in ChatOpenAI's `response_metadata["logprobs"]` shape.

The engine records `TokenLogprob(token_id, logprob, top)` per generated token (when a request
asks for `logprobs`); OpenAI's chat API, and so ChatOpenAI, report
`{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`.
A token's `bytes` are its exact UTF-8 bytes, which a byte-level BPE token (Qwen2's) may hold
only part of a character of; its `token` is those bytes decoded with replacement characters.

Knows the byte-level BPE alphabet and OpenAI's shape; used by the server's output and by
ChatNVLM's `response_metadata`, so both report the same entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

__all__ = ["logprob_entry", "openai_logprobs", "token_bytes"]


@cache
def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character that stands for each byte in a token's
    string (printable bytes stand for themselves, the others are shifted past 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    shift = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + shift)
            shift += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The exact bytes of one token (an added/special token: its text's UTF-8)."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    alphabet = _byte_of_char()
    if isinstance(piece, str) and piece and all(c in alphabet for c in piece):
        return bytes(alphabet[c] for c in piece)
    return tokenizer.decode([int(token_id)]).encode("utf-8")


def _entry(tokenizer: Any, token_id: int, logprob: float) -> dict[str, Any]:
    raw = token_bytes(tokenizer, token_id)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": float(logprob), "bytes": list(raw)}


def logprob_entry(tokenizer: Any, item: Any) -> dict[str, Any]:
    """One `TokenLogprob` as OpenAI writes it: token, logprob, bytes and its `top_logprobs`."""
    entry = _entry(tokenizer, item.token_id, item.logprob)
    entry["top_logprobs"] = [_entry(tokenizer, t, lp) for t, lp in item.top]
    return entry


def openai_logprobs(tokenizer: Any, logprobs: Sequence[Any]) -> dict[str, Any]:
    """`GenerationResult.logprobs` (a `TokenLogprob` per token) -> `{"content": [...]}` as ChatOpenAI's."""
    return {"content": [logprob_entry(tokenizer, item) for item in logprobs]}
