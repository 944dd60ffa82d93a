"""The pieces the command lines share, without a process or a model: placement flags -> engine
arguments, the exit-code lookup, terminal-safe output, image names, prompts and -o options."""

from __future__ import annotations

import io
from pathlib import Path

import click
import pytest
import torch

from nvlm_engine import exit_codes
from nvlm_engine.cli_options import QUANTIZATIONS, Placement
from nvlm_langchain.cli_images import ImageRefError, PageConflictError, apply_page, parse_image_ref
from nvlm_langchain.cli_inputs import CommandError, generation_options, read_prompt
from nvlm_langchain.cli_output import AnswerWriter, for_terminal, json_text


def test_quantization_choices_are_the_engine_schemes() -> None:
    from nvlm_engine.quantization import SCHEMES

    assert set(QUANTIZATIONS) == set(SCHEMES)


@pytest.mark.parametrize(
    ("placement", "device_map", "expected"),
    [
        (Placement(), "auto", {"device_map": "auto", "max_memory": None}),
        (Placement(gpus=(1, 0)), "auto", {"device_map": ["cuda:1", "cuda:0"], "max_memory": None}),
        (Placement(gpus=(0,), cpu_offload="9GiB"), "auto",
         {"device_map": ["cuda:0", "cpu"], "max_memory": {"cpu": "9GiB"}}),
        (Placement(cpu_offload="9GiB", max_memory={0: "70GiB"}), "auto",
         {"device_map": "auto", "max_memory": {0: "70GiB", "cpu": "9GiB"}}),  # "auto" over the GPUs listed
        (Placement(cpu_offload="9GiB"), "cuda:1", {"device_map": ["cuda:1", "cpu"], "max_memory": {"cpu": "9GiB"}}),
        (Placement(cpu_offload="9GiB"), ["cuda:0", "cuda:1"],
         {"device_map": ["cuda:0", "cuda:1", "cpu"], "max_memory": {"cpu": "9GiB"}}),
        (Placement(cpu_offload="9GiB"), "cpu", {"device_map": "cpu", "max_memory": {"cpu": "9GiB"}}),
    ],
)
def test_placement_flags_become_engine_arguments(placement: Placement, device_map, expected: dict) -> None:
    arguments = placement.arguments(device_map)
    assert {k: arguments[k] for k in expected} == expected


def test_cpu_offload_with_auto_lists_every_gpu_then_the_cpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert Placement(cpu_offload="1GiB").arguments("auto")["device_map"] == ["cuda:0", "cuda:1", "cpu"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert Placement(cpu_offload="1GiB").arguments("auto")["device_map"] == "auto"  # all on the CPU anyway


def test_placement_conflicts_are_usage_errors() -> None:
    with pytest.raises(click.UsageError, match="both choose devices"):
        Placement(gpus=(0,)).arguments("cuda:1")
    with pytest.raises(click.UsageError, match="disagree"):
        Placement(cpu_offload="1GiB", max_memory={"cpu": "2GiB"}).arguments("auto")


def test_exit_code_lookup_follows_the_table() -> None:
    from nvlm_engine import CheckpointError, ContextLengthError, ImageDecodeError, PlanError
    from nvlm_engine.errors import HubOfflineError
    from nvlm_langchain.remote import ServerConnectionError

    cases = {
        KeyboardInterrupt(): exit_codes.INTERRUPTED, BrokenPipeError(): exit_codes.BROKEN_PIPE,
        CheckpointError("x"): exit_codes.MODEL, HubOfflineError("x"): exit_codes.MODEL,
        PlanError("x"): exit_codes.RESOURCES, torch.OutOfMemoryError("x"): exit_codes.RESOURCES,
        RuntimeError("CUDA out of memory. Tried to allocate"): exit_codes.RESOURCES,
        ImageDecodeError("x"): exit_codes.INPUT, ContextLengthError("x", prompt_tokens=1, max_new_tokens=1,
                                                                    context_length=1): exit_codes.INPUT,
        ServerConnectionError("x"): exit_codes.NETWORK, RuntimeError("x"): exit_codes.FAILURE,
    }
    for error, code in cases.items():
        assert exit_codes.code_for(error) == code, error


def test_answers_cannot_drive_a_terminal() -> None:
    assert for_terminal("a\x1b[2Jb\tc\nd\re\x07\x9b\x7f") == "a\\x1b[2Jb\tc\nd\\x0de\\x07\\x9b\\x7f"

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal, pipe = Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        writer = AnswerWriter(stream)
        writer.write("ok\x1b]0;pwned\x07")
        writer.end()
    assert terminal.getvalue() == "ok\\x1b]0;pwned\\x07\n"
    assert pipe.getvalue() == "ok\x1b]0;pwned\x07\n"  # a pipe gets the text as generated
    assert json_text({"t": "a\x1b\x9b"}) == '{"t": "a\\u001b\\u009b"}'


def test_image_names(tmp_path: Path) -> None:
    png, pdf, odd = tmp_path / "a.png", tmp_path / "b.pdf", tmp_path / "c#1.png"
    for path in (png, pdf, odd):
        path.write_bytes(b"%PDF-1.4" if path.suffix == ".pdf" else b"png")
    assert parse_image_ref(f"{pdf}#2").page == 2 and parse_image_ref(str(pdf)).is_pdf
    assert parse_image_ref(str(odd)).location == str(odd)  # an existing name with '#' is a file
    assert parse_image_ref("https://x/y.png").is_url
    for bad, message in ((f"{png}#2", "not a PDF"), (f"{pdf}#0", "not a page number"), ("", "no image"),
                         (str(tmp_path), "a folder")):
        with pytest.raises(ImageRefError, match=message):
            parse_image_ref(bad)
    refs = [parse_image_ref(str(png)), parse_image_ref(str(pdf))]
    assert [r.page for r in apply_page(refs, 3)] == [None, 3]
    with pytest.raises(PageConflictError, match="give the page once"):
        apply_page([parse_image_ref(f"{pdf}#2")], 3)
    with pytest.raises(PageConflictError, match="no PDF"):
        apply_page(refs[:1], 3)


def test_prompt_and_stdin() -> None:
    assert read_prompt(["hi"], io.StringIO("doc\n"), stdin_is_terminal=False) == "hi\n\ndoc"
    assert read_prompt([], io.StringIO(" doc \n"), stdin_is_terminal=False) == "doc"
    assert read_prompt(["hi"], io.StringIO("\n"), stdin_is_terminal=False) == "hi"
    assert read_prompt([], io.StringIO(""), stdin_is_terminal=True) is None  # interactive
    for words, stdin, terminal in (([""], "", True), ([], "", False), (["  "], "\n", False)):
        with pytest.raises(click.UsageError, match="empty prompt"):
            read_prompt(words, io.StringIO(stdin), stdin_is_terminal=terminal)
    binary = io.TextIOWrapper(io.BytesIO(b"\xff\xfe\x00"), encoding="utf-8")
    with pytest.raises(CommandError, match="not UTF-8") as info:
        read_prompt([], binary, stdin_is_terminal=False)
    assert info.value.exit_code == exit_codes.INPUT


def test_o_options() -> None:
    options = generation_options({"max_tokens": 6, "temperature": None},
                                 [("max_tokens", "3"), ("top-k", "5"), ("stop", "a"), ("stop", "b")])
    assert options == {"max_tokens": 3, "top_k": 5, "stop": ["a", "b"]}
    with pytest.raises(click.UsageError, match="did you mean top_p"):
        generation_options({}, [("topp", "1")])
    for pair, message in ((("seed", "1.5"), "not a whole number"), (("top_p", "2"), "top_p"),
                          (("presence_penalty", "9"), "presence_penalty"), (("temperature", "nan"), "temperature")):
        with pytest.raises(CommandError, match=message) as info:
            generation_options({}, [pair])
        assert info.value.exit_code == exit_codes.INPUT


def test_tensor_parallel_reaches_from_pretrained_from_every_surface(monkeypatch) -> None:
    """--tensor-parallel N (nvlm-chat, nvlm-serve) and ChatNVLM(tensor_parallel=N) load with tensor_parallel=N."""
    from nvlm_engine.cli_options import Placement
    from nvlm_langchain import ChatNVLM

    assert Placement(tensor_parallel=2).arguments("cpu")["tensor_parallel"] == 2
    assert "tensor_parallel" not in Placement().arguments("cpu")  # one process: the call is unchanged
    calls: list[dict] = []
    import nvlm_engine

    monkeypatch.setattr(nvlm_engine.NVLMEngine, "from_pretrained", classmethod(lambda cls, path, **k: calls.append(k)))
    spec = ChatNVLM(model="/models/none", tensor_parallel=4).engine_spec()
    spec.load()
    assert calls[-1]["tensor_parallel"] == 4
    assert spec != ChatNVLM(model="/models/none").engine_spec()  # other weights in memory: another engine


def test_compile_becomes_decode_settings_and_another_engine(monkeypatch) -> None:
    """--compile (nvlm-chat, nvlm-serve) and ChatNVLM(compile=True) load with decoding=DecodeSettings(compile=True);
    without it the call is unchanged, and the two are different engines (different decode steps)."""
    import nvlm_engine
    from nvlm_engine.cores import DecodeSettings
    from nvlm_langchain import ChatNVLM

    assert Placement(compile=True).arguments("cpu")["decoding"] == DecodeSettings(compile=True)
    assert "decoding" not in Placement().arguments("cpu")
    calls: list[dict] = []
    monkeypatch.setattr(nvlm_engine.NVLMEngine, "from_pretrained", classmethod(lambda cls, path, **k: calls.append(k)))
    compiled = ChatNVLM(model="/models/none", compile=True).engine_spec()
    eager = ChatNVLM(model="/models/none").engine_spec()
    compiled.load()
    eager.load()
    assert calls[0]["decoding"] == DecodeSettings(compile=True) and "decoding" not in calls[1]
    assert compiled != eager  # the registry's key: not one engine
