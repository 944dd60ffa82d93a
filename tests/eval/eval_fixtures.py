"""Tiny offline datasets in the shapes the harnesses read, written by the tests.

- ChartQA- and DocVQA-shaped parquet files with an image column (datasets' Image feature), and
  task YAMLs that `include` the project's own `evaluation/lmms_tasks/nvlm_chartqa.yaml` and
  `nvlm_docvqa_val.yaml` and only swap the data for the local file: the prompts, system turn,
  scorers and task names under test are the real ones.
- A JSONL task for lm-eval shaped like HumanEval's instruct variant: the question in a user
  turn and `gen_prefix` as a trailing assistant message the server must continue; a row for it
  in a rows file (nvlm-eval's `--rows-file`).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

EVALUATION = Path(__file__).resolve().parents[2] / "evaluation"

CHARTQA = [
    {"question": "What is the highest value in the chart?", "answer": "42", "type": "human_test"},
    {"question": "Which country has the lowest share?", "answer": "Chile", "type": "augmented_test"},
    {"question": "How many bars are blue?", "answer": "3", "type": "human_test"},
]
DOCVQA = [
    {"questionId": 101, "question": "What is the date on the letter?", "answers": ["March 3, 1998", "3 March 1998"]},
    {"questionId": 102, "question": "Who signed the form?", "answers": ["J. Smith"]},
]
TEXT_QA = [
    {"question": "Name the capital of France.", "answer": "Paris"},
    {"question": "Name the largest planet.", "answer": "Jupiter"},
]
GEN_PREFIX = "Here is my answer:"

FIXTURE_ROW = {
    "key": "fixture_qa",
    "label": "Fixture QA (lm-eval, continued answer)",
    "group": "text",
    "card": {"hf": 50.0, "megatron": 60.0},
    "harness": "lm-eval",
    "tasks": ["nvlm_fixture_qa"],
    "metric": "exact_match,none",
    "scale": 100,
    "default": False,
    "status": "reproducible",
    "note": "test fixture",
}


def gold_answers() -> dict[str, str]:
    """Question text -> an answer every scorer accepts (the oracle's table)."""
    answers = {row["question"]: row["answer"] for row in CHARTQA + TEXT_QA}
    answers.update({row["question"]: row["answers"][0] for row in DOCVQA})
    return answers


def _png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _parquet(path: Path, rows: list[dict], features: dict) -> None:
    import datasets

    columns = {name: [row[name] for row in rows] for name in rows[0]}
    columns["image"] = [{"bytes": _png((40 * i % 255, 90, 160)), "path": None} for i in range(len(rows))]
    datasets.Dataset.from_dict(columns, features=datasets.Features({**features, "image": datasets.Image()})).to_parquet(
        str(path))


def write_tasks(root: Path) -> tuple[Path, Path]:
    """Writes the fixture tasks dir (lmms_tasks/, lm_tasks/) and the rows file; returns both paths."""
    import datasets

    lmms, lm = root / "lmms_tasks", root / "lm_tasks"
    lmms.mkdir(parents=True)
    lm.mkdir()
    string = datasets.Value("string")
    _parquet(lmms / "chartqa.parquet", CHARTQA, {"question": string, "answer": string, "type": string})
    _parquet(lmms / "docvqa.parquet", DOCVQA, {"questionId": datasets.Value("int64"), "question": string,
                                               "answers": datasets.Sequence(string)})
    for task, data in (("nvlm_chartqa", "chartqa.parquet"), ("nvlm_docvqa_val", "docvqa.parquet")):
        split = "test" if task == "nvlm_chartqa" else "validation"
        (lmms / f"{task}.yaml").write_text(
            f"include: {EVALUATION / 'lmms_tasks' / (task + '.yaml')}\n"
            "dataset_path: parquet\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {data}\n"
        )
    (lm / "qa.jsonl").write_text("".join(json.dumps(row) + "\n" for row in TEXT_QA))
    (lm / "nvlm_fixture_qa.yaml").write_text(
        "task: nvlm_fixture_qa\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {lm / 'qa.jsonl'}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        'doc_to_text: "{{question}}"\n'
        f'gen_prefix: "{GEN_PREFIX}"\n'
        'doc_to_target: "{{answer}}"\n'
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "    ignore_case: true\n    ignore_punctuation: true\n"
        "metadata:\n  version: 1.0\n"
    )
    rows_file = root / "rows.json"
    rows_file.write_text(json.dumps({"rows": [FIXTURE_ROW]}))
    return root, rows_file
