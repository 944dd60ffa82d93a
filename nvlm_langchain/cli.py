"""`nvlm-chat`: talk to NVLM-D from a terminal, one-shot or interactively.

    nvlm-chat -m /models/NVLM-D-72B -i invoice.png "What is the total?"
    cat question.txt | nvlm-chat -m /models/NVLM-D-72B -i scan.pdf#2
    nvlm-chat -m /models/NVLM-D-72B            # interactive: /image, /system, /reset, /save, /help, /exit
    nvlm-chat --demo "hi"                      # a tiny random model: see the pipeline work, no weights

Answers go to stdout, progress and timings to stderr. Library errors become one line and a
non-zero exit code (tracebacks only with --debug). Knows click and ChatNVLM; the model work is
ChatNVLM's.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
from langchain_core.messages import AIMessage

from nvlm_engine import NVLMError

from .chat_session import ChatSession, SessionError, image_block

EXIT_USAGE, EXIT_INPUT, EXIT_MODEL, EXIT_RESOURCES = 2, 3, 4, 5
DEMO_NOTICE = "demo mode: a tiny model with RANDOM weights; its answers are noise. Use -m PATH for NVLM-D."


class ImageSource(click.ParamType):
    """A path (optionally `file.pdf#PAGE`), or an http(s) URL; checked before the model loads."""

    name = "image"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        if text.startswith(("http://", "https://")):
            return text
        path_text, _, page = text.partition("#") if text.lower().split("#")[0].endswith(".pdf") else (text, "", "")
        path = Path(path_text).expanduser()
        if not path.is_file():
            self.fail(f"{path_text!r} is not a file", param, ctx)
        if page and not page.isdigit():
            self.fail(f"page {page!r} in {text!r} is not a page number (use file.pdf#2)", param, ctx)
        return text


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("prompt", nargs=-1)
@click.option("-m", "--model", envvar="NVLM_MODEL", help="NVLM-D checkpoint folder (env NVLM_MODEL).")
@click.option("-i", "--image", "images", multiple=True, type=ImageSource(),
              help="Image path, URL (with --allow-urls) or PDF page (doc.pdf#2); repeatable.")
@click.option("--page", type=click.IntRange(1), default=None, help="Page of a PDF given with -i (default 1).")
@click.option("-s", "--system", help="System prompt (default: the model card's 'Answer the questions.').")
@click.option("--max-tokens", type=click.IntRange(1), default=None, help="Answer length limit (default 1024).")
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None)
@click.option("--seed", type=int, default=None)
@click.option("--max-tiles", type=click.IntRange(1, 12), default=None, help="Tiles per request (1..12).")
@click.option("--device-map", default="auto", show_default=True, help="auto, cpu, cuda:0, or cuda:0,cuda:1.")
@click.option("--dtype", default=None, help="bfloat16, float16 or float32 (default: bf16 on GPU, fp32 on CPU).")
@click.option("--allow-urls", is_flag=True, help="Allow http(s) image URLs.")
@click.option("--no-stream", is_flag=True, help="Print the answer when it is complete.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text, usage, timings.")
@click.option("--load", "load_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Resume a transcript saved with /save.")
@click.option("--demo", is_flag=True, help="Build and use a tiny random checkpoint (output is noise).")
@click.option("-v", "--verbose", is_flag=True, help="Timings and loading details on stderr.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(prompt: tuple[str, ...], model: str | None, images: tuple[str, ...], page: int | None, system: str | None,
         max_tokens: int | None, temperature: float, top_p: float | None, seed: int | None, max_tiles: int | None,
         device_map: str, dtype: str | None, allow_urls: bool, no_stream: bool, as_json: bool, load_file: Path | None,
         demo: bool, verbose: bool, debug: bool) -> None:
    """Ask NVLM-D about images and documents. With no PROMPT (and nothing on stdin): interactive chat."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if any(u.startswith(("http://", "https://")) for u in images) and not allow_urls:
            raise click.UsageError("image URLs are off; pass --allow-urls to fetch them")
        if demo:
            model = _demo_checkpoint()
            click.echo(DEMO_NOTICE, err=True)
        if not model:
            raise click.UsageError("no model: pass -m PATH (or set NVLM_MODEL), or --demo to try a tiny random one")
        session = ChatSession.open(
            model, system=system, device_map=_device_map(device_map), dtype=dtype, max_tiles=max_tiles,
            allow_urls=allow_urls, generation={"max_tokens": max_tokens, "temperature": temperature,
                                               "top_p": top_p, "seed": seed},
            progress=_LoadProgress() if sys.stderr.isatty() or verbose else None,
        )
        if verbose:
            click.echo(_describe_placement(session), err=True)
        if load_file is not None:
            session.load(load_file)
        text = " ".join(prompt)
        if not text and not sys.stdin.isatty():
            text = sys.stdin.read().strip()
        if text or images and not sys.stdin.isatty():
            _one_shot(session, text, [image_block(src, page) for src in images], stream=not (no_stream or as_json),
                      as_json=as_json, verbose=verbose)
        else:
            for src in images:
                session.add_image(src, page)
            _interactive(session, verbose=verbose)
    except click.ClickException:
        raise
    except (NVLMError, SessionError, ValueError, OSError) as e:
        if debug:
            raise
        raise _fail(e) from e
    except Exception as e:  # out of memory and other runtime failures: one line unless --debug
        if debug:
            raise
        raise _fail(e) from e


def _one_shot(session: ChatSession, text: str, blocks: list[dict[str, Any]], *, stream: bool, as_json: bool,
              verbose: bool) -> None:
    if not text:
        raise click.UsageError("empty prompt: give one as an argument or on stdin")
    session.add_user(text, blocks)
    started = time.perf_counter()
    answer = session.answer(on_token=(lambda t: click.echo(t, nl=False)) if stream else None)
    if as_json:
        click.echo(json.dumps(_summary(answer, started), ensure_ascii=False))
        return
    click.echo("" if stream else answer.text)
    if verbose:
        click.echo(_timing_line(answer, started), err=True)


def _interactive(session: ChatSession, *, verbose: bool) -> None:
    click.echo("nvlm-chat: type a message; /help for commands, Ctrl-D to leave.", err=True)
    pending_images: list[dict[str, Any]] = []
    while True:
        try:
            text = _read_message()
        except EOFError:
            click.echo("", err=True)
            return
        except KeyboardInterrupt:
            click.echo("", err=True)
            continue
        if not text.strip():
            continue
        if text.startswith("/"):
            if not _command(session, text.strip(), pending_images):
                return
            continue
        session.add_user(text, pending_images)
        pending_images = []
        started = time.perf_counter()
        try:
            answer = session.answer(on_token=lambda t: click.echo(t, nl=False))
        except KeyboardInterrupt:
            session.interrupted()
            click.echo("\n[stopped]", err=True)
            continue
        except (NVLMError, ValueError) as e:
            session.drop_last_user()
            click.echo(f"\nError: {e}", err=True)
            continue
        click.echo("")
        if verbose:
            click.echo(_timing_line(answer, started), err=True)


def _read_message() -> str:
    """One message: a line, or several joined when a line ends with a backslash."""
    lines = []
    prompt = ">>> "
    while True:
        line = input(prompt)
        if line.endswith("\\"):
            lines.append(line[:-1])
            prompt = "... "
            continue
        lines.append(line)
        return "\n".join(lines)


HELP = """Commands:
  /image PATH[#PAGE]  attach an image (or a PDF page) to your next message
  /system TEXT        set the system prompt (keeps the conversation)
  /reset              forget the conversation (keeps the system prompt)
  /save FILE          save the transcript as JSON (resume with --load FILE)
  /help               this help
  /exit               leave (Ctrl-D works too; Ctrl-C stops an answer)
End a line with \\ to continue the message on the next line."""


def _command(session: ChatSession, line: str, pending_images: list[dict[str, Any]]) -> bool:
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/help":
        click.echo(HELP, err=True)
    elif name == "/reset":
        session.reset()
        pending_images.clear()
        click.echo("conversation cleared", err=True)
    elif name == "/system":
        session.system = arg or None
        click.echo(f"system prompt: {session.system or '(default)'}", err=True)
    elif name == "/image":
        try:
            ImageSource().convert(arg, None, None)
            pending_images.append(image_block(arg, None))
            click.echo(f"attached {arg} to your next message", err=True)
        except click.BadParameter as e:
            click.echo(f"Error: {e.message}", err=True)
    elif name == "/save":
        if not arg:
            click.echo("Error: /save needs a file name", err=True)
        else:
            session.save(Path(arg))
            click.echo(f"saved to {arg}", err=True)
    else:
        click.echo(f"Error: unknown command {name}; /help lists them", err=True)
    return True


def _summary(answer: AIMessage, started: float) -> dict[str, Any]:
    usage = answer.usage_metadata or {}
    meta = answer.response_metadata or {}
    return {
        "text": answer.text,
        "finish_reason": meta.get("finish_reason"),
        "usage": {"prompt_tokens": usage.get("input_tokens"), "completion_tokens": usage.get("output_tokens"),
                  "total_tokens": usage.get("total_tokens")},
        "timings": {**(meta.get("timings") or {}), "wall": round(time.perf_counter() - started, 4)},
    }


def _timing_line(answer: AIMessage, started: float) -> str:
    usage = answer.usage_metadata or {}
    seconds = time.perf_counter() - started
    tokens = usage.get("output_tokens", 0)
    first = (answer.response_metadata or {}).get("timings", {}).get("first_token")
    first_text = f", first token {first:.2f}s" if isinstance(first, (int, float)) else ""
    return f"[{usage.get('input_tokens', 0)} prompt + {tokens} answer tokens in {seconds:.2f}s{first_text}]"


class _LoadProgress:
    """A progress bar on stderr while shards load: shards, bytes read, then where the model went."""

    def __init__(self) -> None:
        self.done_bytes = 0
        self.total_bytes: int | None = None

    def __call__(self, shard: Path, number: int, count: int) -> None:
        if self.total_bytes is None:
            self.total_bytes = sum(p.stat().st_size for p in shard.parent.glob("*.safetensors")) or 1
        self.done_bytes += shard.stat().st_size
        width = 30
        done = int(width * number / count)
        click.echo(f"\rloading [{'#' * done}{'.' * (width - done)}] {number}/{count} shards, "
                   f"{_size(self.done_bytes)}/{_size(self.total_bytes)}", err=True, nl=number == count)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _describe_placement(session: ChatSession) -> str:
    model = session.llm.engine.model
    devices = sorted({str(p.device) for p in model.parameters()})
    dtype = str(next(model.language_model.parameters()).dtype).removeprefix("torch.")
    return f"model on {', '.join(devices)} ({dtype})"


def _device_map(value: str) -> str | list[str]:
    return [v.strip() for v in value.split(",")] if "," in value else value


def _demo_checkpoint() -> str:
    from nvlm_engine.testing import build_tiny_checkpoint

    folder = Path(tempfile.gettempdir()) / "nvlm-chat-demo"
    if not (folder / "config.json").is_file():
        click.echo(f"building a tiny random checkpoint in {folder} ...", err=True)
        build_tiny_checkpoint(folder)
    return str(folder)


def _fail(error: BaseException) -> click.ClickException:
    message = str(error).strip() or type(error).__name__
    if "out of memory" in message.lower():
        message += (" | Placement hint: check `nvlm-engine plan PATH --gpus ...`, use more GPUs "
                    "(--device-map cuda:0,cuda:1), a shorter context, or fewer --max-tiles.")
    exception = click.ClickException(message.splitlines()[0] if len(message) > 400 else message)
    exception.exit_code = EXIT_RESOURCES if "out of memory" in message.lower() else (
        EXIT_MODEL if "checkpoint" in message.lower() or "config.json" in message else EXIT_INPUT)
    return exception


if __name__ == "__main__":
    main()
