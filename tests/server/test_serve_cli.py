"""The `nvlm-serve` command line: options, and a bad checkpoint as one line with a non-zero exit."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from nvlm_server.cli import main


def test_help_lists_the_safety_options() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for option in ("--api-key", "--allow-image-urls", "--allowed-image-host", "--max-queue", "--request-timeout"):
        assert option in result.output
    assert "127.0.0.1" in result.output  # loopback by default


def test_missing_checkpoint_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["-m", str(tmp_path / "missing"), "--device-map", "cpu"])
    assert result.exit_code == 1
    assert "does not exist" in result.output and "Traceback" not in result.output


def test_model_is_required(monkeypatch) -> None:
    monkeypatch.delenv("NVLM_MODEL", raising=False)
    result = CliRunner().invoke(main, [])
    assert result.exit_code == 2 and "--model" in result.output
