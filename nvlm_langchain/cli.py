"""`nvlm-chat`: talk to NVLM-D from a terminal, one-shot or interactively.

    nvlm-chat -m /models/NVLM-D-72B -i invoice.png "What is the total?"
    cat notes.txt | nvlm-chat -m /models/NVLM-D-72B "Summarize:"   # the prompt, a blank line, then stdin
    nvlm-chat -m /models/NVLM-D-72B            # interactive: /image, /system, /reset, /save, /help, /exit
    nvlm-chat --demo "hi"                      # a tiny random model: see the pipeline work, no weights

Everything that can be checked is checked before the weights load (flags, -o values, images
decoded and tiled, PDF pages rendered, the prompt and stdin). Answers go to stdout (control
characters escaped on a terminal), progress and timings to stderr. Errors are one line and an
exit code from the shared table (`nvlm_engine/exit_codes.py`); tracebacks only with --debug.
Imports only click at start-up, so `--help` is instant; the model work is ChatNVLM's.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from nvlm_engine import exit_codes
from nvlm_engine.cli_options import QuietCommand, placement_from_options, placement_options, version_option

from .cli_images import ImageRef, ImageRefError, PageConflictError, apply_page, check_image
from .cli_inputs import GENERATION_OPTIONS, CommandError, ImageSource, generation_options, read_prompt

DEMO_NOTICE = "demo mode: a tiny model with RANDOM weights; its answers are noise. Use -m PATH for NVLM-D."
DEMO_MAX_TOKENS = 64

EPILOG = f"""Piped stdin is appended to the prompt: the prompt, a blank line, then stdin
(`cat notes.txt | nvlm-chat -m M "Summarize:"`); stdin alone is the prompt. An empty prompt
with nothing on stdin is an error; with no prompt in a terminal, nvlm-chat is interactive
(/help there lists its commands; Esc then Enter adds a line; --json is refused there).

-o KEY VALUE sets any generation option, repeatable, over the flags: {", ".join(GENERATION_OPTIONS)}
(-o stop may repeat). Example: -o temperature 0.7 -o top_p 0.9 -o stop "###"."""


@click.command(cls=QuietCommand, epilog=EPILOG)
@version_option()
@click.argument("prompt", nargs=-1)
@click.option("-m", "--model", envvar="NVLM_MODEL",
              help="NVLM-D checkpoint folder or Hugging Face id (env NVLM_MODEL).")
@click.option("-i", "--image", "images", multiple=True, type=ImageSource(),
              help="Image path, URL (with --allow-urls) or PDF page (doc.pdf#2); repeatable.")
@click.option("--page", type=click.IntRange(1), default=None,
              help="Page of the PDFs given with -i that name none (default 1).")
@click.option("-s", "--system", help="System prompt (default: the model card's 'Answer the questions.').")
@click.option("--max-tokens", type=click.IntRange(1), default=None,
              help=f"Answer length limit (default 1024; {DEMO_MAX_TOKENS} with --demo).")
@click.option("--temperature", type=click.FloatRange(0), default=None, help="0 is greedy. [default: 0]")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None)
@click.option("--seed", type=int, default=None)
@click.option("-o", "--option", "options", type=(str, str), multiple=True, metavar="KEY VALUE",
              help="A generation option (see below), repeatable.")
@click.option("--max-tiles", type=click.IntRange(1, 12), default=None, help="Tiles per request (1..12).")
@click.option("--device-map", default="auto", show_default=True, help="auto, cpu, cuda:0, or cuda:0,cuda:1.")
@click.option("--dtype", default=None, help="bfloat16, float16 or float32 (default: bf16 on GPU, fp32 on CPU).")
@placement_options()
@click.option("--allow-urls", is_flag=True, help="Allow http(s) image URLs.")
@click.option("--no-stream", is_flag=True, help="Print the answer when it is complete.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text, usage, timings (one-shot only).")
@click.option("--load", "load_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Resume a transcript saved with /save.")
@click.option("--demo", is_flag=True,
              help=f"Build and use a tiny random checkpoint (output is noise; {DEMO_MAX_TOKENS} tokens). Not with -m.")
@click.option("-v", "--verbose", is_flag=True, help="Timings and loading details on stderr.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def main(ctx: click.Context, prompt: tuple[str, ...], model: str | None, images: tuple[ImageRef, ...],
         page: int | None, system: str | None, max_tokens: int | None, temperature: float | None,
         top_p: float | None, seed: int | None, options: tuple[tuple[str, str], ...], max_tiles: int | None,
         device_map: str, dtype: str | None, allow_urls: bool, no_stream: bool, as_json: bool,
         load_file: Path | None, demo: bool, verbose: bool, debug: bool, **placement_flags: Any) -> None:
    """Ask NVLM-D about images and documents. With no PROMPT in a terminal: interactive chat."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    # 1. Flags, prompt, options: nothing heavy is imported yet.
    if demo and model and ctx.get_parameter_source("model") == click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError(f"--demo uses a tiny random model, -m names {model!r}: drop one of them")
    if not demo and not model:
        raise click.UsageError("no model: pass -m PATH (or set NVLM_MODEL), or --demo to try a tiny random one")
    if any(ref.is_url for ref in images) and not allow_urls:
        raise click.UsageError("image URLs are off; pass --allow-urls to fetch them")
    try:
        refs = apply_page(images, page)
    except PageConflictError as e:
        raise click.UsageError(str(e)) from e
    placement = placement_from_options(placement_flags)
    # ChatNVLM's field is compile=True, not from_pretrained's decoding=DecodeSettings(...) (and no torch yet)
    arguments = {**replace(placement, compile=False).arguments(_device_map(device_map)), "compile": placement.compile}
    text = read_prompt(prompt, sys.stdin, stdin_is_terminal=_is_terminal(sys.stdin))
    if text is None and as_json:
        raise click.UsageError("--json prints one answer: give a prompt (argument or stdin), or drop --json "
                               "for the interactive mode")
    if demo and max_tokens is None:
        max_tokens = DEMO_MAX_TOKENS
    generation = generation_options({"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                                     "seed": seed}, options)
    try:
        # 2. Images decoded and tiled, PDF pages rendered: still before the weights.
        blocks = [check_image(ref, max_tiles=max_tiles, allow_urls=allow_urls) for ref in refs]
        # 3. The weights, then the conversation.
        from .chat_session import ChatSession

        if demo:
            model = _demo_checkpoint()
            click.echo(DEMO_NOTICE, err=True)
        assert model is not None
        session = ChatSession.open(model, system=system, dtype=dtype, max_tiles=max_tiles, allow_urls=allow_urls,
                                   generation=generation, placement=arguments,
                                   progress="log" if verbose and not _is_terminal(sys.stderr) else None)
        if verbose:
            click.echo(_describe_placement(session), err=True)
        if load_file is not None:
            session.load(load_file)
        if text is not None:
            _one_shot(session, text, blocks, stream=not (no_stream or as_json), as_json=as_json, verbose=verbose)
            return
        from .cli_interactive import interactive, make_reader

        for block in blocks:
            session.add_image(block)
        interactive(session, reader=make_reader(), max_tiles=max_tiles, allow_urls=allow_urls, verbose=verbose)
    except (click.ClickException, BrokenPipeError):
        raise
    except Exception as e:
        if debug:
            raise
        raise _fail(e) from e


def _one_shot(session: Any, text: str, blocks: list[dict[str, Any]], *, stream: bool, as_json: bool,
              verbose: bool) -> None:
    from .cli_output import AnswerWriter, json_text, summary, timing_line

    writer = AnswerWriter()
    session.add_user(text, blocks)
    started = time.perf_counter()
    answer = session.answer(on_token=writer.write if stream else None)
    if as_json:
        click.echo(json_text(summary(answer, started)))
        return
    if not stream:
        writer.write(answer.text)
    writer.end()
    if verbose:
        click.echo(timing_line(answer, started), err=True)


def _describe_placement(session: Any) -> str:
    model = session.llm.engine.model
    devices = sorted({str(p.device) for p in model.parameters()})
    dtype = str(next(model.language_model.parameters()).dtype).removeprefix("torch.")
    return f"model on {', '.join(devices)} ({dtype})"


def _device_map(value: str) -> str | list[str]:
    return [v.strip() for v in value.split(",")] if "," in value else value


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _demo_checkpoint() -> str:
    from nvlm_engine.testing import build_tiny_checkpoint

    folder = Path(tempfile.gettempdir()) / "nvlm-chat-demo"
    if not (folder / "config.json").is_file():
        click.echo(f"building a tiny random checkpoint in {folder} ...", err=True)
        build_tiny_checkpoint(folder)
    return str(folder)


def _fail(error: BaseException) -> CommandError:
    """One line for an error that ended the command, with the table's exit code."""
    code = exit_codes.code_for(error)
    message = str(error).strip() or type(error).__name__
    if isinstance(error, ImageRefError):
        code = exit_codes.INPUT
    if code == exit_codes.RESOURCES and "out of memory" in message.lower():
        message = message.splitlines()[0] + (
            " | use more GPUs (--gpus 0,1), --quantization bnb-8bit, a shorter --context-length or fewer "
            "--max-tiles; `nvlm-engine plan` shows what fits")
    if code == exit_codes.FAILURE:
        message = f"{type(error).__name__}: {message} (unexpected: rerun with --debug and report it)"
    return CommandError(message.splitlines()[0] if len(message) > 400 else message, code)


if __name__ == "__main__":
    main()
