"""The GPU image's Dockerfile passes hadolint (installed from PyPI by the test extras)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_passes_hadolint() -> None:
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([binary, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_the_server_as_non_root_with_a_model_volume() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["nvlm-serve"' in text
    assert "USER 10001" in text and 'VOLUME ["/models"]' in text
    assert '".[server]"' in text
