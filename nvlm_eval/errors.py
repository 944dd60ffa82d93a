"""The errors `nvlm-eval` reports: one base class, each kind with its exit code and a one-line message.

The codes are the project's table (`nvlm_engine.exit_codes`), so a script can tell a server
that cannot be reached (6) from a bad option (2) or a missing harness (5).
"""

from __future__ import annotations

from nvlm_engine import exit_codes

__all__ = [
    "EvalError",
    "HarnessFailedError",
    "HarnessMissingError",
    "ResultsError",
    "RowsError",
    "ServerError",
    "SettingsError",
    "TasksDirError",
]


class EvalError(Exception):
    """Base of nvlm-eval's errors; `exit_code` is the command's exit status for it."""

    exit_code = exit_codes.FAILURE


class ServerError(EvalError):
    """The server cannot be reached, or its /v1/models answer is not an OpenAI model list."""

    exit_code = exit_codes.NETWORK


class HarnessMissingError(EvalError):
    """lmms-eval or lm-eval is not installed in this environment."""

    exit_code = exit_codes.RESOURCES


class HarnessFailedError(EvalError):
    """A harness run ended without writing the results of its row."""

    exit_code = exit_codes.FAILURE


class RowsError(EvalError):
    """An unknown row, a row that cannot be run, or a malformed rows file."""

    exit_code = exit_codes.USAGE


class SettingsError(EvalError):
    """Settings that contradict the server or earlier results (tile budget, --limit)."""

    exit_code = exit_codes.USAGE


class TasksDirError(EvalError):
    """The folder of task YAMLs is missing or lacks a row's tasks."""

    exit_code = exit_codes.INPUT


class ResultsError(EvalError):
    """A results folder holds no harness results that nvlm-eval can read."""

    exit_code = exit_codes.INPUT
