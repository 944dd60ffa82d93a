"""`nvlm-chat`'s inputs, checked before any weight loads: the prompt and stdin, -o options, images.

- The prompt: the words given, then a blank line and stdin when stdin is piped (as `llm`
  does); nothing at all on a non-terminal, or an empty argument, is a usage error.
- `-o key value`: any generation option, converted and checked by the engine's own rules.
- `-i`: `ImageSource` parses the name (`cli_images.parse_image_ref`) while the flags are read.

Errors are click exceptions carrying the exit-code table's code (`exit_codes.py`).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import IO, Any

import click

from nvlm_engine.exit_codes import INPUT

from .cli_images import ImageRef, ImageRefError, parse_image_ref

__all__ = ["GENERATION_OPTIONS", "CommandError", "ImageSource", "generation_options", "read_prompt"]

GENERATION_OPTIONS: dict[str, type] = {
    "temperature": float, "top_p": float, "top_k": int, "max_tokens": int, "seed": int,
    "repetition_penalty": float, "presence_penalty": float, "frequency_penalty": float, "stop": str,
}
"""What `-o key value` sets (ChatNVLM's field names); `stop` may be repeated."""


class CommandError(click.ClickException):
    """One line on stderr ("Error: ...") and an exit code from the table."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ImageSource(click.ParamType):
    """`-i`: a file (`doc.pdf#2` for a PDF page) or an http(s) URL; the name is checked here, the pixels later."""

    name = "image"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> ImageRef:
        if isinstance(value, ImageRef):
            return value
        try:
            return parse_image_ref(str(value))
        except ImageRefError as e:
            self.fail(str(e), param, ctx)


def read_prompt(words: Sequence[str], stdin: IO[str], *, stdin_is_terminal: bool) -> str | None:
    """The one-shot prompt, or None for the interactive mode (no words, stdin a terminal).

    Piped stdin is read whole and appended after the words and a blank line.

    Raises:
        click.UsageError: the prompt is empty (an empty argument, or nothing on a non-terminal stdin).
        CommandError: stdin is not UTF-8 text (exit INPUT).
    """
    text = " ".join(words).strip()
    if stdin_is_terminal:
        if not words:
            return None
        piped = ""
    else:
        try:
            piped = stdin.read().strip()
        except UnicodeDecodeError as e:
            raise CommandError("stdin is not UTF-8 text; pass images and PDFs with -i FILE", INPUT) from e
    prompt = f"{text}\n\n{piped}" if text and piped else text or piped
    if not prompt:
        where = "an empty argument" if words else "no prompt and nothing on stdin"
        raise click.UsageError(f"empty prompt ({where}): give one as an argument or pipe it on stdin; "
                               "run nvlm-chat in a terminal without a prompt to chat interactively")
    return prompt


def generation_options(flags: Mapping[str, Any], pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """The generation options: `flags` (None = unset), then each `-o key value` over them; checked.

    Raises:
        click.UsageError: an unknown key (the message names the nearest ones).
        CommandError: a value of the wrong type or out of range (exit INPUT).
    """
    options = {key: value for key, value in flags.items() if value is not None}
    stops: list[str] = []
    for raw_key, raw_value in pairs:
        key = raw_key.strip().replace("-", "_")
        kind = GENERATION_OPTIONS.get(key)
        if kind is None:
            near = difflib.get_close_matches(key, GENERATION_OPTIONS, n=2)
            hint = f"did you mean {' or '.join(near)}? " if near else ""
            raise click.UsageError(f"-o {raw_key}: unknown option; {hint}known: {', '.join(GENERATION_OPTIONS)}")
        if key == "stop":
            stops.append(raw_value)
            continue
        try:
            options[key] = kind(raw_value)
        except ValueError as e:
            noun = "a whole number" if kind is int else "a number"
            raise CommandError(f"-o {key} {raw_value!r}: not {noun}", INPUT) from e
    if stops:
        options["stop"] = stops
    _check(options)
    return options


def _check(options: Mapping[str, Any]) -> None:
    """The engine's own checks of the options (ranges, finiteness), before the weights load."""
    from nvlm_engine import NVLMError
    from nvlm_engine.sampling import make_options

    values = dict(options)
    max_tokens = values.pop("max_tokens", None)
    if max_tokens is not None and max_tokens < 1:
        raise CommandError(f"max_tokens must be >= 1, got {max_tokens}", INPUT)
    try:
        make_options(**({"max_new_tokens": max_tokens} if max_tokens else {}), **values)
    except NVLMError as e:
        raise CommandError(str(e).strip().splitlines()[0], INPUT) from e
