"""The benchmark scripts keep running: `bench/gpu_check.py --smoke` and `bench/bench_decode_core.py --smoke`.

Both run on the CPU with tiny shapes as subprocesses (their figures mean nothing here; what is
checked is that every step and part still runs end to end against today's engine API). The
GPU check is run on a GPU machine by hand; this keeps it from rotting between those runs.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "bench" / "gpu_check.py"
DECODE_BENCH = ROOT / "bench" / "bench_decode_core.py"

pytestmark = pytest.mark.slow


def _steps() -> tuple[str, ...]:
    """The script's own list of steps (read from its source: importing it would set up torch paths)."""
    for node in ast.parse(GPU_CHECK.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "STEPS" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError("bench/gpu_check.py defines no STEPS")


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, OUT=str(tmp_path / "out"), OMP_NUM_THREADS="1",
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def test_gpu_check_smoke_runs_every_step_on_the_cpu(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(GPU_CHECK), "--smoke"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=_env(tmp_path), check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert results["meta"]["smoke"] is True
    steps = results["steps"]
    expected = _steps()
    assert {"environment", "copy_bandwidth", "build_slice", "decode", "vision_prefill", "turn2_prefix", "fp8",
            "tp2_half_width"} <= set(expected)
    for name in expected:
        assert name in steps, f"step {name} missing from the JSON"
        step = steps[name]
        # Every step has figures, or says why it has none (skipped with a reason, or an error).
        assert step["figures"] or step.get("reason") or step.get("error"), (name, step)
        assert step["status"] != "error", (name, step.get("error"), step.get("traceback"))
        assert not step["errors"], (name, step["errors"])
        assert step["status"] == "ok" or step.get("reason"), (name, step)
    decode = steps["decode"]["figures"]
    for case in decode.values():
        assert case["eager"]["wall_ms"] > 0
        assert isinstance(case["compiled"], dict), case["compiled"]  # the smoke compiles every case
        assert case["compiled"]["counters"]["graph_breaks"] == 0
    assert steps["turn2_prefix"]["figures"]["turn2_prefix_hit_tokens"] > 0
    assert steps["vision_prefill"]["figures"]["tiles"] == 7


def test_gpu_check_without_cuda_exits_zero_with_a_message(tmp_path: Path) -> None:
    env = _env(tmp_path)
    env["CUDA_VISIBLE_DEVICES"] = ""  # hides any GPU, so this holds on a GPU machine too
    done = subprocess.run([sys.executable, str(GPU_CHECK)], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env=env, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no CUDA GPU" in done.stdout


def test_decode_core_bench_smoke_prints_every_target(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(DECODE_BENCH), "--smoke"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=_env(tmp_path), check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for part in ("[a]", "[b]", "[c]", "[d]", "=== summary"):
        assert part in out, part
    verdicts = [line for line in out.splitlines() if line.strip().startswith(("[PASS]", "[MISS]"))]
    assert len(verdicts) == 4, out[-2000:]  # slope; tokens/s and gap of the default core; turn 2
    assert "no gap bound" in out  # the throughput ceiling, for information
