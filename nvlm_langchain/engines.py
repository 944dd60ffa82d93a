"""The per-process engine registry: NVLM-D weights loaded once per checkpoint and placement.

A `ChatNVLM` is cheap to build and holds no weights: it names an `EngineSpec` (checkpoint
folder, device map, dtype, memory budget, context length), and the first call that needs the
model loads it here, under a lock, once per process. Every `ChatNVLM` naming the same spec,
and every copy LangChain makes of one (`bind`, `with_config`, ...), shares those weights.
Each prompt dialect gets a light `NVLMEngine` view over the same model and tokenizer rather
than a second copy of the weights. All decoding on those weights goes through one
continuous-batching `Scheduler` (one worker thread), so concurrent calls from any threads or
tasks, in any dialect, share decode steps instead of running separate loops on one model.
Loading different checkpoints can overlap; loading the same one twice cannot.

Knows how to load engines; the grammar compiler is the engine chat layer's (one per
tokenizer, shared by the views); knows nothing of LangChain.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nvlm_engine import NVLMEngine, PromptDialect
from nvlm_engine.chat import ChatService, grammars_for
from nvlm_engine.cores import DecodeSettings
from nvlm_engine.hub import is_repo_id
from nvlm_engine.load_progress import LoadProgress
from nvlm_engine.scheduler import Scheduler

if TYPE_CHECKING:
    from nvlm_engine.chat.grammar import Grammars

__all__ = ["EngineSpec", "LoadedEngine", "clear_engines", "get_engine", "loaded_specs"]

logger = logging.getLogger(__name__)

MAX_BATCH_SIZE = 16
"""Rows a `LoadedEngine`'s scheduler decodes together at most; later requests wait for a free row."""
MAX_QUEUE = 1 << 30
"""In-process callers wait rather than get a "queue full" error: the queue is effectively unbounded."""


@dataclass(frozen=True)
class EngineSpec:
    """What identifies loaded weights: the checkpoint folder, its placement, quantization and decoding.

    `batch_size` is the batch memory is reserved for and the scheduler's largest decode batch
    (None: plan for 1, decode up to `MAX_BATCH_SIZE`). `compile` loads with compiled decode steps
    (`decoding=DecodeSettings(compile=True)`): another engine than the eager one.

    The folder is resolved, so "./ckpt", "ckpt/" and a symlink to it name one engine;
    `device_map` and `max_memory` are compared through a canonical JSON form, so equal maps
    written in another order do too. A Hugging Face id ("nvidia/NVLM-D-72B") that is not a
    folder here stays as given, with its `revision`; it resolves (and with `download`, downloads)
    when the engine loads (`nvlm_engine.hub`). `progress` is the loading progress used when the
    caller of `load` passes none (see `NVLMEngine.from_pretrained`).
    """

    path: str
    device_map: Any = field(default="auto", compare=False, hash=False)
    dtype: str | None = None
    max_memory: Mapping[str | int, int | str] | None = field(default=None, compare=False, hash=False)
    context_length: int | None = None
    quantization: str | None = None
    tensor_parallel: int = 1
    compile: bool = False
    batch_size: int | None = field(default=None, compare=False, hash=False)
    revision: str | None = None
    download: bool = field(default=False, compare=False, hash=False)
    progress: LoadProgress = field(default=None, compare=False, hash=False)
    placement: str = field(default="", init=False, repr=False)

    def __post_init__(self) -> None:
        if self.device_map is not None and not isinstance(self.device_map, (str, list, tuple, Mapping)):
            raise ValueError(f"device_map must be a device name, a list of devices or a dict, got {self.device_map!r}")
        folder = Path(self.path).expanduser()
        if folder.is_dir() or not is_repo_id(self.path):
            object.__setattr__(self, "path", str(folder.resolve()))
        placement = json.dumps([self.device_map, self.max_memory, self.batch_size], sort_keys=True, default=str)
        object.__setattr__(self, "placement", placement)

    @classmethod
    def of(cls, path: str, source: Any) -> EngineSpec:
        """The spec of `path` whose other fields are `source`'s attributes of the same names (a `ChatNVLM`)."""
        return cls(path, **{f.name: getattr(source, f.name) for f in fields(cls) if f.init and f.name != "path"})

    def load(self, progress: LoadProgress = None) -> NVLMEngine:
        """Load the weights; `progress` None uses the spec's own (see `NVLMEngine.from_pretrained`)."""
        device_map = list(self.device_map) if isinstance(self.device_map, tuple) else self.device_map
        return NVLMEngine.from_pretrained(
            self.path,
            device_map=device_map,
            dtype=self.dtype,
            max_memory=dict(self.max_memory) if self.max_memory else None,
            context_length=self.context_length,
            batch_size=self.batch_size or 1,
            quantization=self.quantization,
            revision=self.revision,
            download=self.download,
            progress=progress if progress is not None else self.progress,
            **({"tensor_parallel": self.tensor_parallel} if self.tensor_parallel > 1 else {}),
            **({"decoding": DecodeSettings(compile=True)} if self.compile else {}),
        )


class LoadedEngine:
    """Loaded weights, the engine views over them, their chat services and scheduler."""

    def __init__(self, base: NVLMEngine, max_batch_size: int | None = None) -> None:
        self.base = base
        self.max_batch_size = max_batch_size or MAX_BATCH_SIZE
        self._views: dict[str, NVLMEngine] = {}
        self._scheduler: Scheduler | None = None
        self._lock = threading.Lock()

    def engine(self, dialect: str = "reference") -> NVLMEngine:
        """The engine that renders prompts in `dialect` (it never fetches URLs: see `call_plan.py`)."""
        key = PromptDialect(dialect).value
        with self._lock:
            view = self._views.get(key)
            if view is None:
                view = self.base.with_dialect(key)
                self._views[key] = view
            return view

    @property
    def scheduler(self) -> Scheduler:
        """The one scheduler (worker thread) that decodes every request on these weights, started on first use.

        Requests prepared by any dialect view run on it: a prepared request carries its prompt
        ids, and the views share the model, tokenizer and special token ids the scheduler uses.
        """
        with self._lock:
            if self._scheduler is None:
                self._scheduler = Scheduler(self.base, max_batch_size=self.max_batch_size, max_queue=MAX_QUEUE)
            return self._scheduler

    def close(self) -> None:
        """Stop the scheduler (if started); a later call starts a new one."""
        with self._lock:
            scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.close()

    def chat(self, dialect: str = "reference") -> ChatService:
        """The chat service of the `dialect` view (grammars shared by all views)."""
        return ChatService(self.engine(dialect))

    @property
    def grammars(self) -> Grammars:
        """The xgrammar compiler for this checkpoint's tokenizer (~1 s to build for 152k tokens)."""
        return grammars_for(self.base)


_engines: dict[EngineSpec, LoadedEngine] = {}
_loading: dict[EngineSpec, threading.Lock] = {}
_registry_lock = threading.Lock()


def get_engine(spec: EngineSpec, progress: LoadProgress = None) -> LoadedEngine:
    """The loaded weights for `spec`, loading them if this process has not yet.

    `progress(shard_path, number, count)` is called per shard when this call does the loading.

    Raises:
        nvlm_engine.CheckpointError (and the loader's other errors): the folder cannot be loaded.
    """
    loaded = _engines.get(spec)
    if loaded is not None:
        return loaded
    with _registry_lock:
        lock = _loading.setdefault(spec, threading.Lock())
    with lock:  # one loader per spec; the others wait here and then find it loaded
        loaded = _engines.get(spec)
        if loaded is None:
            logger.info("loading NVLM-D from %s (device_map=%r, dtype=%r)", spec.path, spec.device_map, spec.dtype)
            loaded = LoadedEngine(spec.load(progress), max_batch_size=spec.batch_size)
            with _registry_lock:
                _engines[spec] = loaded
    return loaded


def loaded_specs() -> list[EngineSpec]:
    """The specs whose weights this process holds."""
    with _registry_lock:
        return list(_engines)


def clear_engines() -> None:
    """Forget every loaded engine and stop its scheduler: running requests end "cancelled", queued
    ones raise `SchedulerClosedError`; the memory is freed once no caller holds the engine."""
    with _registry_lock:
        loaded = list(_engines.values())
        _engines.clear()
        _loading.clear()
    for engine in loaded:
        engine.close()
        engine.base.close()  # tensor-parallel workers, if any
