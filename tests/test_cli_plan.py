"""`nvlm-engine plan`: the whole transcript for 2x H200, failures with their exit codes and the commands
they suggest (each parsed by the real `nvlm-chat` / `nvlm-serve` options, or run), input forms, and
the group's `-h` / `--version` without heavy imports."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from nvlm_engine import exit_codes
from nvlm_engine.cli import main
from nvlm_engine.plan_report import COMMAND_FLAGS

TWO_H200 = """\
nvlm-d-72b: 2 x H200 (140.4 GiB), bfloat16, context 32,768 tokens x batch 1
weights 147.9 GiB (vision 11.3, projector 1.2, LLM 135.4; 164.8 GiB on disk); KV cache 320 KiB per token

device  GPU   memory  weights  reserved  KV room  context fits  modules
cuda:0  H200   140.4     61.2       9.4     69.8       234,439  vision_model, mlp1, embed_tokens, norm, lm_head, rotary_emb, layers 0-25, 79 (27)
cuda:1  H200   140.4     86.6       9.4     44.3       120,801  layers 26-78 (53)
(GiB; reserved = 2.0 GiB overhead + activations for prefilling 32,768 tokens x 1; KV room = memory left for the KV cache; context fits = tokens per sequence at batch 1)

Fits. Longest context at batch 1: 98,304 tokens (the model's limit; memory allows 120,801).
Split: card 28/52, this plan 27/53 layers, because the card rounds every share up (ceil(80/1.5) = 54, GPU 0 half of it: 27), adds the last layer to GPU 0 on top and leaves the last GPU the rest, while this plan rounds the ideal shares to the nearest layer with the last layer inside GPU 0's share. --split card uses the card's.
On disk 164.8 GiB, loaded 147.9 GiB: the shards store about 9.1 B of the 79.4 B parameters as float32 (4 bytes) and the rest in 2 bytes (inferred from the index's total size); every floating tensor is loaded as bfloat16.
Tensor split (--tensor-parallel 2): fits, 65.4 GiB of the decoder layers per rank and 17.1 GiB more on rank 0 (vision tower, projector, embeddings, LM head); longest context at batch 1: 98,304 tokens.
Decode at batch 1 with 32,768 tokens cached, bound by H200 memory bandwidth (4.80 TB/s): layer split ~31 tokens/s, tensor split ~51 tokens/s (with 3.2 ms of all-reduces at 20 us each).
Run it: nvlm-chat -m {model} --tensor-parallel 2  # the tensor split, faster; nvlm-serve takes the same flags
Or the layer split above: nvlm-chat -m {model}
"""


@pytest.fixture(scope="module")
def metadata_only(tmp_path_factory: pytest.TempPathFactory, real_72b: Path) -> Path:
    """A folder with just the real config.json and tensor index, named like the download."""
    folder = tmp_path_factory.mktemp("meta") / "nvlm-d-72b"
    folder.mkdir()
    for name in ("config.json", "model.safetensors.index.json"):
        shutil.copyfile(real_72b / name, folder / name)
    return folder


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["plan", *args])
    return result.exit_code, result.output


def suggested_commands(output: str) -> list[list[str]]:
    """The commands of a 'What would fit' list and of a 'Run it:' line, as argument lists (comments dropped)."""
    commands = []
    for line in output.splitlines():
        text = line.removeprefix("Run it: ").removeprefix("Or the layer split above: ").strip()
        if text.startswith(("nvlm-chat ", "nvlm-engine ")):
            commands.append(shlex.split(text, comments=True))
    return commands


def parse_with(command_name: str, argv: list[str]) -> dict[str, object]:
    """Parse `argv` with the real command's options (nothing runs); returns its parameters."""
    if command_name == "nvlm-chat":
        from nvlm_langchain.cli import main as command
    else:
        from nvlm_server.cli import main as command  # type: ignore[no-redef]
    ctx = command.make_context(command_name, list(argv))
    return ctx.params


def test_two_h200_table(metadata_only: Path) -> None:
    code, output = run(str(metadata_only), "--gpus", "2xH200")
    assert code == 0, output
    assert output == TWO_H200.format(model=metadata_only)


def test_a_plan_that_does_not_fit_exits_5_with_commands_that_fit(metadata_only: Path) -> None:
    code, output = run(str(metadata_only), "--gpus", "2xA100-80GB")
    assert code == exit_codes.RESOURCES == 5
    assert output.startswith("Error: NVLM-D does not fit on 2 device(s) (cuda:0 80.0 GiB, cuda:1 80.0 GiB) as bfloat16")
    assert "short by" in output and "Traceback" not in output
    assert "quantization='" not in output and "context_length <=" not in output  # flags, not Python names
    m = shlex.quote(str(metadata_only))
    assert f"  nvlm-engine plan {m} --gpus 3xA100-80GB  # 3 GPUs (1 more of A100-80GB)\n" in output
    assert f"  nvlm-chat -m {m} --quantization bnb-8bit  # 82.5 GiB of weights\n" in output
    assert f"  nvlm-chat -m {m} --context-length 10240\n" in output


def test_no_fp8_advice_for_gpus_that_cannot_run_it(metadata_only: Path) -> None:
    _, a100 = run(str(metadata_only), "--gpus", "2xA100-80GB")
    assert "--quantization bnb-8bit" in a100 and "fp8" not in a100
    _, h100 = run(str(metadata_only), "--gpus", "2xH100")
    assert "--quantization fp8  # 82.5 GiB of weights" in h100  # capability 9.0: no caveat
    _, unknown = run(str(metadata_only), "--gpus", "2x80GB")
    assert "--quantization fp8  # (CUDA compute capability 8.9+" in unknown and "not A100" in unknown


def test_fp8_on_an_a100_is_refused_as_resources(metadata_only: Path) -> None:
    code, output = run(str(metadata_only), "--gpus", "1xA100", "-q", "fp8")
    assert code == exit_codes.RESOURCES
    assert "needs CUDA compute capability 8.9+" in output and "(A100) has 8.0" in output and "bnb-8bit" in output


@pytest.mark.parametrize("args", [
    ("--gpus", "2xA100-80GB"),
    ("--gpus", "2x80GB", "-c", "20000", "-b", "2"),
    ("--gpus", "2x80GB", "--dtype", "float32", "-c", "8192"),
    ("--gpus", "2xH200"),
    ("--gpus", "2x80GB", "--cpu-offload", "256GiB"),
    ("--gpus", "4xH100", "--split", "card", "-q", "bnb-8bit"),
    ("--gpus", "2xH200", "-c", "16384", "-b", "2"),  # the tensor split advised, the layer split beside it
    ("--gpus", "2xH200", "--tensor-parallel", "2", "--dtype", "float16"),
    ("--gpus", "2xA100-80GB", "--tensor-parallel", "2"),  # does not fit: more GPUs, with --tensor-parallel 4
    ("--gpus", "4xH100", "-q", "bnb-8bit", "--tensor-parallel", "4"),  # the quantized tensor split
    ("--gpus", "2xH200", "-q", "bnb-8bit"),  # the quantized tensor split advised, the layer split beside it
    ("--gpus", "2xH100-NVL", "-t", "2"),  # does not fit: more GPUs, a shorter context, or the layer split
])
def test_every_printed_command_runs_as_is(metadata_only: Path, args: tuple[str, ...]) -> None:
    """nvlm-chat commands parse with the real nvlm-chat and nvlm-serve options; plan commands run and fit."""
    _, output = run(str(metadata_only), *args)
    commands = suggested_commands(output)
    assert commands, output
    for argv in commands:
        flags = [word for word in argv if word.startswith("-")]
        assert set(flags) <= set(COMMAND_FLAGS) | {"--split"}, flags
        if argv[0] == "nvlm-chat":
            assert "--split" not in flags
            params = parse_with("nvlm-chat", argv[1:])
            assert params["model"] == str(metadata_only)
            served = parse_with("nvlm-serve", argv[1:])
            assert served["model_path"] == str(metadata_only)
            for flag, name in (("--quantization", "quantization"), ("--context-length", "context_length"),
                               ("--max-batch", "max_batch"), ("--cpu-offload", "cpu_offload"),
                               ("--tensor-parallel", "tensor_parallel")):
                if flag in argv:
                    assert str(params[name]) == argv[argv.index(flag) + 1]
                    assert str(served[name]) == argv[argv.index(flag) + 1]
        else:
            assert argv[:2] == ["nvlm-engine", "plan"]
            result = CliRunner().invoke(main, argv[1:])
            assert result.exit_code == 0, result.output


def test_quantized_single_gpu_and_options(metadata_only: Path) -> None:
    code, output = run(str(metadata_only), "-g", "1xH200", "-q", "fp8", "-c", "8192", "-b", "4")
    assert code == 0, output
    assert "1 x H200 (140.4 GiB), fp8, context 8,192 tokens x batch 4" in output
    assert "weights 82.5 GiB" in output and "layers 0-79 (80)" in output
    assert "Longest context at batch 4:" in output
    assert "the decoder's linear weights as fp8" in output
    assert f"Run it: nvlm-chat -m {metadata_only} --quantization fp8 --context-length 8192 --max-batch 4" in output
    assert "Split:" not in output  # one GPU: nothing to compare


def test_cpu_offload_is_opt_in_and_warned(metadata_only: Path) -> None:
    assert run(str(metadata_only), "--gpus", "2x80GB")[0] == exit_codes.RESOURCES
    code, output = run(str(metadata_only), "--gpus", "2x80GB", "--cpu-offload", "256GiB")
    assert code == 0, output
    assert "\ncpu " in output and "Warning: cpu holds" in output
    assert "--cpu-offload 256GiB" in output and "Split:" not in output


@pytest.mark.parametrize("spec", ["4xfoo", "", "80GB,,40GB"])
def test_bad_gpu_list_is_a_usage_error(metadata_only: Path, spec: str) -> None:
    code, output = run(str(metadata_only), "--gpus", spec)
    assert code == exit_codes.USAGE and "Invalid value for '-g' / '--gpus'" in output


@pytest.mark.parametrize(("args", "words"), [
    (("-c", "200000"), "beyond NVLM-D's 98,304 tokens"),
    (("--cpu-offload", "lots"), "Invalid value for '--cpu-offload'"),
    (("--split", "card", "--cpu-offload", "100GiB"), "--split card places layers on GPUs only"),
    (("--split", "card", "--first-device-share", "0.3"), "--first-device-share applies to --split balanced"),
])
def test_bad_flags_exit_2(metadata_only: Path, args: tuple[str, ...], words: str) -> None:
    code, output = run(str(metadata_only), "--gpus", "2xH200", *args)
    assert code == exit_codes.USAGE, output
    assert words in output and "Traceback" not in output


def test_a_checkpoint_folder_with_shards(tiny_checkpoint: Path) -> None:
    """With the shards present the tensor list and stored dtypes come from their headers."""
    code, output = run(str(tiny_checkpoint), "--gpus", "1x24GB", "-c", "4096")
    assert code == 0, output
    assert "1 x 24GB (24.0 GiB), bfloat16, context 4,096 tokens x batch 1" in output
    assert "on disk" in output and "layers 0-1 (2)" in output
    # the headers give the exact split of stored dtypes (the tiny checkpoint mixes bf16 and fp32, like the real one)
    assert "parameters, " in output and "as bfloat16" in output and "as float32" in output


@pytest.mark.parametrize("where", ["empty", "missing", "missing-id"])
def test_a_missing_or_bad_checkpoint_exits_4(tmp_path: Path, where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    model = {"empty": str(tmp_path), "missing": str(tmp_path / "nope"), "missing-id": "org/absent"}[where]
    code, output = run(model, "--gpus", "2xH200")
    assert code == exit_codes.MODEL == 4, output
    assert "Traceback" not in output
    expected = {"empty": "No config.json", "missing": "does not exist", "missing-id": "hf download org/absent"}[where]
    assert expected in output


def test_help_and_version() -> None:
    for flag in ("-h", "--help"):
        result = CliRunner().invoke(main, [flag])
        assert result.exit_code == 0 and "plan" in result.output
        assert "Exit codes:" in result.output and "5 does not fit" in result.output
    result = CliRunner().invoke(main, ["plan", "-h"])
    assert result.exit_code == 0 and "--split [balanced|card]" in result.output and "Exit codes:" in result.output
    from importlib.metadata import version

    result = CliRunner().invoke(main, ["--version"], prog_name="nvlm-engine")
    assert result.exit_code == 0 and result.output == f"nvlm-engine {version('nvlm-langchain')}\n"


def test_help_imports_no_torch() -> None:
    """`--help` must not pay for torch, transformers or the planner (measured: ~0.2 s)."""
    code = ("import sys\nfrom nvlm_engine.cli import main\ntry:\n    main(['plan', '--help'])\nexcept SystemExit:\n"
            "    pass\nheavy = ('torch', 'transformers', 'nvlm_engine.placement')\n"
            "print(sorted(m for m in heavy if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_constants_kept_equal_to_the_library() -> None:
    from nvlm_engine.cli import DEFAULT_OVERHEAD
    from nvlm_engine.devices import parse_bytes
    from nvlm_engine.placement import DEFAULT_OVERHEAD_BYTES

    assert parse_bytes(DEFAULT_OVERHEAD) == DEFAULT_OVERHEAD_BYTES


def test_plan_reads_no_shard_outside_the_folder(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """`plan` reads shard headers with the loader's path rules: a `..` entry or a link out is refused."""
    import json
    import os

    outside = tmp_path / "secret.safetensors"
    shutil.copyfile(next(tiny_checkpoint.glob("*.safetensors")), outside)
    for case in ("dotdot", "symlink"):
        folder = tmp_path / case
        shutil.copytree(tiny_checkpoint, folder)
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        for shard in folder.glob("*.safetensors"):
            shard.unlink()
            if case == "symlink":
                os.symlink(outside, shard)
        if case == "dotdot":
            index["weight_map"] = {name: "../secret.safetensors" for name in index["weight_map"]}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        code, output = run(str(folder), "--gpus", "1xH200")
        assert code == exit_codes.MODEL, case
        assert "outside" in output or "out of the checkpoint folder" in output, output
