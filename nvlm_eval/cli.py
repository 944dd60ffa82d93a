"""`nvlm-eval`: reproduce the model card's benchmark table against an OpenAI-compatible server.

    nvlm-eval run --base-url http://localhost:8000/v1 --rows chartqa,ocrbench --limit 50
    nvlm-eval report nvlm-eval-results

`run` reads the served model and its tile budget from /v1/models, then runs each row's harness
(lmms-eval for the vision rows, lm-eval for the text rows) as a subprocess, one row at a time,
each into its own folder with per-sample logs; rows whose results are already there are
skipped (resume after an interruption by running the same command again). `report` prints
the card's table side by side with the results and writes it as markdown and a PNG chart.

Errors are one line with an exit code from the project's table (`nvlm_engine/exit_codes.py`);
a traceback only with --debug. Imports only click at start-up (`--help` is instant); the
harnesses are never imported, only run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from nvlm_engine import exit_codes

CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
DEFAULT_OUTPUT = "nvlm-eval-results"


def _default_tasks_dir() -> Path:
    # evaluation/ beside the package in a checkout (pip install -e '.[eval]', how the README installs it)
    return Path(__file__).resolve().parents[1] / "evaluation"


def _fail(message: str, code: int) -> None:
    click.echo(f"nvlm-eval: error: {message}", err=True)
    sys.exit(code)


def _guarded(command: Callable[..., None]) -> Callable[..., None]:
    """Typed errors -> one line and their exit code; Ctrl-C -> 130; anything else too, unless --debug."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        from .errors import EvalError

        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            command(*args, **kwargs)
        except EvalError as e:
            if debug:
                raise
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; run the same command again to resume", exit_codes.INTERRUPTED)
        except Exception as e:  # the last line of defence: one line, not a traceback
            if debug:
                raise
            _fail(f"{type(e).__name__}: {e} (rerun with --debug for the traceback)", exit_codes.code_for(e))

    return wrapper


@click.group(context_settings=CONTEXT_SETTINGS, epilog=exit_codes.EXIT_CODES_HELP)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(package_name="nvlm-langchain", message="%(prog)s %(version)s")
def main(debug: bool) -> None:
    """Reproduce NVLM-D-72B's model card benchmarks against an OpenAI-compatible server (nvlm-serve).

    Needs the harnesses: pip install -e '.[eval]'. See evaluation/README.md.
    """


@main.command(context_settings=CONTEXT_SETTINGS)
@click.option("--base-url", required=True, envvar="NVLM_BASE_URL", metavar="URL",
              help="The server, e.g. http://localhost:8000/v1 (nvlm-serve; vLLM works too).")
@click.option("--rows", "rows_spec", default="default", show_default=True, metavar="KEYS",
              help="Comma-separated rows (see `nvlm-eval rows`), 'default' or 'all'.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Questions per task at most (a quick check).")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUTPUT,
              show_default=True, help="Results folder: one subfolder per row, with per-sample logs.")
@click.option("--concurrency", type=click.IntRange(1, 512), default=8, show_default=True,
              help="Requests in flight at once (nvlm-serve batches them).")
@click.option("--max-tiles", type=click.IntRange(1, 12), default=6, show_default=True,
              help="The tile budget the server must run with (the card's 6; nvlm-serve --max-tiles).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Answer length for the text rows' tasks that set none (the card's 1024).")
@click.option("--api-key", envvar="NVLM_API_KEY", default=None, help="The server's key [env: NVLM_API_KEY].")
@click.option("--tasks-dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Folder with lmms_tasks/ (and lm_tasks/) task YAMLs [default: this checkout's evaluation/].")
@click.option("--rows-file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="JSON file with more rows (same fields as nvlm_eval/card.json).")
@click.option("--force", is_flag=True, help="Rerun rows that already have results (replacing them).")
@click.option("-q", "--quiet", is_flag=True, help="Keep the harnesses' output in the logs only.")
@_guarded
def run(base_url: str, rows_spec: str, limit: int | None, output: Path, concurrency: int, max_tiles: int,
        max_tokens: int, api_key: str | None, tasks_dir: Path | None, rows_file: Path | None, force: bool,
        quiet: bool) -> None:
    """Run the card's rows against the server; skip rows whose results exist (resume)."""
    from .errors import EvalError, HarnessFailedError, SettingsError
    from .harness import RunSettings, check_harness, harness_command, previous_result, run_row
    from .rows import load_rows, select_rows
    from .server import probe

    rows = select_rows(load_rows(rows_file), rows_spec)
    server = probe(base_url, api_key=api_key)
    if server.max_tiles is None:
        click.echo(f"nvlm-eval: {server.base} does not report its tile budget; make sure it uses {max_tiles} tiles "
                   "per image (nvlm-serve --max-tiles; vLLM --mm-processor-kwargs '{\"max_dynamic_patch\": N}')", err=True)
    elif server.max_tiles != max_tiles:
        raise SettingsError(f"the server's tile budget is {server.max_tiles}, not {max_tiles}: restart it with "
                            f"nvlm-serve --max-tiles {max_tiles}, or pass --max-tiles {server.max_tiles} to evaluate it as is")
    settings = RunSettings(output=output.resolve(), tasks_dir=(tasks_dir or _default_tasks_dir()).resolve(),
                           limit=limit, concurrency=concurrency, max_tokens=max_tokens, api_key=api_key)
    # 1. what is done already (a row with results for other settings stops the run here, before any work)
    done = {row.key: None if force else previous_result(row, settings, server) for row in rows}
    pending = [row for row in rows if done[row.key] is None]
    for harness in sorted({row.harness for row in pending if row.harness}):
        check_harness(harness)
    for row in pending:
        harness_command(row, server, settings)  # checks the task folder and the model name, before any run
    # 2. the rest, one row at a time
    click.echo(f"nvlm-eval: {server.model} at {server.base}, {len(rows)} row(s) -> {settings.output}", err=True)
    failures = []
    for number, row in enumerate(rows, 1):
        head = f"nvlm-eval: [{number}/{len(rows)}] {row.key}"
        if (before := done[row.key]) is not None:
            click.echo(f"{head}: done before, {_score(row, before.score)} (skipped; --force reruns it)", err=True)
            continue
        click.echo(f"{head}: {row.harness} {','.join(row.tasks)} (log: {settings.output / row.key / 'harness.log'})",
                   err=True)
        started = time.monotonic()
        try:
            result = run_row(row, server, settings, echo=None if quiet else getattr(sys.stderr, "buffer", None))
        except EvalError as e:  # one row failing does not stop the others
            failures.append(e)
            click.echo(f"{head}: failed: {e}", err=True)
            continue
        card = row.card.get("hf")
        gap = f", card {_score(row, card)}, gap {result.score - card:+.1f}" if card is not None else ""
        click.echo(f"{head}: {_score(row, result.score)} on {result.samples or '?'} questions{gap} "
                   f"in {time.monotonic() - started:.0f} s", err=True)
    click.echo(f"nvlm-eval: results in {settings.output}; table: nvlm-eval report {settings.output}", err=True)
    if len(failures) == 1:
        raise failures[0]
    if failures:
        raise HarnessFailedError(f"{len(failures)} rows failed: " + "; ".join(str(f) for f in failures))


def _score(row: Any, value: float) -> str:
    return f"{value:.0f}" if row.scale >= 1000 else f"{value:.1f}"


@main.command(context_settings=CONTEXT_SETTINGS)
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the chart [default: FOLDER/report.png].")
@click.option("--rows-file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="JSON file with more rows (rows run from one are also read back from their records).")
@_guarded
def report(folder: Path, png: Path | None, rows_file: Path | None) -> None:
    """Print the card's table beside the results in FOLDER; write FOLDER/report.md and a PNG chart."""
    from .report import collect, draw_chart, markdown

    lines, records = collect(folder, rows_file)
    text = markdown(lines, records)
    click.echo(text, nl=False)
    (folder / "report.md").write_text(text, encoding="utf-8")
    chart = draw_chart(lines, png or folder / "report.png")
    click.echo(f"nvlm-eval: wrote {folder / 'report.md'} and {chart}", err=True)


@main.command(context_settings=CONTEXT_SETTINGS)
@click.option("--rows-file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="JSON file with more rows.")
@_guarded
def rows(rows_file: Path | None) -> None:
    """List the card's rows: key, harness task, default or not, status."""
    from .rows import load_rows

    for row in load_rows(rows_file):
        task = f"{row.harness} {','.join(row.tasks)}" if row.runnable else "—"
        click.echo(f"{row.key:<12} {'default' if row.default else '       '}  {row.status:<17} {task}")
