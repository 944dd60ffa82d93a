"""Hugging Face ids: a local hub cache laid out as huggingface_hub writes it, resolved offline.

The cache is written by the test (`models--org--name/{blobs,refs/main,snapshots/<commit>/...}`,
snapshot entries linked to blobs) under `tmp_path`, with HF_HOME / HF_HUB_CACHE pointed there and
HF_HUB_OFFLINE set, so nothing here reaches the network. The patterns a download asks for are
checked on a fake `huggingface_hub.snapshot_download` (the package boundary).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

from nvlm_engine.errors import CheckpointError, CheckpointNotFoundError, HubDownloadError, HubOfflineError
from nvlm_engine.hub import ENGINE_FILES, PLAN_FILES, display_name, download_command, is_repo_id, resolve_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def write_hub_repo(cache: Path, repo_id: str, source: Path, *, commit: str = COMMIT, ref: str | None = "main",
                   names: list[str] | None = None) -> Path:
    """Put `source`'s files into `cache` as huggingface_hub does; returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blobs, snapshot = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(source.iterdir()):
        if not file.is_file() or (names is not None and file.name not in names):
            continue
        data = file.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        os.symlink(Path("..", "..", "blobs", blob.name), snapshot / file.name)
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty offline hub cache: HF_HOME and HF_HUB_CACHE point at it, HF_HUB_OFFLINE is on.

    huggingface_hub reads those variables once, at import; its module constants are set too.
    """
    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # "org/name" is no folder here
    return cache


def test_a_cached_id_resolves_offline_to_its_snapshot(hub_cache: Path, tiny_checkpoint: Path) -> None:
    snapshot = write_hub_repo(hub_cache, "org/name", tiny_checkpoint)
    assert resolve_checkpoint("org/name") == snapshot
    assert (snapshot / "config.json").is_symlink()


def test_a_local_folder_wins_over_the_cache(hub_cache: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    write_hub_repo(hub_cache, "org/name", tiny_checkpoint)
    local = tmp_path / "org" / "name"
    local.mkdir(parents=True)
    assert resolve_checkpoint("org/name") == Path("org/name")
    assert display_name("org/name", local) == "name"


def test_revision_pins_a_branch_or_a_commit(hub_cache: Path, tiny_checkpoint: Path) -> None:
    main = write_hub_repo(hub_cache, "org/name", tiny_checkpoint)
    other = write_hub_repo(hub_cache, "org/name", tiny_checkpoint, commit=OTHER_COMMIT, ref="v2")
    assert resolve_checkpoint("org/name") == main
    assert resolve_checkpoint("org/name", revision="v2") == other
    assert resolve_checkpoint("org/name", revision=OTHER_COMMIT) == other
    with pytest.raises(CheckpointNotFoundError, match=r"\(revision v3\).*--revision v3"):
        resolve_checkpoint("org/name", revision="v3")


def test_the_engine_loads_an_id_from_the_cache(hub_cache: Path, tiny_checkpoint: Path) -> None:
    from nvlm_engine import NVLMEngine

    write_hub_repo(hub_cache, "org/tiny-nvlm", tiny_checkpoint)
    engine = NVLMEngine.from_pretrained("org/tiny-nvlm", device_map="cpu", dtype="float32", progress=False)
    assert engine.name == "tiny-nvlm"  # the repo's name, not the commit hash
    result = engine.generate([{"role": "user", "content": "hi"}], max_new_tokens=2)
    assert result.usage.completion_tokens >= 1


def test_a_missing_id_names_the_hf_download_command(hub_cache: Path) -> None:
    with pytest.raises(CheckpointNotFoundError) as caught:
        resolve_checkpoint("org/missing")
    message = str(caught.value)
    assert "\n" not in message
    assert "not (completely) in the Hugging Face cache" in message and str(hub_cache) in message
    assert "`hf download org/missing --include '*.safetensors' --include '*.json' --include merges.txt`" in message
    assert "download=True / --download" in message
    assert "huggingface-cli" not in message


def test_a_missing_folder_that_is_no_id_says_so(hub_cache: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match=r"folder nope does not exist.*hf download nvidia/NVLM-D-72B"):
        resolve_checkpoint("nope")
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        resolve_checkpoint("/no/such/folder")


def test_download_is_refused_offline_naming_hf_hub_offline(hub_cache: Path) -> None:
    with pytest.raises(HubOfflineError) as caught:
        resolve_checkpoint("org/missing", download=True)
    assert "HF_HUB_OFFLINE is set" in str(caught.value) and "\n" not in str(caught.value)
    assert isinstance(caught.value, CheckpointError)


def test_an_incomplete_snapshot_without_config_is_reported(hub_cache: Path, tiny_checkpoint: Path) -> None:
    write_hub_repo(hub_cache, "org/name", tiny_checkpoint, names=["vocab.json"])
    with pytest.raises(CheckpointNotFoundError, match="without its config.json.*hf download org/name"):
        resolve_checkpoint("org/name")


def test_a_revision_with_a_local_folder_is_refused(tiny_checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match="applies to Hugging Face ids"):
        resolve_checkpoint(tiny_checkpoint, revision="main")


class FakeHub:
    """`huggingface_hub.snapshot_download` at the package boundary: records calls, has nothing cached."""

    def __init__(self, folder: Path, error: Exception | None = None) -> None:
        self.folder, self.error, self.calls = folder, error, []

    def __call__(self, repo_id: str, **kwargs: Any) -> str:
        self.calls.append({"repo_id": repo_id, **kwargs})
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        if self.error is not None:
            raise self.error
        return str(self.folder)


@pytest.fixture
def online(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_a_download_asks_only_for_what_the_engine_reads(online: None, tiny_checkpoint: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeHub(tiny_checkpoint)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert resolve_checkpoint("org/name", revision="abc123", download=True, progress=False) == tiny_checkpoint
    lookup, download = fake.calls
    assert lookup["local_files_only"] is True and not download.get("local_files_only")
    assert lookup["revision"] == download["revision"] == "abc123"
    patterns = download["allow_patterns"]
    assert patterns == lookup["allow_patterns"] == list(ENGINE_FILES)

    def fetched(name: str) -> bool:
        return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)

    for needed in ("model-00001-of-00046.safetensors", "model.safetensors", "model.safetensors.index.json",
                   "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json"):
        assert fetched(needed), needed
    for refused in ("modeling_nvlm_d.py", "configuration_nvlm_d.py", "pytorch_model.bin", "model.pt", "model.pth",
                    "model.ckpt", "weights.pkl", "pytorch_model.bin.index.json", "README.md", "images/x.png"):
        assert not fetched(refused), refused
    assert download["tqdm_class"] is not None  # progress=False: a silent bar class


def test_plan_fetches_only_the_config_and_index(online: None, tiny_checkpoint: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeHub(tiny_checkpoint)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    resolve_checkpoint("org/name", download=True, files=PLAN_FILES)
    assert fake.calls[-1]["allow_patterns"] == ["config.json", "model.safetensors.index.json"]


def _http_error(kind: type[Exception], status: int) -> Exception:
    import httpx2

    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/name")
    response = httpx2.Response(status, request=request, text="SERVER-SECRET-BODY")
    return kind("SERVER-SECRET-BODY", response=response)


@pytest.mark.parametrize(("kind", "status", "words"), [
    (GatedRepoError, 403, "is gated: accept its terms at https://huggingface.co/org/name"),
    (RepositoryNotFoundError, 404, "is not a model repository on the Hugging Face Hub"),
])
def test_download_failures_are_one_line_without_the_server_text(online: None, tiny_checkpoint: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                kind: type[Exception], status: int, words: str) -> None:
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(tiny_checkpoint, _http_error(kind, status)))
    with pytest.raises(HubDownloadError) as caught:
        resolve_checkpoint("org/name", download=True)
    assert words in str(caught.value)
    assert "SERVER-SECRET-BODY" not in str(caught.value) and "\n" not in str(caught.value)


def test_repo_id_shapes() -> None:
    assert is_repo_id("nvidia/NVLM-D-72B") and is_repo_id("org/name.v2")
    for text in ("name", "/abs/path", "./rel", "a/b/c", "org/..", "org--x/y", "~/models", "org/name/"):
        assert not is_repo_id(text), text
    assert download_command("org/x", "v1").endswith("--revision v1")


def test_the_environment_variables_are_huggingface_hubs_own(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """In a fresh process, HF_HOME alone places the cache and HF_HUB_OFFLINE=1 refuses downloads."""
    home = tmp_path / "home"
    snapshot = write_hub_repo(home / "hub", "org/name", tiny_checkpoint)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    code = ("import sys\nfrom nvlm_engine.hub import resolve_checkpoint\nprint(resolve_checkpoint('org/name'))\n"
            "try:\n    resolve_checkpoint('org/other', download=True)\nexcept Exception as e:\n"
            "    print(type(e).__name__, e)\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    found, refusal = done.stdout.splitlines()
    assert Path(found) == snapshot
    assert refusal.startswith("HubOfflineError Cannot download org/other: HF_HUB_OFFLINE is set")


def test_plan_takes_an_id_from_the_cache(hub_cache: Path, real_72b: Path) -> None:
    from click.testing import CliRunner

    from nvlm_engine.cli import main

    write_hub_repo(hub_cache, "nvidia/NVLM-D-72B", real_72b, names=["config.json", "model.safetensors.index.json"])
    result = CliRunner().invoke(main, ["plan", "nvidia/NVLM-D-72B", "--gpus", "2xH200"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("NVLM-D-72B: 2 x H200")
    assert "Run it: nvlm-chat -m nvidia/NVLM-D-72B" in result.output
    missing = CliRunner().invoke(main, ["plan", "nvidia/other", "--gpus", "2xH200", "--download"])
    assert missing.exit_code == 4 and "HF_HUB_OFFLINE is set" in missing.output
    shutil.rmtree(hub_cache)


def test_nvlm_chat_answers_from_a_hub_id_offline(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """`nvlm-chat -m org/name` finds the id in the Hugging Face cache with the network off, and
    `--download` of an id that is not there is refused offline, in one line, naming HF_HUB_OFFLINE."""
    import subprocess
    import sys

    cache = tmp_path / "hub"
    write_hub_repo(cache, "acme/nvlm-tiny", tiny_checkpoint)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "NVLM_"))},
           "HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    chat = [str(Path(sys.executable).parent / "nvlm-chat"), "--device-map", "cpu", "--max-tokens", "3"]
    answered = subprocess.run([*chat, "-m", "acme/nvlm-tiny", "Hi"], capture_output=True, text=True, timeout=300,
                              env=env, check=False)
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout.strip()
    refused = subprocess.run([*chat, "-m", "acme/absent", "--download", "Hi"], capture_output=True, text=True,
                             timeout=300, env=env, check=False)
    assert refused.returncode == 4  # exit_codes.MODEL
    assert "HF_HUB_OFFLINE" in refused.stderr and "Traceback" not in refused.stderr
