"""`nvlm-engine plan`: the whole transcript for 2x H200, the failure exit code and message, input forms."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from nvlm_engine.cli import main

TWO_H200 = """\
nvlm-d-72b: 2 x H200 (140.4 GiB), bfloat16, context 32,768 tokens x batch 1
weights 147.9 GiB (vision 11.3, projector 1.2, LLM 135.4; 164.8 GiB on disk); KV cache 320 KiB per token

device  GPU   memory  weights  reserved  KV room  context fits  modules
cuda:0  H200   140.4     61.2       9.4     69.8       234,439  vision_model, mlp1, embed_tokens, norm, lm_head, rotary_emb, layers 0-25, 79 (27)
cuda:1  H200   140.4     86.6       9.4     44.3       120,801  layers 26-78 (53)
(GiB; reserved = 2.0 GiB overhead + activations for prefilling 32,768 tokens x 1; KV room = memory left for the KV cache; context fits = tokens per sequence at batch 1)

Fits. Longest context at batch 1: 98,304 tokens (the model's limit; memory allows 120,801).
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


def test_two_h200_table(metadata_only: Path) -> None:
    code, output = run(str(metadata_only), "--gpus", "2xH200")
    assert code == 0, output
    assert output == TWO_H200


def test_a_plan_that_does_not_fit_exits_1_with_reason_and_suggestions(metadata_only: Path) -> None:
    code, output = run(str(metadata_only), "--gpus", "2xA100-80GB")
    assert code == 1
    assert output.startswith("Error: NVLM-D does not fit on 2 device(s) (cuda:0 80.0 GiB, cuda:1 80.0 GiB) as bfloat16")
    assert "short by" in output
    assert "What would fit: 3 GPUs (1 more of A100-80GB); quantization='bnb-8bit'" in output
    assert "context_length <= " in output
    assert "Traceback" not in output


def test_quantized_single_gpu_and_options(metadata_only: Path) -> None:
    code, output = run(str(metadata_only), "-g", "1xH200", "-q", "fp8", "-c", "8192", "-b", "4")
    assert code == 0, output
    assert "1 x H200 (140.4 GiB), fp8, context 8,192 tokens x batch 4" in output
    assert "weights 82.5 GiB" in output and "layers 0-79 (80)" in output
    assert "Longest context at batch 4:" in output


def test_cpu_offload_is_opt_in_and_warned(metadata_only: Path) -> None:
    assert run(str(metadata_only), "--gpus", "2x80GB")[0] == 1
    code, output = run(str(metadata_only), "--gpus", "2x80GB", "--cpu-offload", "256GiB")
    assert code == 0, output
    assert "\ncpu " in output and "Warning: cpu holds" in output


@pytest.mark.parametrize("spec", ["4xfoo", "", "80GB,,40GB"])
def test_bad_gpu_list_is_a_usage_error(metadata_only: Path, spec: str) -> None:
    code, output = run(str(metadata_only), "--gpus", spec)
    assert code == 2 and "Invalid value for '-g' / '--gpus'" in output


def test_a_checkpoint_folder_with_shards(tiny_checkpoint: Path) -> None:
    """With the shards present the tensor list and stored dtypes come from their headers."""
    code, output = run(str(tiny_checkpoint), "--gpus", "1x24GB", "-c", "4096")
    assert code == 0, output
    assert "1 x 24GB (24.0 GiB), bfloat16, context 4,096 tokens x batch 1" in output
    assert "on disk" in output and "layers 0-1 (2)" in output


def test_missing_config_is_a_clean_error(tmp_path: Path) -> None:
    code, output = run(str(tmp_path), "--gpus", "2xH200")
    assert code == 1 and "No config.json" in output and "Traceback" not in output


def test_help_lists_the_plan_command() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "plan" in result.output


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
        assert code != 0, case
        assert "outside" in output or "out of the checkpoint folder" in output, output
