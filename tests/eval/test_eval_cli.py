"""nvlm-eval without the harnesses: the command, its errors, the rows, the commands it would run, the report.

These run in CI, where the `eval` extra is not installed (test_eval_e2e.py runs the harnesses
where it is). Result files are written here in the two harnesses' shapes, the ones the
end-to-end tests read back from real runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from eval_stub import oracle_server
from PIL import Image

from nvlm_eval import harness
from nvlm_eval.cli import main
from nvlm_eval.harness import RunSettings, harness_command
from nvlm_eval.rows import load_rows, select_rows
from nvlm_eval.server import ServerInfo, api_base

SERVER = ServerInfo(base="http://gpu:8000/v1", model="nvidia/NVLM-D-72B", max_tiles=6)
ROWS = {row.key: row for row in load_rows()}


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_help_is_fast_and_imports_no_harness() -> None:
    code = ("import sys; from click.testing import CliRunner; from nvlm_eval.cli import main; "
            "r = CliRunner().invoke(main, ['run', '--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'lmms_eval', 'lm_eval', 'datasets', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
    result = invoke("--help")
    assert result.exit_code == 0 and "Exit codes:" in result.output
    for flag in ("--base-url", "--rows", "--limit", "--output", "--concurrency", "--max-tiles", "--force"):
        assert flag in invoke("run", "--help").output


def test_every_card_row_is_listed_with_its_numbers() -> None:
    assert list(ROWS) == ["mmmu", "mmmu_test", "mathvista", "ocrbench", "ai2d", "chartqa", "docvqa", "textvqa",
                          "realworldqa", "vqav2", "mmlu", "gsm8k", "math", "humaneval"]
    hf = {"mmmu": 58.7, "mmmu_test": 54.9, "mathvista": 65.2, "ocrbench": 852, "ai2d": 94.2, "chartqa": 86.0,
          "docvqa": 92.6, "textvqa": 82.6, "realworldqa": 69.5, "vqav2": 85.4, "mmlu": 81.7, "gsm8k": 93.2,
          "math": 73.1, "humaneval": 89.0}
    assert {key: row.card["hf"] for key, row in ROWS.items()} == hf
    assert all("megatron" in row.card for row in ROWS.values())
    assert not ROWS["mmmu_test"].runnable and ROWS["mathvista"].runnable and not ROWS["mathvista"].default
    listing = invoke("rows").output
    assert "chartqa" in listing and "not reproducible" in listing and "humaneval_instruct" in listing


def test_the_readme_table_matches_the_rows() -> None:
    readme = (Path(__file__).resolve().parents[2] / "evaluation" / "README.md").read_text()
    for row in ROWS.values():
        numbers = " | ".join(f"{row.card[c]:.0f}" if row.scale >= 1000 else f"{row.card[c]:.1f}" if c in row.card
                             else "—" for c in ("hf", "megatron", "mcore"))
        line = next((l for l in readme.splitlines() if l.startswith(f"| {row.label} | ")), "")
        assert line.startswith(f"| {row.label} | {numbers} | "), row.key
        assert f" | {row.status} | " in line, row.key


def test_every_lmms_row_has_its_yaml_and_nvlm_prompt() -> None:
    tasks = Path(__file__).resolve().parents[2] / "evaluation" / "lmms_tasks"
    for row in ROWS.values():
        if row.harness != "lmms-eval":
            continue
        text = (tasks / f"{row.tasks[0]}.yaml").read_text()
        assert f"task: {row.tasks[0]}\n" in text and "nvlm_prompts." in text
        assert 'system_prompt: "Answer the questions."' in text
    prompts = {"nvlm_chartqa": "Answer the question using a single word or phrase.",
               "nvlm_vqav2_val": "Answer the question using a single word or phrase.",
               "nvlm_docvqa_val": "Answer the question using a single word, phrase, or number.",
               "nvlm_textvqa_val": "Answer the question using a single word, phrase, or number.",
               "nvlm_ocrbench": 'post_prompt: ""', "nvlm_realworldqa": 'post_prompt: ""'}  # SPEC section 9
    for task, prompt in prompts.items():
        assert prompt in (tasks / f"{task}.yaml").read_text()


def test_row_selection_and_its_errors() -> None:
    rows = load_rows()
    assert [r.key for r in select_rows(rows, "default")] == ["mmmu", "ocrbench", "ai2d", "chartqa", "docvqa",
                                                             "textvqa", "realworldqa", "mmlu", "gsm8k", "math",
                                                             "humaneval"]
    assert [r.key for r in select_rows(rows, "ocrbench,chartqa")] == ["ocrbench", "chartqa"]  # card order
    result = invoke("run", "--base-url", "http://127.0.0.1:9", "--rows", "chartqaa")
    assert result.exit_code == 2 and "did you mean 'chartqa'" in result.output and "Traceback" not in result.output
    result = invoke("run", "--base-url", "http://127.0.0.1:9", "--rows", "mmmu_test")
    assert result.exit_code == 2 and "cannot be run" in result.output


def test_an_unreachable_server_is_one_line_and_exit_6() -> None:
    result = invoke("run", "--base-url", "http://127.0.0.1:9/v1", "--rows", "chartqa")
    assert result.exit_code == 6
    assert result.output.startswith("nvlm-eval: error: cannot reach the server at http://127.0.0.1:9/v1")
    assert result.output.count("\n") == 1


@pytest.mark.parametrize(("typed", "base"), [("http://h:8000", "http://h:8000/v1"), ("http://h:8000/v1/", "http://h:8000/v1"),
                                             ("https://h/x/v1/chat/completions", "https://h/x/v1")])
def test_base_urls(typed: str, base: str) -> None:
    assert api_base(typed) == base


def test_a_server_with_another_tile_budget_is_refused(tmp_path: Path) -> None:
    with oracle_server({}, max_tiles=4) as server:
        result = invoke("run", "--base-url", server.url, "--rows", "chartqa", "-o", str(tmp_path))
    assert result.exit_code == 2
    assert "tile budget is 4, not 6" in result.output and "nvlm-serve --max-tiles 6" in result.output


def test_a_missing_harness_is_exit_5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness.importlib.util, "find_spec", lambda name: None)
    with oracle_server({}) as server:
        result = invoke("run", "--base-url", server.url, "--rows", "chartqa", "-o", str(tmp_path))
    assert result.exit_code == 5 and "pip install -e '.[eval]'" in result.output


def test_harness_commands_carry_the_runs_settings(tmp_path: Path) -> None:
    tasks = Path(__file__).resolve().parents[2] / "evaluation"
    settings = RunSettings(output=tmp_path, tasks_dir=tasks, limit=20, concurrency=12, max_tokens=1024)
    vision = harness_command(ROWS["chartqa"], SERVER, settings)
    assert vision[1:5] == ["-m", "lmms_eval", "eval", "--model"] and "openai" in vision
    assert vision[vision.index("--model_args") + 1] == (
        "model=nvidia/NVLM-D-72B,num_concurrent=12,timeout=600,max_retries=3,base_url=http://gpu:8000/v1,api_key=EMPTY")
    assert vision[vision.index("--include_path") + 1] == str(tasks / "lmms_tasks")
    assert vision[vision.index("--tasks") + 1] == "nvlm_chartqa"
    assert vision[-5:] == ["--output_path", str(tmp_path / "chartqa"), "--log_samples", "--limit", "20"]
    code = harness_command(ROWS["humaneval"], SERVER, settings)
    assert code[1:5] == ["-m", "lm_eval", "run", "--model"] and "local-chat-completions" in code
    assert code[code.index("--model_args") + 1].endswith(
        "base_url=http://gpu:8000/v1/chat/completions,tokenized_requests=False,max_gen_toks=1024")
    assert {"--apply_chat_template", "--fewshot_as_multiturn", "--confirm_run_unsafe_code"} <= set(code)
    mmlu = harness_command(ROWS["mmlu"], SERVER, settings)
    assert mmlu[mmlu.index("--num_fewshot") + 1] == "5" and "--confirm_run_unsafe_code" not in mmlu


def _lmms_results(folder: Path, task: str, metrics: dict, samples: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "20260101_000000_results.json").write_text(json.dumps(
        {"results": {task: {"alias": task, **metrics}}, "n-samples": {task: {"original": samples, "effective": samples}}}))


def _lm_results(folder: Path, group: str, subtasks: dict[str, int], metrics: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results_2026-01-01T00-00-00.json").write_text(json.dumps({
        "results": {group: metrics, **{t: {} for t in subtasks}}, "group_subtasks": {group: list(subtasks)},
        "n-samples": {t: {"original": n, "effective": n} for t, n in subtasks.items()}}))


def test_report_side_by_side_with_gaps_and_a_chart(tmp_path: Path) -> None:
    _lmms_results(tmp_path / "chartqa" / "nvlm-d", "nvlm_chartqa", {"relaxed_overall,none": 0.85}, 2500)
    # OCRBench divides its right answers by 1000 whatever was asked: 40 right of 50 asked -> 800 points
    _lmms_results(tmp_path / "ocrbench" / "nvlm-d", "nvlm_ocrbench", {"ocrbench_accuracy,none": 0.040}, 50)
    _lm_results(tmp_path / "math" / "nvlm-d", "minerva_math", {"minerva_math_algebra": 100, "minerva_math_geometry": 50},
                {"math_verify,none": 0.74, "exact_match,none": 0.5})
    result = invoke("report", str(tmp_path))
    assert result.exit_code == 0, result.output
    table = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in result.output.splitlines()
             if line.startswith("| ")}
    assert table["ChartQA (test)"][1:5] == ["85.0", "2500", "86.0", "-1.0"]
    assert table["OCRBench"][1:7] == ["800", "50", "852", "-52", "853", "-53"]
    assert table["MATH"][1:7] == ["74.0", "150", "73.1", "+0.9", "73.1", "+0.9"]
    assert table["MMMU (test)"][1] == "—" and table["MMMU (test)"][-1].startswith("not reproducible")
    assert (tmp_path / "report.md").read_text() == result.output.split("nvlm-eval: wrote")[0]
    with Image.open(tmp_path / "report.png") as chart:
        assert chart.format == "PNG" and chart.width > 600 and chart.height > 150


def test_report_of_an_empty_folder_is_exit_3(tmp_path: Path) -> None:
    result = invoke("report", str(tmp_path))
    assert result.exit_code == 3 and "holds no harness results" in result.output


def test_resume_refuses_results_of_other_settings(tmp_path: Path) -> None:
    _lmms_results(tmp_path / "chartqa" / "oracle-model", "nvlm_chartqa", {"relaxed_overall,none": 0.5}, 10)
    (tmp_path / "chartqa" / "nvlm-eval.json").write_text(json.dumps({"limit": 10, "model": "oracle-model"}))
    with oracle_server({}) as server:
        same = invoke("run", "--base-url", server.url, "--rows", "chartqa", "--limit", "10", "-o", str(tmp_path))
        other = invoke("run", "--base-url", server.url, "--rows", "chartqa", "--limit", "20", "-o", str(tmp_path))
    assert same.exit_code == 0 and "chartqa: done before, 50.0 (skipped" in same.output
    assert other.exit_code == 2 and "limit=10" in other.output and "--force" in other.output


def test_no_project_module_imports_a_harness() -> None:
    root = Path(__file__).resolve().parents[2]
    importing = [str(path.relative_to(root)) for package in ("nvlm_engine", "nvlm_langchain", "nvlm_server", "nvlm_eval")
                 for path in (root / package).rglob("*.py")
                 if any(line.lstrip().startswith((f"import {m}", f"from {m}")) for m in ("lmms_eval", "lm_eval")
                        for line in path.read_text().splitlines())]
    assert importing == []


def test_the_key_is_hidden_in_harness_output_split_anywhere() -> None:
    text = b"model_args: api_key=s3cret-key, base_url=x ... s3cret-key!"
    for size in range(1, len(text) + 1):
        redactor = harness._Redactor(b"s3cret-key")
        shown = b"".join(redactor.feed(text[i:i + size]) for i in range(0, len(text), size)) + redactor.flush()
        assert shown == b"model_args: api_key=***, base_url=x ... ***!", size
