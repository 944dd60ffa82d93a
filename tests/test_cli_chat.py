"""nvlm-chat in-process (CliRunner): one-shot answers, stdin, -o, --json, --demo, and every check
that must fail before the weights load. Interactive mode: test_cli_interactive.py; real
processes (pipes, signals, start-up): test_cli_process.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from nvlm_engine import exit_codes
from nvlm_langchain import cli
from nvlm_langchain.chat_session import ChatSession
from nvlm_langchain.cli import main


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "invoice.png"
    Image.new("RGB", (640, 480), (250, 250, 240)).save(path)
    return path


@pytest.fixture(scope="module")
def scan_pdf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-page PDF (Pillow writes it: one image per page)."""
    path = tmp_path_factory.mktemp("cli") / "scan.pdf"
    pages = [Image.new("RGB", (300, 400), color) for color in ("white", "gray", "black")]
    pages[0].save(path, format="PDF", save_all=True, append_images=pages[1:], resolution=72.0)
    return path


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the weights fails the test: the error under test must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the input was checked")

    monkeypatch.setattr(ChatSession, "open", classmethod(refuse))


def _run(*args: str, stdin: str | None = None):
    return CliRunner().invoke(main, list(args), input=stdin, catch_exceptions=False)


def _base(checkpoint: Path) -> list[str]:
    return ["-m", str(checkpoint), "--device-map", "cpu", "--dtype", "float32"]


def test_one_shot_streams_the_engine_answer(tiny_checkpoint: Path, tiny_engine, image_file: Path) -> None:
    result = _run(*_base(tiny_checkpoint), "-i", str(image_file), "--max-tokens", "6", "What", "is", "the", "total?")
    assert result.exit_code == 0, result.output
    expected = tiny_engine.generate([{"role": "user", "content": [{"type": "image", "image": str(image_file)},
                                                                  {"type": "text", "text": "What is the total?"}]}],
                                    max_new_tokens=6)
    assert result.stdout == expected.text + "\n"


def test_stdin_alone_is_the_prompt_and_json_output(tiny_checkpoint: Path, tiny_engine) -> None:
    result = _run(*_base(tiny_checkpoint), "--json", "--max-tokens", "5", stdin="Hello from stdin\n")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    expected = tiny_engine.generate([{"role": "user", "content": "Hello from stdin"}], max_new_tokens=5)
    assert body["text"] == expected.text
    assert body["usage"] == {"prompt_tokens": expected.usage.prompt_tokens, "completion_tokens": 5,
                             "total_tokens": expected.usage.prompt_tokens + 5}
    assert body["finish_reason"] == "length" and body["timings"]["wall"] > 0


def test_piped_stdin_is_appended_after_a_blank_line(tiny_checkpoint: Path, tiny_engine) -> None:
    result = _run(*_base(tiny_checkpoint), "--json", "--max-tokens", "4", "Summarize:", stdin="long doc\nline 2\n")
    assert result.exit_code == 0, result.output
    expected = tiny_engine.generate([{"role": "user", "content": "Summarize:\n\nlong doc\nline 2"}], max_new_tokens=4)
    body = json.loads(result.stdout)
    assert body["usage"]["prompt_tokens"] == expected.usage.prompt_tokens
    assert body["text"] == expected.text


def test_no_stream_and_o_options(tiny_checkpoint: Path) -> None:
    args = [*_base(tiny_checkpoint), "--max-tokens", "6", "Hi"]
    assert _run(*args).stdout == _run(*args, "--no-stream").stdout
    # -o wins over the flag; any generation option is accepted
    result = _run(*args, "--json", "-o", "max_tokens", "3", "-o", "temperature", "0.8", "-o", "seed", "7",
                  "-o", "top-k", "5", "-o", "stop", "###", "-o", "repetition_penalty", "1.1")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["usage"]["completion_tokens"] <= 3


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ([], exit_codes.USAGE, "no model"),
        (["-m", "/nonexistent/ckpt", "hi"], exit_codes.MODEL, "does not exist"),
        (["-i", "/nonexistent.png", "hi"], exit_codes.USAGE, "is not a file"),
        (["-i", "http://127.0.0.1:9/x.png", "hi"], exit_codes.USAGE, "--allow-urls"),
        (["--max-tiles", "40", "hi"], exit_codes.USAGE, "40"),
        ([""], exit_codes.USAGE, "empty prompt"),
        ([], exit_codes.USAGE, "empty prompt"),  # stdin is not a terminal and holds nothing
        (["-o", "temprature", "1", "hi"], exit_codes.USAGE, "did you mean temperature"),
        (["-o", "temperature", "hot", "hi"], exit_codes.INPUT, "not a number"),
        (["-o", "temperature", "-1", "hi"], exit_codes.INPUT, "temperature"),
        (["-o", "max_tokens", "0", "hi"], exit_codes.INPUT, "max_tokens"),
        (["--gpus", "0,0", "hi"], exit_codes.USAGE, "twice"),
        (["--max-memory", "0:70GiB", "hi"], exit_codes.USAGE, "DEVICE=SIZE"),
        (["--quantization", "int3", "hi"], exit_codes.USAGE, "int3"),
    ],
)
def test_errors_are_one_line_with_an_exit_code(tiny_checkpoint: Path, monkeypatch, no_loading, args, code,
                                               message) -> None:
    monkeypatch.delenv("NVLM_MODEL", raising=False)
    if args and args[0] != "-m" or args == [] and message != "no model":
        args = ["-m", str(tiny_checkpoint), "--device-map", "cpu", *args]
    if message == "does not exist":
        monkeypatch.undo()  # this one must reach the loader, which finds no folder
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()[-1]) < 400


def test_inputs_are_checked_before_the_weights_load(tiny_checkpoint: Path, tmp_path: Path, image_file: Path,
                                                    scan_pdf: Path, no_loading) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    base = ["-m", str(tiny_checkpoint), "--device-map", "cpu"]
    cases = [
        ([*base, "-i", str(notes), "hi"], exit_codes.INPUT, "notes.txt cannot be used"),
        ([*base, "-i", str(broken), "hi"], exit_codes.INPUT, "broken.png"),
        ([*base, "-i", f"{scan_pdf}#9", "hi"], exit_codes.INPUT, "scan.pdf#9 cannot be used"),
        ([*base, "-i", f"{scan_pdf}#2", "--page", "3", "hi"], exit_codes.USAGE, "give the page once"),
        ([*base, "-i", str(image_file), "--page", "2", "hi"], exit_codes.USAGE, "no PDF was given"),
        ([*base, "-i", f"{image_file}#2", "hi"], exit_codes.USAGE, "is not a PDF"),
        ([*base, "-i", f"{scan_pdf}#x", "hi"], exit_codes.USAGE, "not a page number"),
        (["--demo", "-m", str(tiny_checkpoint), "hi"], exit_codes.USAGE, "drop one of them"),
        ([*base, "--gpus", "0", "--device-map", "cpu", "hi"], exit_codes.USAGE, "both choose devices"),
        ([*base, "--cpu-offload", "10GiB", "--max-memory", "cpu=20GiB", "hi"], exit_codes.USAGE, "disagree"),
    ]
    for args, code, message in cases:
        result = CliRunner().invoke(main, args, catch_exceptions=False)
        assert result.exit_code == code and message in result.stderr, (args, result.output)
        assert "Traceback" not in result.output


def test_pdf_pages_are_rendered_up_front(tiny_checkpoint: Path, scan_pdf: Path, monkeypatch) -> None:
    sent: list[list[dict]] = []
    monkeypatch.setattr(ChatSession, "open", classmethod(lambda cls, model, **kwargs: object()))
    monkeypatch.setattr(cli, "_one_shot", lambda session, text, blocks, **kwargs: sent.append(blocks))
    for args in (["-i", f"{scan_pdf}#3"], ["-i", str(scan_pdf), "--page", "3"], ["-i", f"{scan_pdf}#3", "--page", "3"],
                 ["-i", str(scan_pdf)]):
        assert _run(*_base(tiny_checkpoint), *args, "hi").exit_code == 0
    third, same, again, first = (blocks[0]["base64"] for blocks in sent)
    assert third == same == again != first  # page 3 rendered (black), page 1 by default (white)


def test_json_is_refused_in_the_interactive_mode(tiny_checkpoint: Path, monkeypatch, no_loading) -> None:
    monkeypatch.setattr(cli, "_is_terminal", lambda stream: True)  # as if stdin were a terminal
    result = _run(*_base(tiny_checkpoint), "--json")
    assert result.exit_code == exit_codes.USAGE and "--json prints one answer" in result.stderr


def test_placement_flags_reach_chat_nvlm(tiny_checkpoint: Path, monkeypatch) -> None:
    seen: dict = {}

    def record(self, progress=None):
        seen.update(self.model_dump(include={"device_map", "max_memory", "context_length", "batch_size",
                                             "quantization"}), progress=progress)
        raise SystemExit(0)

    from nvlm_langchain.chat_models import ChatNVLM

    monkeypatch.setattr(ChatNVLM, "load", record)
    result = _run("-m", str(tiny_checkpoint), "--gpus", "cuda:1,0", "--cpu-offload", "200GiB", "--max-memory",
                  "1=70GiB", "--context-length", "8192", "--max-batch", "4", "--quantization", "bnb-8bit", "hi")
    assert result.exit_code == 0, result.output
    assert seen == {"device_map": ["cuda:1", "cuda:0", "cpu"], "max_memory": {1: "70GiB", "cpu": "200GiB"},
                    "context_length": 8192, "batch_size": 4, "quantization": "bnb-8bit", "progress": None}


def test_compile_reaches_from_pretrained_through_chat_nvlm(tmp_path: Path, monkeypatch) -> None:
    from nvlm_engine import CheckpointError, NVLMEngine
    from nvlm_engine.cores import DecodeSettings

    loads: list[dict] = []

    def fake(cls, path, **kwargs):
        loads.append(kwargs)
        raise CheckpointError("stop here (test)")

    monkeypatch.setattr(NVLMEngine, "from_pretrained", classmethod(fake))
    for flags in (["--compile"], []):  # a folder no registry holds: each run reaches from_pretrained
        result = _run("-m", str(tmp_path / "never-loaded"), "--device-map", "cpu", *flags, "hi")
        assert result.exit_code == exit_codes.MODEL, result.output
    compiled, eager = loads
    assert compiled.pop("decoding") == DecodeSettings(compile=True)
    assert "decoding" not in eager and compiled == eager


def test_missing_model_has_the_same_code_as_nvlm_serve(tmp_path: Path) -> None:
    from nvlm_server.cli import main as serve

    missing = str(tmp_path / "missing")
    chat = CliRunner().invoke(main, ["-m", missing, "--device-map", "cpu", "hi"])
    server = CliRunner().invoke(serve, ["-m", missing, "--device-map", "cpu", "--port", "0"])
    assert chat.exit_code == server.exit_code == exit_codes.MODEL, (chat.output, server.output)


def test_too_long_prompt_is_an_input_error(tiny_checkpoint: Path) -> None:
    result = _run(*_base(tiny_checkpoint), "--max-tokens", "40000", "hi")
    assert result.exit_code == exit_codes.INPUT and "context length" in result.output


def test_demo_answers_in_at_most_64_tokens_by_default(tmp_path: Path, monkeypatch) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = _run("--demo", "--json", "hi")
    assert result.exit_code == 0, result.output
    assert "RANDOM weights" in result.stderr and "noise" in result.stderr
    body = json.loads(result.stdout)
    assert 0 < body["usage"]["completion_tokens"] <= 64
    assert all(not 0x7F <= ord(c) <= 0x9F for c in result.stdout)  # C1 escaped in JSON too
    longer = json.loads(_run("--demo", "--json", "--max-tokens", "80", "hi").stdout)  # an explicit limit wins
    assert longer["usage"]["completion_tokens"] > 64


def test_interactive_without_a_terminal_keeps_stdout_for_answers(tiny_checkpoint: Path, tiny_engine, tmp_path: Path,
                                                                 monkeypatch) -> None:
    """Stdin a terminal but stdout a file: plain input(), the prompt and messages on stderr."""
    monkeypatch.setattr(cli, "_is_terminal", lambda stream: True)  # stdin: the interactive mode
    saved = tmp_path / "t.json"
    result = _run(*_base(tiny_checkpoint), "--max-tokens", "4",
                  stdin=f"/system\n/bogus\nHi\n/save {saved}\n/image {tmp_path / 'none.png'}\n/exit\n")
    assert result.exit_code == 0, result.output
    expected = tiny_engine.generate([{"role": "user", "content": "Hi"}], max_new_tokens=4)
    assert result.stdout == expected.text + "\n"  # answers only
    assert ">>> " in result.stderr and "unknown command /bogus" in result.stderr and "is not a file" in result.stderr
    assert "(your last message: /bogus)" in result.stderr and saved.is_file()
