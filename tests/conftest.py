"""Shared fixtures: the real 72B metadata from ../shared (skipped where absent) and tiny checkpoints."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from shared_paths import REAL_72B, SHARED, TESTDATA_IMAGES, TOKEN_SCALE  # noqa: F401 (re-exported)


def require_real_72b() -> Path:
    if not (REAL_72B / "config.json").is_file():
        pytest.skip(f"the real NVLM-D-72B metadata is not at {REAL_72B} (it sits beside the project in CI)")
    return REAL_72B


@pytest.fixture(scope="session")
def real_72b() -> Path:
    return require_real_72b()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random NVLM-D in the published layout, with the real tokenizer when available."""
    from nvlm_engine.testing import build_tiny_checkpoint

    folder = tmp_path_factory.mktemp("tiny-nvlm")
    source = REAL_72B if (REAL_72B / "vocab.json").is_file() else None
    return build_tiny_checkpoint(folder, tokenizer_from=source)


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint: Path):
    from nvlm_engine import NVLMEngine

    return NVLMEngine.from_pretrained(tiny_checkpoint, device_map="cpu", dtype="float32")


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every address the engine's fetcher connects to (tests of URL fetching)."""
    from nvlm_engine import fetch

    seen: list[str] = []
    real = fetch._open_connection

    def watched(family: int, sockaddr: tuple, timeout: float) -> socket.socket:
        seen.append(sockaddr[0])
        return real(family, sockaddr, timeout)

    monkeypatch.setattr(fetch, "_open_connection", watched)
    return seen


@pytest.fixture(scope="module")
def real_tokenizer():
    """The real NVLM-D-72B tokenizer from ../shared (skipped where absent)."""
    from nvlm_engine.tokenizer import load_tokenizer

    return load_tokenizer(require_real_72b())


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """The project's tiny BPE tokenizer (same special tokens and ids layout as the real one)."""
    from nvlm_engine.testing import write_tiny_tokenizer
    from nvlm_engine.tokenizer import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    write_tiny_tokenizer(folder)
    return load_tokenizer(folder)


@pytest.fixture(scope="module", params=["real", "tiny"])
def tokenizer(request: pytest.FixtureRequest):
    """Each of the two tokenizers in turn."""
    return request.getfixturevalue(f"{request.param}_tokenizer")
