"""Progress while a checkpoint's shards load: a tqdm bar, log lines, a callback, or nothing.

`NVLMEngine.from_pretrained(progress=...)` takes one of:

- None (the default): a tqdm bar when stderr is a terminal or the code runs in a notebook
  (`tqdm.auto` draws a widget there), nothing otherwise, as transformers does;
- True: always a bar; False: nothing;
- "log": one `logging` INFO line per shard (for servers and batch jobs, whose stderr is a file);
- a callable: `progress(shard_path, shard_number, shard_count)` after each shard.

The bar counts bytes (total: the size of every shard) and names the shard count, as transformers
and huggingface_hub do. `shard_progress()` turns the argument into a `ShardProgress`, a
per-shard callback that is also a context manager closing the bar. Knows nothing of models.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from .errors import LoadOptionsError

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["LoadProgress", "ProgressCallback", "ShardProgress", "check_progress", "hub_progress", "shard_progress"]

logger = logging.getLogger(__name__)

ProgressCallback: TypeAlias = Callable[[Path, int, int], None]
"""`progress(shard_path, shard_number, shard_count)`, called after each shard is loaded."""

LoadProgress: TypeAlias = bool | Literal["log"] | ProgressCallback | None
"""What `from_pretrained(progress=...)` accepts (see the module docstring)."""


class ShardProgress:
    """Reports each loaded shard; a context manager that ends the report (closes a bar).

    The base class reports nothing (progress=False, or None without a terminal).
    """

    def __call__(self, shard: Path, number: int, count: int) -> None:
        """Shard `number` of `count` (1-based) is loaded."""

    def close(self) -> None:
        """End the report (a bar is closed; idempotent)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Callback(ShardProgress):
    """A user's callable, called as it always was."""

    def __init__(self, callback: ProgressCallback) -> None:
        self.callback = callback

    def __call__(self, shard: Path, number: int, count: int) -> None:
        self.callback(shard, number, count)


class _Bar(ShardProgress):
    """A tqdm bar (a widget in notebooks) on stderr counting bytes, with the shard count beside it."""

    def __init__(self, sizes: dict[Path, int], title: str) -> None:
        from tqdm.auto import tqdm

        self.sizes = sizes
        count = len(sizes)
        self.bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, unit_divisor=1024,
                        desc=f"Loading {title} ({count} shard{'s' if count != 1 else ''})", leave=True)

    def __call__(self, shard: Path, number: int, count: int) -> None:
        self.bar.set_postfix_str(f"shard {number}/{count}", refresh=False)
        self.bar.update(self.sizes.get(shard, 0))

    def close(self) -> None:
        self.bar.close()


class _Log(ShardProgress):
    """One INFO line per shard on the `nvlm_engine.load` logger."""

    def __init__(self, sizes: dict[Path, int], title: str) -> None:
        self.sizes, self.title = sizes, title
        self.total = sum(sizes.values())
        self.done = 0

    def __call__(self, shard: Path, number: int, count: int) -> None:
        self.done += self.sizes.get(shard, 0)
        logger.info("loading %s: shard %d/%d (%s) done, %s of %s", self.title, number, count, shard.name,
                    _gb(self.done), _gb(self.total))


def shard_progress(progress: LoadProgress, shards: Sequence[Path], *, title: str = "NVLM-D") -> ShardProgress:
    """The progress report `progress` asks for, over `shards` (the files about to be loaded).

    Raises:
        LoadOptionsError: `progress` is none of None, True, False, "log" or a callable.
    """
    if progress is False:
        return ShardProgress()
    if callable(progress) and not isinstance(progress, bool):
        return _Callback(progress)
    if progress is None:
        return _Bar(_sizes(shards), title) if _interactive() else ShardProgress()
    if progress is True:
        return _Bar(_sizes(shards), title)
    check_progress(progress)
    return _Log(_sizes(shards), title)


def check_progress(progress: object) -> None:
    """Refuse a `progress` argument of the wrong kind before anything is read.

    Raises:
        LoadOptionsError: `progress` is none of None, True, False, "log" or a callable.
    """
    if progress is None or isinstance(progress, bool) or progress == "log" or callable(progress):
        return
    raise LoadOptionsError(
        f"progress={progress!r} is not a progress option; use None (a bar on a terminal), True, False, \"log\" "
        "or a callable progress(shard_path, shard_number, shard_count)."
    )


def hub_progress(progress: LoadProgress) -> bool | None:
    """What a Hugging Face download shows for this `progress`: its bars (None, True, a callable) or none."""
    return False if progress is False or progress == "log" else None


def _sizes(shards: Sequence[Path]) -> dict[Path, int]:
    return {shard: shard.stat().st_size for shard in shards}


def _interactive() -> bool:
    """Whether a bar helps: stderr is a terminal, or this runs in a Jupyter kernel (tqdm.auto's widget)."""
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):  # a replaced or closed stderr
        pass
    ipython: Any = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # noqa: BLE001 (IPython half-initialised: no notebook to draw in)
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
