"""nvlm-chat: one-shot, stdin, --json and error paths with CliRunner; interactive mode in a real pseudo-terminal."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pexpect
import pytest
from click.testing import CliRunner
from PIL import Image

from nvlm_langchain.cli import EXIT_INPUT, EXIT_MODEL, EXIT_USAGE, main


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "invoice.png"
    Image.new("RGB", (640, 480), (250, 250, 240)).save(path)
    return path


def _run(*args: str, stdin: str | None = None):
    return CliRunner().invoke(main, list(args), input=stdin, catch_exceptions=False)


def test_one_shot_streams_the_engine_answer(tiny_checkpoint: Path, tiny_engine, image_file: Path) -> None:
    result = _run("-m", str(tiny_checkpoint), "--device-map", "cpu", "--dtype", "float32", "-i", str(image_file),
                  "--max-tokens", "6", "What", "is", "the", "total?")
    assert result.exit_code == 0, result.output
    expected = tiny_engine.generate([{"role": "user", "content": [{"type": "image", "image": str(image_file)},
                                                                  {"type": "text", "text": "What is the total?"}]}],
                                    max_new_tokens=6)
    assert result.stdout == expected.text + "\n"


def test_prompt_from_stdin_and_json_output(tiny_checkpoint: Path, tiny_engine) -> None:
    result = _run("-m", str(tiny_checkpoint), "--device-map", "cpu", "--dtype", "float32", "--json",
                  "--max-tokens", "5", stdin="Hello from stdin\n")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    expected = tiny_engine.generate([{"role": "user", "content": "Hello from stdin"}], max_new_tokens=5)
    assert body["text"] == expected.text
    assert body["usage"] == {"prompt_tokens": expected.usage.prompt_tokens, "completion_tokens": 5,
                             "total_tokens": expected.usage.prompt_tokens + 5}
    assert body["finish_reason"] == "length" and body["timings"]["wall"] > 0


def test_no_stream_prints_the_same_answer(tiny_checkpoint: Path) -> None:
    args = ["-m", str(tiny_checkpoint), "--device-map", "cpu", "--dtype", "float32", "--max-tokens", "6", "Hi"]
    assert _run(*args).stdout == _run(*args, "--no-stream").stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ([], EXIT_USAGE, "no model"),
        (["-m", "/nonexistent/ckpt", "hi"], EXIT_MODEL, "does not exist"),
        (["-i", "/nonexistent.png", "hi"], EXIT_USAGE, "is not a file"),
        (["-i", "http://127.0.0.1:9/x.png", "hi"], EXIT_USAGE, "--allow-urls"),
        (["--max-tiles", "40", "hi"], EXIT_USAGE, "40"),
    ],
)
def test_errors_are_one_line_with_an_exit_code(tiny_checkpoint: Path, monkeypatch, args, code, message) -> None:
    monkeypatch.delenv("NVLM_MODEL", raising=False)
    if args and args[0] not in ("-m",) and args != []:
        args = ["-m", str(tiny_checkpoint), "--device-map", "cpu", *args]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_unreadable_image_and_too_long_prompt(tiny_checkpoint: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    base = ["-m", str(tiny_checkpoint), "--device-map", "cpu", "--dtype", "float32"]
    result = CliRunner().invoke(main, [*base, "-i", str(broken), "hi"], catch_exceptions=False)
    assert result.exit_code == EXIT_INPUT and "broken.png" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, [*base, "--max-tokens", "40000", "hi"], catch_exceptions=False)
    assert result.exit_code == EXIT_INPUT and "context length" in result.output


def test_demo_works_from_a_fresh_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = CliRunner().invoke(main, ["--demo", "--max-tokens", "4", "hi"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "RANDOM weights" in result.stderr and "noise" in result.stderr
    assert result.stdout.strip()


def test_interactive_session_in_a_pty(tiny_checkpoint: Path, image_file: Path, tmp_path: Path) -> None:
    transcript = tmp_path / "chat.json"
    command = [sys.executable, "-m", "nvlm_langchain.cli", "-m", str(tiny_checkpoint), "--device-map", "cpu",
               "--dtype", "float32", "--max-tokens", "12"]
    child = pexpect.spawn(command[0], command[1:], encoding="utf-8", timeout=120, dimensions=(40, 200))
    child.expect(">>> ")
    child.sendline(f"/image {image_file}")
    child.expect("attached")
    child.expect(">>> ")
    child.sendline("What is in the picture?")
    child.expect(">>> ")
    child.sendline("And the total?")
    child.expect(">>> ")
    child.sendline(f"/save {transcript}")
    child.expect("saved to")
    child.expect(">>> ")
    saved = json.loads(transcript.read_text())
    kinds = [m["type"] for m in saved["messages"]]
    assert kinds == ["human", "ai", "human", "ai"]
    assert saved["messages"][0]["data"]["content"][0]["type"] == "image"
    child.sendline("/reset")
    child.expect("conversation cleared")
    child.expect(">>> ")
    child.sendeof()  # Ctrl-D leaves
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    # resume the saved transcript, stop a long answer with Ctrl-C, keep chatting, leave with /exit
    long = [*command[1:-2], "--max-tokens", "3000", "--load", str(transcript)]
    child = pexpect.spawn(command[0], long, encoding="utf-8", timeout=120, dimensions=(40, 200))
    child.expect(">>> ")
    child.sendline("Tell me everything.")
    child.expect_exact("Tell me everything.\r\n")  # the terminal's echo of the line
    child.expect(r"\S")  # the answer has started (a Ctrl-C before it would just cancel the line)
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect(">>> ")
    child.sendline(f"/save {transcript}")
    child.expect(">>> ")
    resumed = json.loads(transcript.read_text())
    assert [m["type"] for m in resumed["messages"]][:4] == kinds
    assert resumed["messages"][4]["type"] == "human"
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
