"""The README's snippets run as pasted, in order, from another directory.

Every fenced block is bash or python and either runs here or carries a
`<!-- readme-test: skip (reason) -->` line naming why it cannot (GPUs, a download, a terminal).
The bash blocks run in one shell, in order, as a user with the virtualenv activated would run
them (its bin first on PATH), from an empty directory, with the tiny checkpoint standing in for
`/models/NVLM-D-72B` and a free port for 8000. The python blocks run in one namespace, in order,
from an empty directory. The conventions the README promises are checked too.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from nvlm_engine import exit_codes

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(?:<!-- readme-test: skip \((?P<reason>[^)]+)\) -->\n)?^```(?P<lang>\w*)\n(?P<code>.*?)^```$",
                   re.DOTALL | re.MULTILINE)
REAL_MODEL = "/models/NVLM-D-72B"


@dataclass(frozen=True)
class Snippet:
    lang: str
    code: str
    line: int
    skip: str | None


def _snippets() -> list[Snippet]:
    text = README.read_text(encoding="utf-8")
    return [Snippet(m["lang"], m["code"], text.count("\n", 0, m.start("code")) + 1, m["reason"])
            for m in BLOCK.finditer(text)]


def _runnable(lang: str) -> list[Snippet]:
    return [s for s in _snippets() if s.lang == lang and s.skip is None]


def test_every_snippet_runs_or_says_why_not() -> None:
    snippets = _snippets()
    assert len(snippets) >= 10
    assert all(s.lang in ("bash", "python") for s in snippets), [(s.line, s.lang) for s in snippets]
    assert len(_runnable("bash")) >= 3 and len(_runnable("python")) >= 3


def test_the_conventions_the_readme_promises() -> None:
    text = README.read_text(encoding="utf-8")
    # one convention: the virtualenv activated, never `.venv/bin/...` commands
    assert re.findall(r"\.venv/bin/\w+", text) == [".venv/bin/activate"] * text.count(".venv/bin/activate")
    for snippet in _snippets():
        for line in snippet.code.splitlines():
            if "pip install" in line:  # only after activating, so it installs into the virtualenv
                assert ". .venv/bin/activate &&" in line.split("pip install")[0], (snippet.line, line)
        if snippet.skip is None:
            assert "/tmp/" not in snippet.code, f"README.md:{snippet.line} writes to /tmp: use mktemp -d"
    # the exit-code table is the commands' own
    rows = re.findall(r"^\| (\d+) \| (.+) \|$", text, flags=re.MULTILINE)
    assert [(int(code), meaning.replace("\\|", "|")) for code, meaning in rows] == list(exit_codes.TABLE)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_bash_snippets_run_in_order(tiny_checkpoint: Path, tmp_path: Path) -> None:
    script = "set -euo pipefail\n" + "\n".join(s.code for s in _runnable("bash"))
    script = script.replace(REAL_MODEL, str(tiny_checkpoint)).replace("8000", str(_free_port()))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "elsewhere").mkdir()
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("NVLM_MODEL", "NVLM_API_KEY", "PYTHONPATH")}
    env.update(PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(Path(venv_bin).parent),
               TMPDIR=str(tmp_path / "tmp"), HOME=str(tmp_path))
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path / "elsewhere", env=env, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    out = result.stdout
    assert "RANDOM weights" in result.stderr  # the demo
    assert "Fits." in out and "Run it: nvlm-chat" in out  # the plan
    assert '"finish_reason"' in out and '"usage"' in out  # nvlm-chat --json
    assert '"status":"ok"' in out and '"object":"chat.completion"' in out  # the server answered
    assert "Traceback" not in result.stderr


def test_python_snippets_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for snippet in _runnable("python"):
        code = compile("\n" * (snippet.line - 1) + snippet.code, str(README), "exec")  # README line numbers
        exec(code, namespace)  # noqa: S102 (the README's own code)
    out = capsys.readouterr().out
    assert "'name': 'get_weather'" in out and "'city': " in out  # the forced tool call
    assert "paid=" in out  # structured output
    assert "'ocr_document'" in out  # the toolkit
    assert re.search(r"\n (length|stop) Usage\(", out)  # the engine's stream
    assert list(tmp_path.iterdir()) == []  # nothing written to the working directory
