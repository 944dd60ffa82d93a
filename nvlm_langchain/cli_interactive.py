"""`nvlm-chat`'s interactive mode: line editing, history, commands, answers that can be stopped.

On a terminal, lines are read with prompt_toolkit: arrow keys, Ctrl-R search, and a history
file (`~/.nvlm_chat_history`, or the path in NVLM_CHAT_HISTORY; empty: no file). Enter sends;
Esc then Enter (Alt+Enter) starts a new line in the same message, and pasted multi-line text
stays one message. Without a terminal on stdin and stdout, lines are read with `input()`,
one line a message.

Nothing ends the session but /exit or Ctrl-D: a command that fails prints one line; a message
whose answer fails comes back at the prompt, ready to edit, with its images still attached.
Ctrl-C stops an answer (the question stays in the conversation), or clears the line.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .chat_session import ChatSession, SessionError
from .cli_images import ImageRefError, check_image, parse_image_ref
from .cli_output import AnswerWriter, timing_line

__all__ = ["HELP", "HISTORY_ENV", "interactive", "make_reader"]

HISTORY_ENV = "NVLM_CHAT_HISTORY"
DEFAULT_HISTORY = "~/.nvlm_chat_history"

HELP = """Commands:
  /image PATH[#PAGE]  attach an image (or a PDF page) to your next message; checked now
                      (quote paths with spaces: /image "my scan.pdf#2"); /image alone lists them
  /system [TEXT]      set the system prompt (keeps the conversation); alone: show it;
                      /system --default: back to the model's default
  /reset              forget the conversation and attachments (keeps the system prompt)
  /save FILE          save the transcript as JSON (~ and quotes work; resume with --load FILE)
  /help               this help
  /exit               leave (Ctrl-D works too)
Enter sends; Esc then Enter (or Alt+Enter) adds a line. Ctrl-C stops an answer or clears the line.
Start a message with // to send a text beginning with /."""

Reader = Callable[[str], str]
"""Reads one message; the argument is text to start the line with. Raises EOFError, KeyboardInterrupt."""


def make_reader() -> Reader:
    """prompt_toolkit on a terminal (history file, Esc+Enter for a new line), else plain `input()`."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return _plain_input
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, History, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _newline(event: Any) -> None:
        event.current_buffer.insert_text("\n")

    history: History = InMemoryHistory()
    path_text = os.environ.get(HISTORY_ENV, DEFAULT_HISTORY)
    if path_text:
        path = Path(path_text).expanduser()
        try:
            path.touch(exist_ok=True)
            history = FileHistory(str(path))
        except OSError as e:
            click.echo(f"Warning: history not saved: cannot write {path} ({e.strerror}); set {HISTORY_ENV}", err=True)
    session: PromptSession[str] = PromptSession(history=history, key_bindings=bindings, multiline=False,
                                                prompt_continuation="... ")
    return lambda default: session.prompt(">>> ", default=default)


def _plain_input(default: str) -> str:
    """One line from `input()`, the prompt on stderr (stdout may be a file collecting the answers)."""
    if default:
        click.echo(f"(your last message: {default})", err=True)
    sys.stderr.write(">>> ")
    sys.stderr.flush()
    return input()


def interactive(session: ChatSession, *, reader: Reader, max_tiles: int | None, allow_urls: bool,
                verbose: bool) -> None:
    """Chat until /exit or Ctrl-D."""
    click.echo("nvlm-chat: type a message; /help for commands, Ctrl-D to leave.", err=True)
    writer = AnswerWriter()
    draft = ""  # text given back to the prompt: a failed message, a mistyped command
    while True:
        try:
            text = reader(draft)
        except EOFError:
            click.echo("", err=True)
            return
        except KeyboardInterrupt:
            draft = ""
            continue
        draft = ""
        if not text.strip():
            continue
        if text.startswith("/") and not text.startswith("//"):
            try:
                keep_going, draft = _command(session, text.strip(), max_tiles=max_tiles, allow_urls=allow_urls)
            except KeyboardInterrupt:
                keep_going = True
            except Exception as e:  # noqa: BLE001 (a failing command never ends the session)
                click.echo(f"Error: {e}", err=True)
                keep_going = True
            if not keep_going:
                return
            continue
        draft = _ask(session, text[1:] if text.startswith("//") else text, writer, verbose=verbose)


def _ask(session: ChatSession, text: str, writer: AnswerWriter, *, verbose: bool) -> str:
    """Send one message and stream its answer; the text to give back to the prompt ("" on success)."""
    session.add_user(text, [])
    started = time.perf_counter()
    try:
        answer = session.answer(on_token=writer.write)
    except KeyboardInterrupt:
        session.interrupted()
        click.echo("\n[stopped]", err=True)
        return ""
    except (BrokenPipeError, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 (a failing answer gives the message back)
        if not writer.ended_with_newline:
            writer.end()
        session.take_back()
        attached = f"; its {len(session.pending)} image(s) stay attached" if session.pending else ""
        click.echo(f"Error: {_one_line(e)}\n(your message is back at the prompt{attached})", err=True)
        return text
    writer.end()
    if verbose:
        click.echo(timing_line(answer, started), err=True)
    return ""


def _command(session: ChatSession, line: str, *, max_tiles: int | None, allow_urls: bool) -> tuple[bool, str]:
    """Run a /command: (keep going?, text to give back to the prompt)."""
    name, _, rest = line.partition(" ")
    rest = rest.strip()
    if name in ("/exit", "/quit"):
        return False, ""
    if name == "/help":
        click.echo(HELP, err=True)
    elif name == "/reset":
        session.reset()
        click.echo("conversation cleared", err=True)
    elif name == "/system":
        _system(session, rest)
    elif name == "/image":
        _image(session, rest, max_tiles=max_tiles, allow_urls=allow_urls)
    elif name == "/save":
        paths = _arguments(rest)
        if len(paths) != 1:
            click.echo("Error: /save takes one file name (quote it if it has spaces)", err=True)
        else:
            try:
                click.echo(f"saved to {session.save(Path(paths[0]))}", err=True)
            except SessionError as e:
                click.echo(f"Error: {e}", err=True)
    else:
        click.echo(f"Error: unknown command {name}; /help lists them (start with // to send text beginning with /)",
                   err=True)
        return True, line
    return True, ""


def _system(session: ChatSession, text: str) -> None:
    if text == "--default":
        session.system = None
        click.echo("system prompt: the model's default", err=True)
    elif text:
        session.system = text
        click.echo(f"system prompt set: {text}", err=True)
    else:
        click.echo(f"system prompt: {session.system if session.system else '(the model default)'}", err=True)


def _image(session: ChatSession, rest: str, *, max_tiles: int | None, allow_urls: bool) -> None:
    names = _arguments(rest)
    if not names:
        count = len(session.pending)
        click.echo(f"{count} image(s) attached to your next message" if count else "no image attached", err=True)
        return
    for name in names:
        try:
            session.add_image(check_image(parse_image_ref(name), max_tiles=max_tiles, allow_urls=allow_urls))
        except ImageRefError as e:
            click.echo(f"Error: {e} (not attached; {len(session.pending)} image(s) stay attached)", err=True)
            continue
        click.echo(f"attached {name} to your next message", err=True)


def _arguments(text: str) -> list[str]:
    """Shell-like words: quotes group, backslashes escape; unbalanced quotes are an error."""
    try:
        return shlex.split(text)
    except ValueError as e:
        raise SessionError(f"{e} in {text!r}; close the quote") from e


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
