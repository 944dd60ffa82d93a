"""nvlm-eval end to end: the real harnesses on tiny offline fixtures, against an oracle and against nvlm-serve.

The fixture tasks include the project's own ChartQA and DocVQA task YAMLs (only the data is
swapped for a local parquet) and an lm-eval JSONL task whose answer continues a trailing
assistant message, as HumanEval's does. The oracle server answers every fixture question with
its gold answer: 100% on every row proves that prompts, answers, parsers and metrics fit
together; its wrong twin scores 0, so a metric that cannot fail would be caught. Then the same
rows run against nvlm-serve on the tiny checkpoint, resume, and the report reads them back.

Skipped where the `eval` extra (lmms-eval, lm-eval) is not installed, as in CI.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Found, not imported: importing lmms_eval sets Pillow's process-wide LOAD_TRUNCATED_IMAGES, which
# would make every later image test in this process accept truncated files.
_MISSING = [m for m in ("lmms_eval", "lm_eval", "datasets") if importlib.util.find_spec(m) is None]
if _MISSING:
    pytest.skip(f"the evaluation harnesses are not installed ({', '.join(_MISSING)}): pip install -e '.[eval]'",
                allow_module_level=True)
from click.testing import CliRunner
from eval_fixtures import CHARTQA, DOCVQA, GEN_PREFIX, TEXT_QA, gold_answers, write_tasks
from eval_stub import oracle_server
from server.conftest import running_server  # tests/server: the real nvlm-serve on a loopback port

from nvlm_eval.cli import main
from nvlm_server import ServerSettings

ROWS = "chartqa,docvqa,fixture_qa"


@pytest.fixture(scope="module")
def fixture_tasks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_tasks(tmp_path_factory.mktemp("eval-tasks"))


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")


def arguments(url: str, tasks: tuple[Path, Path], output: Path, rows: str = ROWS) -> list[str]:
    return ["run", "--base-url", url, "--rows", rows, "--tasks-dir", str(tasks[0]), "--rows-file", str(tasks[1]),
            "-o", str(output), "-q"]


def scores(output: Path, rows: str = ROWS) -> dict[str, float]:
    return {key: json.loads((output / key / "nvlm-eval.json").read_text())["score"] for key in rows.split(",")}


def test_the_oracle_scores_100_and_its_wrong_twin_0(fixture_tasks, tmp_path: Path) -> None:
    # Both runs at once, as `python -m nvlm_eval` processes: each harness start costs ~10 s of imports.
    with oracle_server(gold_answers()) as oracle, oracle_server(gold_answers(), wrong=True) as wrong_oracle:
        runs = [subprocess.Popen([sys.executable, "-m", "nvlm_eval", *arguments(url, fixture_tasks, tmp_path / name)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for url, name in ((oracle.url, "right"), (wrong_oracle.url, "wrong"))]
        outputs = [process.communicate(timeout=600)[0] for process in runs]
    assert [process.returncode for process in runs] == [0, 0], outputs
    assert scores(tmp_path / "right") == {"chartqa": 100.0, "docvqa": 100.0, "fixture_qa": 100.0}
    assert scores(tmp_path / "wrong") == {"chartqa": 0.0, "docvqa": 0.0, "fixture_qa": 0.0}
    # what the harnesses sent: the card's system turn, the image first as a PNG data URL, NVLM's prompt
    vision = [r for r in oracle.requests if r["messages"][0]["role"] == "system"]
    assert len(vision) == len(CHARTQA) + len(DOCVQA)
    for request in vision:
        system, user = request["messages"]
        assert system["content"] == [{"type": "text", "text": "Answer the questions."}]
        image, text = user["content"]
        assert image["image_url"]["url"].startswith("data:image/png;base64,") and request["temperature"] == 0
        assert text["text"].endswith(("\nAnswer the question using a single word or phrase.",
                                      "\nAnswer the question using a single word, phrase, or number."))
    # lm-eval: the answer prefix as a trailing assistant message, no flag, with stop and seed
    text_requests = [r for r in oracle.requests if r["messages"][-1]["role"] == "assistant"]
    assert len(text_requests) == len(TEXT_QA)
    assert all(r["messages"][-1]["content"] == GEN_PREFIX and "continue_final_message" not in r for r in text_requests)
    assert all(r["stop"] == ["\n"] and r["seed"] == 1234 and r["model"] == "oracle-model" for r in text_requests)
    assert len(wrong_oracle.requests) == len(oracle.requests)


def test_against_nvlm_serve_with_resume_and_report(fixture_tasks, tiny_engine, tmp_path: Path) -> None:
    out, rows, key = tmp_path / "served", "chartqa,fixture_qa", "k3y-s3cret"  # DocVQA's plumbing: the oracle test's
    with running_server(tiny_engine, ServerSettings(model_name="nvlm-tiny", max_tiles=6, api_key=key)) as url:
        first = CliRunner().invoke(main, [*arguments(url + "/v1", fixture_tasks, out, rows), "--concurrency", "4"],
                                   env={"NVLM_API_KEY": key})
        assert first.exit_code == 0, first.output
        again = CliRunner().invoke(main, arguments(url, fixture_tasks, out, rows), env={"NVLM_API_KEY": key})
    assert again.exit_code == 0 and again.output.count("done before") == 2, again.output
    got = scores(out, rows)
    assert all(0.0 <= value <= 100.0 for value in got.values())
    record = json.loads((out / "chartqa" / "nvlm-eval.json").read_text())
    assert record["model"] == "nvlm-tiny" and record["server_max_tiles"] == 6 and record["returncode"] == 0
    assert key not in (out / "chartqa" / "nvlm-eval.json").read_text() and "api_key=***" in str(record["command"])
    log = (out / "chartqa" / "harness.log").read_text()
    assert key not in log and "api_key=***" in log
    # per-sample logs: one line per question, with what the model answered
    samples = {key: list((out / key).rglob("*samples*.jsonl")) for key in rows.split(",")}
    assert all(len(files) == 1 for files in samples.values()), samples
    lines = samples["chartqa"][0].read_text().splitlines()
    assert len(lines) == len(CHARTQA) and all("filtered_resps" in json.loads(line) for line in lines)
    report = CliRunner().invoke(main, ["report", str(out)])
    assert report.exit_code == 0, report.output
    assert f"| ChartQA (test) | {got['chartqa']:.1f} | {len(CHARTQA)} | 86.0 | {got['chartqa'] - 86.0:+.1f} |" in report.output
    assert "Fixture QA" in report.output and (out / "report.png").stat().st_size > 1000


# --- every task YAML of evaluation/, through lmms-eval's own loader (no data needed) -----------------------------

_IMAGE_DOC = {"question": "what is the TOTAL?"}
_EXPECTED_TEXT = {  # SPEC section 9, the question as written
    "nvlm_chartqa": "what is the TOTAL?\nAnswer the question using a single word or phrase.",
    "nvlm_vqav2_val": "what is the TOTAL?\nAnswer the question using a single word or phrase.",
    "nvlm_docvqa_val": "what is the TOTAL?\nAnswer the question using a single word, phrase, or number.",
    "nvlm_textvqa_val": "what is the TOTAL?\nAnswer the question using a single word, phrase, or number.",
    "nvlm_ocrbench": "what is the TOTAL?",
    "nvlm_realworldqa": "what is the TOTAL?",
    "nvlm_ai2d": "what is the TOTAL?\nA. 3\nB. 4\nAnswer with the option's letter from the given choices directly.",
}


@pytest.fixture(autouse=True)
def _pillow_stays_strict() -> Iterator[None]:
    """lmms_eval, once imported here, turns on Pillow's LOAD_TRUNCATED_IMAGES; put it back after each test."""
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    yield
    ImageFile.LOAD_TRUNCATED_IMAGES = before


def _task_config(task: str) -> dict:
    from lmms_eval.utils import load_yaml_config

    return load_yaml_config(str(Path(__file__).resolve().parents[2] / "evaluation" / "lmms_tasks" / f"{task}.yaml"),
                            mode="full")


@pytest.mark.parametrize("task", sorted(_EXPECTED_TEXT))
def test_each_task_yaml_sends_the_card_system_turn_and_nvlm_prompt(task: str) -> None:
    from PIL import Image

    config = _task_config(task)
    kwargs = config["lmms_eval_specific_kwargs"]["default"]
    doc = {**_IMAGE_DOC, "image": Image.new("RGB", (32, 24)), "options": ["3", "4"]}
    messages = config["doc_to_messages"](doc, kwargs)
    assert messages[0] == {"role": "system", "content": [{"type": "text", "text": "Answer the questions."}]}
    (user,) = messages[1:]
    assert [part["type"] for part in user["content"]] == ["image", "text"]  # the image first
    assert user["content"][1]["text"] == _EXPECTED_TEXT[task]
    assert config["metric_list"] and all(callable(config.get(k, len)) for k in ("process_results", "doc_to_visual"))
    assert config["generation_kwargs"]["temperature"] == 0


def test_mmmu_and_mathvista_yamls_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "judge-key")  # MathVista's scorer makes its judge's client on import
    for task in ("nvlm_mmmu_val", "nvlm_mathvista_testmini"):
        config = _task_config(task)
        assert callable(config["doc_to_messages"]) and callable(config["process_results"])
