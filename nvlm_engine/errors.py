"""Typed errors of the engine.

Every error the engine raises on bad input derives from `NVLMError`, says what was wrong
(expected vs received where that helps) and what to do next, and chains the underlying
cause with `raise ... from e`. Asserts guard internal invariants only.
"""

from __future__ import annotations


class NVLMError(Exception):
    """Base class of every error raised by `nvlm_engine`."""


# --- checkpoints -------------------------------------------------------------------------


class CheckpointError(NVLMError):
    """The checkpoint folder cannot be used (missing files, wrong model, bad config)."""


class CheckpointTensorError(CheckpointError):
    """Tensors are missing, unexpected or of the wrong shape.

    Attributes:
        missing: names the model needs that no shard holds.
        unexpected: names some shard holds that the model does not have.
        wrong_shape: name -> (expected shape, shape in the checkpoint).
    """

    def __init__(
        self,
        message: str,
        *,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        wrong_shape: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None,
    ) -> None:
        super().__init__(message)
        self.missing = missing or []
        self.unexpected = unexpected or []
        self.wrong_shape = wrong_shape or {}


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint is stored as pickle (`.bin` / `.pt`), which can execute code on load."""


# --- images ------------------------------------------------------------------------------


class ImageError(NVLMError):
    """An image could not be read or used."""


class ImageDecodeError(ImageError):
    """The bytes are not a readable image (corrupt, truncated or unknown format)."""


class ImageTooLargeError(ImageError):
    """The image has more pixels (or bytes) than allowed: a possible decompression bomb."""


class ImageSourceError(ImageError):
    """The image source is not allowed or not reachable (URL fetching off, missing file...)."""


class ImageOptionsError(ImageError):
    """An image option is out of range (`max_tiles` outside 1..12, a non-positive limit...)."""


# --- prompts and generation --------------------------------------------------------------


class PromptError(NVLMError):
    """The messages cannot be turned into a prompt (bad roles, bad parts, bad options)."""


class ContextLengthError(PromptError):
    """Prompt tokens plus `max_new_tokens` exceed the model's context window."""

    def __init__(self, message: str, *, prompt_tokens: int, max_new_tokens: int, context_length: int) -> None:
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.context_length = context_length


class GenerationOptionsError(NVLMError):
    """A generation option is out of range (negative temperature, top_p outside (0, 1], ...)."""


class SamplingError(NVLMError):
    """No next token can be chosen from a row's logits: every id is forbidden, or they are not finite."""


class RequestFailedError(NVLMError):
    """One request failed while it was prefilled or decoded; it ended alone.

    The other requests of its batch go on untouched. The message names the stage and the kind
    of failure, never the request's content; the full cause is chained (`__cause__`) and logged.

    Attributes:
        stage: "prefill" (starting the request) or "decode" (choosing one of its tokens).
    """

    def __init__(self, message: str, *, stage: str) -> None:
        super().__init__(message)
        self.stage = stage


class ImageURLRefusedError(ImageSourceError):
    """The fetch policy refuses an image URL or one of its redirects (scheme, host, address or hop count).

    Raised before any connection to the refused destination is opened.
    """


class UnsafeCheckpointPathError(UnsafeCheckpointError):
    """A weight file named by the index, or a symlink, leads outside the checkpoint folder.

    Index entries must be plain relative names inside the folder; an absolute or `..` entry, or a
    link whose target lies outside the folder, could make the loader read any file of the machine.
    """


class ImageAspectRatioError(ImageTooLargeError):
    """The image is too elongated to tile (a 1x64,000,000 strip, say).

    A subclass of `ImageTooLargeError` because the harm is the same: decoding and resizing
    cost memory per row, so a strip within the pixel limit can still need gigabytes.
    """


# --- checkpoints named by a Hugging Face id (`nvlm_engine.hub`) ---------------------------


class CheckpointNotFoundError(CheckpointError):
    """No checkpoint by that name: not a folder, and not (completely) in the Hugging Face cache.

    The message names the exact `hf download ...` command that fetches it, or `download=True`.
    """


class HubDownloadError(CheckpointError):
    """A download from the Hugging Face Hub failed: unknown repository or revision, gated, unreachable."""


class HubOfflineError(HubDownloadError):
    """A download was asked for (`download=True`, `--download`) while HF_HUB_OFFLINE is set."""


class LoadOptionsError(NVLMError, ValueError):
    """An argument of `NVLMEngine.from_pretrained` has a value it cannot use (a `progress` of the wrong kind...)."""


# --- tensor parallelism (`nvlm_engine.tensor_parallel`, `nvlm_engine.tp_executor`) -------


class TensorParallelError(NVLMError):
    """A tensor-parallel worker process exited or a collective failed; the engine was shut down.

    Every rank holds part of every decoder layer, so the engine cannot go on with one missing:
    its workers are stopped, its process group is destroyed, and every later request fails with
    this error. Recreate the engine (`NVLMEngine.from_pretrained(..., tensor_parallel=N)`).
    """


class TensorParallelOptionsError(LoadOptionsError):
    """`tensor_parallel` cannot be used as asked: a size that does not divide the model's heads, a
    device map or option it does not support."""
