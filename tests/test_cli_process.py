"""The three commands as real processes: --version, -h without heavy imports, stdin, a reader
that goes away (`| head -c 5`), Ctrl-C at start-up and mid-answer, control bytes on a terminal.

Each process that loads a model costs seconds on a small CPU, so these are few and marked slow
where they load one."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest

from nvlm_engine import exit_codes

BIN = Path(sys.executable).parent
COMMANDS = ("nvlm-chat", "nvlm-serve", "nvlm-engine")
QUIET_FAILURES = ("Traceback", "Broken pipe", "terminate called", "Exception ignored", "Aborted!")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NVLM_MODEL", "NVLM_API_KEY")}
    return {**env, **extra}


@pytest.mark.parametrize("command", COMMANDS)
def test_version_and_short_help(command: str) -> None:
    version = subprocess.run([BIN / command, "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert version.returncode == 0 and re.fullmatch(rf"{command} \d+\.\d+\.\d+\S*\n", version.stdout), version
    helped = subprocess.run([BIN / command, "-h"], capture_output=True, text=True, timeout=60, check=False)
    assert helped.returncode == 0 and "Usage:" in helped.stdout
    assert "Exit codes: 0 success" in " ".join(helped.stdout.split()), helped.stdout


def test_help_imports_nothing_heavy() -> None:
    probe = """
import sys
from click.testing import CliRunner
from nvlm_langchain.cli import main as chat
from nvlm_server.cli import main as serve
from nvlm_engine.cli import main as engine
for command, args in ((chat, ["--help"]), (serve, ["--help"]), (engine, ["--help"]), (engine, ["plan", "-h"])):
    assert CliRunner().invoke(command, args).exit_code == 0
heavy = sorted(m for m in ("torch", "transformers", "langchain_core", "fastapi", "uvicorn", "numpy", "PIL")
               if m in sys.modules)
print(",".join(heavy))
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"--help imported {result.stdout.strip()}"


def test_empty_prompt_without_stdin_is_a_usage_error(tiny_checkpoint: Path) -> None:
    chat = [BIN / "nvlm-chat", "-m", str(tiny_checkpoint)]
    for args, stdin in (([], subprocess.DEVNULL), ([""], None)):
        result = subprocess.run([*chat, *args], stdin=stdin, capture_output=True, text=True, timeout=60, env=_env(),
                                check=False)
        assert result.returncode == exit_codes.USAGE and "empty prompt" in result.stderr, result.stderr


@pytest.mark.slow
def test_piped_stdin_and_a_reader_that_goes_away(tiny_checkpoint: Path) -> None:
    """`printf doc | nvlm-chat "summarize" | head -c 5`: stdin read, then a quiet exit 141."""
    script = (f'printf "long doc" | "{BIN / "nvlm-chat"}" -m "{tiny_checkpoint}" --device-map cpu --max-tokens 400 '
              f'summarize | head -c 5; echo " rc=${{PIPESTATUS[1]}}"')
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300, env=_env(),
                            check=False)
    assert result.stdout.endswith(f" rc={exit_codes.BROKEN_PIPE}\n"), (result.stdout, result.stderr)
    assert len(result.stdout.removesuffix(f" rc={exit_codes.BROKEN_PIPE}\n").encode()) <= 5
    assert not [text for text in QUIET_FAILURES if text in result.stderr], result.stderr


def _wait_for_torch(process: subprocess.Popen, timeout: float = 120) -> None:
    """Until the process has mapped libtorch: it is inside the command, importing the heavy parts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if "libtorch" in Path(f"/proc/{process.pid}/maps").read_text():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("the command never imported torch")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/PID/maps (Linux)")
def test_ctrl_c_at_start_up_and_mid_answer_exits_130_quietly(tiny_checkpoint: Path, tmp_path: Path) -> None:
    serve = subprocess.Popen([BIN / "nvlm-serve", "-m", str(tiny_checkpoint), "--device-map", "cpu", "--port", "0"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    chat = subprocess.Popen([BIN / "nvlm-chat", "-m", str(tiny_checkpoint), "--device-map", "cpu",
                             "--max-tokens", "3000", "Tell me everything."],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _wait_for_torch(serve)
        serve.send_signal(signal.SIGINT)  # while loading torch or the weights
        _, err = serve.communicate(timeout=60)
        assert serve.returncode == exit_codes.INTERRUPTED, err
        assert not [text for text in QUIET_FAILURES if text in err], err
        assert chat.stdout is not None
        chat.stdout.read(1)  # the answer has started
        chat.send_signal(signal.SIGINT)
        _, err = chat.communicate(timeout=60)
        assert chat.returncode == exit_codes.INTERRUPTED, err
        assert not [text for text in QUIET_FAILURES if text in err], err
    finally:
        for process in (serve, chat):
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.mark.slow
def test_demo_writes_no_control_characters_to_a_terminal(tmp_path: Path) -> None:
    command = f'"{BIN / "nvlm-chat"}" --demo hi 2>/dev/null'  # stdout alone on the terminal
    child = pexpect.spawn("bash", ["-c", command], env=_env(TMPDIR=str(tmp_path)), encoding="utf-8", timeout=180)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    output = child.before.replace("\r\n", "\n")  # the terminal's own newline translation
    assert output.strip(), "no answer"
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f]", output), repr(output)
    assert re.search(r"\\x[0-9a-f]{2}", output), f"this demo answer holds control bytes, shown escaped: {output!r}"
