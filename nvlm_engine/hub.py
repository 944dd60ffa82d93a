"""From a checkpoint name to a local folder: a folder as given, or a Hugging Face repo id.

`resolve_checkpoint("nvidia/NVLM-D-72B")` returns the folder of that model in the Hugging Face
cache; a folder that exists always wins over a repo id of the same spelling. The cache is
huggingface_hub's own (`HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE` and `HF_TOKEN` are read by
huggingface_hub, not here), so a model fetched by `hf download` is found and one fetched here is
found by every other tool. Nothing is downloaded unless asked (`download=True`, `--download`),
and then only the files the engine reads (`ENGINE_FILES`: safetensors shards, their index, JSON
configs and tokenizer files), never `*.py` remote code and never pickled `*.bin`/`*.pt` weights.
Downloads resume where they stopped (huggingface_hub's `.incomplete` files) and show its
progress bars.

Errors are one line each, never quoting what a server sent: `CheckpointNotFoundError` (not a
folder, not in the cache: it names the `hf download` command), `HubOfflineError` (a download asked
for with HF_HUB_OFFLINE set), `HubDownloadError` (unknown repository or revision, gated, no network).
Knows nothing of weights, models or command lines; huggingface_hub is imported on first use.
"""

from __future__ import annotations

import logging
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import CheckpointError, CheckpointNotFoundError, HubDownloadError, HubOfflineError

__all__ = [
    "ENGINE_FILES",
    "EXAMPLE_REPO_ID",
    "PLAN_FILES",
    "display_name",
    "download_command",
    "is_repo_id",
    "resolve_checkpoint",
]

logger = logging.getLogger(__name__)

EXAMPLE_REPO_ID = "nvidia/NVLM-D-72B"

ENGINE_FILES: tuple[str, ...] = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "preprocessor_config.json",
)
"""What the engine reads from a checkpoint, as huggingface_hub `allow_patterns`: no code, no pickles."""

PLAN_FILES: tuple[str, ...] = ("config.json", "model.safetensors.index.json")
"""What `nvlm-engine plan` needs: the config and the tensor index (a few hundred KB)."""

# The `hf download` patterns printed in hints: short, and covering ENGINE_FILES (no code, no pickles).
_HF_CLI_INCLUDE = ("*.safetensors", "*.json", "merges.txt")

# `org/name` as the Hub spells repo ids: letters, digits, '.', '_', '-'; no '..' or '--'.
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def is_repo_id(name: str | Path) -> bool:
    """Whether `name` is shaped like a Hugging Face repo id (`org/name`), not whether it exists."""
    text = str(name)
    return bool(_REPO_ID.fullmatch(text)) and ".." not in text and "--" not in text and not text.endswith(".")


def download_command(repo_id: str, revision: str | None = None) -> str:
    """The `hf download` command that fetches what the engine reads of `repo_id` into the cache."""
    words = ["hf", "download", repo_id]
    for pattern in _HF_CLI_INCLUDE:
        words += ["--include", pattern]
    if revision:
        words += ["--revision", revision]
    return " ".join(shlex.quote(word) for word in words)


def display_name(name: str | Path, folder: Path) -> str:
    """A short name for a checkpoint: the folder's name, or the repo's ("NVLM-D-72B", not the commit hash)."""
    given = Path(name).expanduser()
    if given.is_dir() or not is_repo_id(name):
        return given.name or folder.name
    return str(name).rsplit("/", 1)[-1]


def resolve_checkpoint(
    name: str | Path,
    *,
    revision: str | None = None,
    download: bool = False,
    progress: bool | None = None,
    files: Sequence[str] = ENGINE_FILES,
) -> Path:
    """The local folder of the checkpoint `name`: a folder, or a Hugging Face repo id.

    Args:
        name: a checkpoint folder, or a repo id such as "nvidia/NVLM-D-72B". An existing folder
            wins; otherwise an `org/name` string is looked up in the Hugging Face cache.
        revision: a branch, tag or commit of the repo (default "main"); only for repo ids.
        download: fetch the repo's `files` when the cache lacks them. Off, nothing is fetched.
        progress: download progress bars: None or True are huggingface_hub's (which honour
            HF_HUB_DISABLE_PROGRESS_BARS), False none.
        files: the `allow_patterns` looked up and fetched; default what the engine reads.

    Raises:
        CheckpointNotFoundError: not a folder, and not (completely) in the cache while
            `download` is off; the message names the `hf download` command.
        HubOfflineError: `download=True` with HF_HUB_OFFLINE set, and the cache lacks the files.
        HubDownloadError: the Hub refused or could not be reached (unknown repository or
            revision, gated model, no network, disk full).
        CheckpointError: a revision given with a local folder.
    """
    folder = Path(name).expanduser()
    if folder.is_dir():
        if revision is not None:
            raise CheckpointError(
                f"revision={revision!r} applies to Hugging Face ids, but {folder} is a local folder; drop the "
                "revision, or name the repo id instead."
            )
        return folder
    repo_id = str(name)
    if not is_repo_id(repo_id):
        raise CheckpointNotFoundError(
            f"Checkpoint folder {folder} does not exist. Pass the folder of a downloaded NVLM-D checkpoint, or a "
            f"Hugging Face id such as {EXAMPLE_REPO_ID} (fetch it with `{download_command(EXAMPLE_REPO_ID)}`, or "
            "pass download=True / --download)."
        )
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = list(files)
    try:
        cached = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                                   local_files_only=True)
    except LocalEntryNotFoundError as e:
        miss: Exception = e
    else:
        logger.info("%s%s resolved to %s (Hugging Face cache)", repo_id, f"@{revision}" if revision else "", cached)
        return _complete(Path(cached), repo_id, revision, patterns)
    if not download:
        raise CheckpointNotFoundError(
            f"No folder {folder} here, and {repo_id}{f' (revision {revision})' if revision else ''} is not "
            f"(completely) in the Hugging Face cache ({constants.HF_HUB_CACHE}). Download it with "
            f"`{download_command(repo_id, revision)}`, or pass download=True / --download."
        ) from miss
    if constants.HF_HUB_OFFLINE:
        raise HubOfflineError(
            f"Cannot download {repo_id}: HF_HUB_OFFLINE is set, so huggingface_hub makes no network request, "
            f"and the cache ({constants.HF_HUB_CACHE}) lacks it. Unset HF_HUB_OFFLINE to download, or copy the "
            f"files in with `{download_command(repo_id, revision)}` on a machine that is online."
        ) from miss
    logger.info("downloading %s%s from the Hugging Face Hub (%s)", repo_id, f"@{revision}" if revision else "",
                ", ".join(patterns))
    try:
        fetched = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                                    tqdm_class=_silent_tqdm() if progress is False else None)
    except Exception as e:  # huggingface_hub and httpx raise many types; each becomes one line
        raise _download_error(e, repo_id, revision) from e
    return _complete(Path(fetched), repo_id, revision, patterns)


def _complete(folder: Path, repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    """The snapshot, checked to hold config.json when it was asked for (a partial download often lacks it)."""
    if "config.json" in patterns and not (folder / "config.json").is_file():
        raise CheckpointNotFoundError(
            f"The Hugging Face cache holds {repo_id} at {folder} without its config.json: the download is "
            f"incomplete, or {repo_id} is not an NVLM-D checkpoint. Complete it with "
            f"`{download_command(repo_id, revision)}`."
        )
    return folder


def _download_error(error: Exception, repo_id: str, revision: str | None) -> HubDownloadError:
    """One line for a failed download; a server's response text is never quoted."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(error, OfflineModeIsEnabled):
        return HubOfflineError(f"Cannot download {repo_id}: HF_HUB_OFFLINE is set. Unset it to download.")
    if isinstance(error, GatedRepoError):
        return HubDownloadError(
            f"{repo_id} is gated: accept its terms at https://huggingface.co/{repo_id} and log in with "
            "`hf auth login` (or set HF_TOKEN), then retry."
        )
    if isinstance(error, RepositoryNotFoundError):
        return HubDownloadError(
            f"{repo_id} is not a model repository on the Hugging Face Hub, or it is private: check the id, or log "
            "in with `hf auth login` (or set HF_TOKEN) if you have access."
        )
    if isinstance(error, RevisionNotFoundError):
        return HubDownloadError(f"{repo_id} has no revision {revision!r}; pass one of its branches, tags or commits.")
    if isinstance(error, HfHubHTTPError):
        status = _status(error)
        return HubDownloadError(
            f"Downloading {repo_id} failed: the Hub answered HTTP {status}. Retry later; the download resumes "
            "where it stopped."
        )
    if isinstance(error, LocalEntryNotFoundError):  # the Hub could not be reached and the cache lacks files
        return HubDownloadError(
            f"Cannot reach the Hugging Face Hub to download {repo_id} ({type(error.__cause__ or error).__name__}). "
            "Check the network (and HF_ENDPOINT), then retry; the download resumes where it stopped."
        )
    if isinstance(error, OSError):
        return HubDownloadError(
            f"Downloading {repo_id} into {constants.HF_HUB_CACHE} failed ({type(error).__name__}"
            f"{': ' + error.strerror if error.strerror else ''}). Check free space and permissions there "
            "(HF_HUB_CACHE or HF_HOME moves it), then retry."
        )
    return HubDownloadError(
        f"Downloading {repo_id} failed ({type(error).__name__}). Check the network and retry, or fetch it with "
        f"`{download_command(repo_id, revision)}`."
    )


def _status(error: Exception) -> str:
    try:
        return str(error.response.status_code)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 (no response attached: any failure to read it)
        return "error"


def _silent_tqdm() -> type[Any]:
    """A tqdm class that draws nothing (huggingface_hub's `tqdm_class` for progress=False)."""
    from tqdm.auto import tqdm

    class SilentTqdm(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return SilentTqdm
