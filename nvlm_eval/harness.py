"""Running one row: the harness command line, its subprocess, its log, its record.

The harnesses run as subprocesses (`python -m lmms_eval eval`, `python -m lm_eval run`) in this
interpreter, not through their Python APIs, because:
- their command lines are their documented, stable interface (the same a user would type, and
  the record of each row shows it for copying);
- each run starts clean: lmms-eval keeps module-level state between tasks (OCRBench's scores
  accumulate in a global), both configure logging globally, and a crash or hang in one row
  cannot take nvlm-eval or the next row with it;
- nvlm-eval itself never imports them (`--help` and `report` stay fast, and the rest of the
  project keeps working without the `eval` extra).

A row's folder is `<output>/<row key>/`: the harness writes its results and per-sample logs
there (`--log_samples`), its output goes to `harness.log` (and to the terminal unless quiet),
and `nvlm-eval.json` records the command, the server, the settings and the outcome. Success is
judged by the results file, not the exit status (lmms-eval exits 0 after logging an error).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import HarnessFailedError, HarnessMissingError, SettingsError, TasksDirError
from .results import RowResult, find_results
from .rows import Row
from .server import ServerInfo

__all__ = ["RECORD", "RunSettings", "check_harness", "harness_command", "previous_result", "read_record", "run_row"]

RECORD = "nvlm-eval.json"
_MODULES = {"lmms-eval": "lmms_eval", "lm-eval": "lm_eval"}
_TASK_FOLDERS = {"lmms-eval": "lmms_tasks", "lm-eval": "lm_tasks"}


@dataclass(frozen=True)
class RunSettings:
    """How the rows are run.

    Attributes:
        output: the results folder (one subfolder per row).
        tasks_dir: the folder with `lmms_tasks/` (and `lm_tasks/`) task YAMLs.
        limit: questions per task at most (None: all).
        concurrency: requests in flight at once.
        max_tokens: lm-eval's answer length for tasks that set none (the card's 1024);
            lmms-eval's tasks set their own.
        api_key: the server's key: in lmms-eval's model_args (its environment's OPENAI_API_KEY is
            left to an LLM judge, MathVista's), as OPENAI_API_KEY to lm-eval; never in a record.
        request_timeout_s: per request; 72B answers of 1024 tokens under load take minutes.
        retries: per request, by the harness.
    """

    output: Path
    tasks_dir: Path
    limit: int | None = None
    concurrency: int = 8
    max_tokens: int = 1024
    api_key: str | None = None
    request_timeout_s: int = 600
    retries: int = 3


def check_harness(harness: str) -> None:
    """Raises `HarnessMissingError` unless the harness is importable here (nothing is imported)."""
    if importlib.util.find_spec(_MODULES[harness]) is None:
        raise HarnessMissingError(f"{harness} is not installed in this environment: pip install -e '.[eval]'")


def harness_command(row: Row, server: ServerInfo, settings: RunSettings) -> list[str]:
    """The harness command line that runs the row against the server."""
    assert row.harness is not None  # only runnable rows are run
    if any(c in server.model for c in ",= "):
        raise SettingsError(f"the served model name {server.model!r} has a comma, '=' or space, which the harnesses' "
                            "--model_args cannot carry; serve it under another name (nvlm-serve --served-model-name)")
    if settings.api_key and "," in settings.api_key:
        raise SettingsError("the API key has a comma, which lmms-eval's --model_args cannot carry; use another key")
    folder = str(settings.output / row.key)
    common = (f"model={server.model},num_concurrent={settings.concurrency},timeout={settings.request_timeout_s},"
              f"max_retries={settings.retries}")
    task_dir = _task_dir(row, settings)
    if row.harness == "lmms-eval":
        command = [sys.executable, "-m", "lmms_eval", "eval", "--model", "openai",
                   "--model_args", f"{common},base_url={server.base},api_key={settings.api_key or 'EMPTY'}",
                   "--tasks", ",".join(row.tasks),
                   "--include_path", str(task_dir), "--batch_size", "1"]
    else:
        model_args = (f"{common},base_url={server.chat_completions},tokenized_requests=False,"
                      f"max_gen_toks={settings.max_tokens}")
        command = [sys.executable, "-m", "lm_eval", "run", "--model", "local-chat-completions",
                   "--model_args", model_args, "--tasks", ",".join(row.tasks),
                   "--apply_chat_template", "--fewshot_as_multiturn"]
        if task_dir.is_dir():
            command += ["--include_path", str(task_dir)]
        if row.num_fewshot is not None:
            command += ["--num_fewshot", str(row.num_fewshot)]
        if row.unsafe_code:
            command.append("--confirm_run_unsafe_code")
    command += ["--output_path", folder, "--log_samples"]
    if settings.limit is not None:
        command += ["--limit", str(settings.limit)]
    return command


def _task_dir(row: Row, settings: RunSettings) -> Path:
    folder = settings.tasks_dir / _TASK_FOLDERS[row.harness or ""]
    if row.harness == "lmms-eval" and not any(folder.glob("*.yaml")):
        raise TasksDirError(f"no lmms-eval task YAMLs in {folder}: pass --tasks-dir, the evaluation/ folder of "
                            "this project's checkout")
    return folder


def read_record(row: Row, output: Path) -> dict | None:
    try:
        data = json.loads((output / row.key / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def previous_result(row: Row, settings: RunSettings, server: ServerInfo) -> RowResult | None:
    """The row's results from an earlier run with the same settings (to skip it), or None.

    Raises:
        SettingsError: results exist for another --limit or another model (rerun with --force).
    """
    result = find_results(row, settings.output / row.key)
    if result is None:
        return None
    record = read_record(row, settings.output) or {}
    before = (record.get("limit"), record.get("model"))
    if before != (settings.limit, server.model):
        raise SettingsError(
            f"{settings.output / row.key} holds {row.key} results for limit={before[0]}, model={before[1]!r}, not "
            f"limit={settings.limit}, model={server.model!r}: pass --force to replace them, or use another --output")
    return result


def run_row(row: Row, server: ServerInfo, settings: RunSettings, *, echo: BinaryIO | None) -> RowResult:
    """Runs the row's harness (replacing earlier results of the row) and returns its score.

    Raises:
        HarnessFailedError: the harness wrote no results for the row (see its log).
    """
    check_harness(row.harness or "")
    folder = settings.output / row.key
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    command = harness_command(row, server, settings)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if row.harness == "lm-eval":
        env["OPENAI_API_KEY"] = settings.api_key or "EMPTY"  # what local-chat-completions sends as its bearer token
    if row.unsafe_code:
        env["HF_ALLOW_CODE_EVAL"] = "1"  # HumanEval runs the generated code: the harness asks for both
    shown = [arg.replace(f"api_key={settings.api_key}", "api_key=***") if settings.api_key else arg for arg in command]
    record = {"row": _row_dict(row), "harness": row.harness, "command": shown, "base_url": server.base,
              "model": server.model, "server_max_tiles": server.max_tiles, "limit": settings.limit,
              "concurrency": settings.concurrency, "started": time.time()}
    _write_record(folder, record)
    log = folder / "harness.log"
    returncode = _tee(command, env, folder, log, echo, secret=settings.api_key)
    result = find_results(row, folder)
    record.update(finished=time.time(), returncode=returncode,
                  score=result.score if result else None, samples=result.samples if result else None,
                  results_file=str(result.path) if result else None)
    _write_record(folder, record)
    if result is None:
        raise HarnessFailedError(f"{row.key}: {row.harness} exited with status {returncode} and wrote no "
                                 f"{row.metric} result; its output is in {log}")
    return result


def _tee(command: list[str], env: dict[str, str], cwd: Path, log: Path, echo: BinaryIO | None,
         secret: str | None = None) -> int:
    """Runs the command, its output (progress bars included, as they come) to the log and to `echo`.

    lmms-eval prints its model arguments, the server's key among them: it is written as "***".
    """
    hide = _Redactor(secret.encode() if secret else b"")
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, cwd=cwd)
        assert process.stdout is not None
        try:
            while (chunk := process.stdout.read1(65536)) or hide.pending:
                shown = hide.feed(chunk) if chunk else hide.flush()
                sink.write(shown)
                if echo is not None:
                    echo.write(shown)
                    echo.flush()
            return process.wait()
        except BaseException:  # Ctrl-C or a closed terminal: stop the harness too, then report it
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
            raise


class _Redactor:
    """Replaces a secret in a byte stream read in chunks, holding back the few bytes that may start it."""

    def __init__(self, secret: bytes) -> None:
        self.secret, self.pending = secret, b""

    def feed(self, chunk: bytes) -> bytes:
        if not self.secret:
            return chunk
        data = (self.pending + chunk).replace(self.secret, b"***")
        cut = max(len(data) - (len(self.secret) - 1), 0)  # what follows may still be the start of the secret
        self.pending = data[cut:]
        return data[:cut]

    def flush(self) -> bytes:
        out, self.pending = self.pending, b""
        return out


def _row_dict(row: Row) -> dict:
    data = asdict(row)
    extra = data.pop("extra")
    return {**data, **extra, "tasks": list(row.tasks), "card": dict(row.card)}


def _write_record(folder: Path, record: dict) -> None:
    (folder / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
