"""The `nvlm-serve` command line: options, the shared exit codes, the port bound before the weights load."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from nvlm_engine import CheckpointError, exit_codes
from nvlm_engine.engine import NVLMEngine
from nvlm_server.cli import main


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """from_pretrained's arguments; it then fails as a missing checkpoint would, ending the command."""
    calls: list[dict] = []

    def fake(cls, path, **kwargs):
        calls.append({"path": path, **kwargs})
        raise CheckpointError(f"no checkpoint at {path} (test)")

    monkeypatch.setattr(NVLMEngine, "from_pretrained", classmethod(fake))
    return calls


def test_help_lists_the_safety_and_placement_options_and_the_exit_codes() -> None:
    result = CliRunner().invoke(main, ["-h"])
    assert result.exit_code == 0
    for option in ("--api-key", "--allow-image-urls", "--allowed-image-host", "--max-queue", "--request-timeout",
                   "--quantization", "--context-length", "--max-batch", "--max-memory", "--gpus", "--cpu-offload",
                   "--download", "--revision", "--version"):
        assert option in result.output
    assert "127.0.0.1" in result.output  # loopback by default
    assert exit_codes.EXIT_CODES_HELP.split(";")[0] in " ".join(result.output.split())


def test_missing_checkpoint_is_one_line_with_the_model_exit_code(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["-m", str(tmp_path / "missing"), "--device-map", "cpu", "--port", "0"])
    assert result.exit_code == exit_codes.MODEL, result.output
    assert "does not exist" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_model_is_required(monkeypatch) -> None:
    monkeypatch.delenv("NVLM_MODEL", raising=False)
    result = CliRunner().invoke(main, [])
    assert result.exit_code == exit_codes.USAGE and "--model" in result.output


def test_a_port_in_use_fails_before_the_weights_load(tiny_checkpoint: Path, loads: list[dict]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["-m", str(tiny_checkpoint), "--port", str(port)])
    assert result.exit_code == exit_codes.NETWORK, result.output
    assert f"127.0.0.1:{port} is in use" in result.output and "Traceback" not in result.output
    assert loads == []


def test_the_port_is_bound_while_the_weights_load_and_flags_reach_the_engine(monkeypatch) -> None:
    with socket.socket() as probe:  # a free port, then released for the server
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    seen: dict = {}

    def fake(cls, path, **kwargs):
        with socket.socket() as again:
            try:
                again.bind(("127.0.0.1", port))
            except OSError as e:
                seen["bound"] = e.errno == errno.EADDRINUSE
        seen.update(kwargs)
        raise CheckpointError("stop here (test)")

    monkeypatch.setattr(NVLMEngine, "from_pretrained", classmethod(fake))
    result = CliRunner().invoke(main, [
        "-m", "org/model", "--port", str(port), "--gpus", "0,1", "--cpu-offload", "100GiB", "--max-memory", "0=70GiB",
        "--max-batch-size", "4", "--quantization", "fp8", "--context-length", "4096", "--revision", "v1", "--download"])
    assert result.exit_code == exit_codes.MODEL, result.output
    assert seen.pop("bound") is True
    assert seen == {"device_map": ["cuda:0", "cuda:1", "cpu"], "max_memory": {0: "70GiB", "cpu": "100GiB"},
                    "context_length": 4096, "batch_size": 4, "quantization": "fp8", "revision": "v1", "download": True,
                    "dtype": "auto", "max_tiles": 6, "progress": "log"}


def test_defaults_reach_the_engine_unchanged(loads: list[dict]) -> None:
    result = CliRunner().invoke(main, ["-m", "/models/x", "--port", "0"])
    assert result.exit_code == exit_codes.MODEL
    assert loads == [{"path": "/models/x", "device_map": "auto", "max_memory": None, "context_length": None,
                      "batch_size": 1, "quantization": None, "dtype": "auto", "max_tiles": 6, "progress": "log"}]


def test_compile_reaches_the_engine_as_decode_settings_only_when_given(loads: list[dict]) -> None:
    from nvlm_engine.cores import DecodeSettings

    for flags in (["--compile"], []):
        result = CliRunner().invoke(main, ["-m", "/models/x", "--port", "0", *flags])
        assert result.exit_code == exit_codes.MODEL, result.output
    compiled, eager = loads
    assert compiled.pop("decoding") == DecodeSettings(compile=True)
    assert "decoding" not in eager  # without the flag the call is unchanged: the engine's eager default
    assert compiled == eager
