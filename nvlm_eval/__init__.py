"""nvlm-eval: reproduce NVLM-D-72B's model card benchmarks against an OpenAI-compatible server.

The rows of the card and how each is run are data (`card.json`, read by `rows.py`); the
harnesses (lmms-eval for the vision rows, lm-eval for the text rows, the `eval` extra) run as
subprocesses (`harness.py`) and are never imported here; their result files become scores
(`results.py`) and the side-by-side table and chart (`report.py`). The command is `cli.py`.
Nothing else in the project imports this package.
"""

from __future__ import annotations

__all__ = ["Row", "load_rows", "select_rows"]

from .rows import Row, load_rows, select_rows
