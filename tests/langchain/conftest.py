"""Fixtures for the LangChain tests: ChatNVLM on the session's tiny checkpoint (tests/conftest.py).

The tiny checkpoint has random weights and, when ../shared/nvlm-d-72b is present, the real
152k-token tokenizer; every ChatNVLM here shares one loaded engine through the registry.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from lc_inputs import CHAT_PARAMS

pytest.importorskip("langchain_core")
pytest.importorskip("xgrammar")

@pytest.fixture(scope="module", autouse=True)
def _one_intra_op_thread():
    """One torch thread while these tests run: the tiny model's ops are too small to gain from
    two, and on a 2-core machine shared with other test runs OpenMP's spinning threads made each
    op ~7x slower (a 1-tile image request: 1.3 s with 2 threads, 0.17 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def nvlm_path(tiny_checkpoint: Path) -> str:
    return str(tiny_checkpoint)


@pytest.fixture(scope="session")
def nvlm_alias(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Another name (a symlink) for the tiny checkpoint: a per-call `model` that shares its engine."""
    link = tmp_path_factory.mktemp("alias") / "tiny-nvlm-alias"
    os.symlink(tiny_checkpoint, link)
    return str(link)


@pytest.fixture(scope="session")
def chat(nvlm_path: str):
    from nvlm_langchain import ChatNVLM

    return ChatNVLM(model=nvlm_path, max_tokens=12, **CHAT_PARAMS)
