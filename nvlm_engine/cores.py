"""Decode cores of one engine: how they are configured, lent to callers, and counted.

A `DecodeCore` (`generation.py`) is single-threaded: the scheduler owns one for its worker
thread, and the engine's direct calls (`generate`, `stream`, `run`) borrow one each from a
pool, so two threads calling the engine at once never share decoding state; an idle core
keeps its cached prefixes for the next call. Every core of an engine shares one
image-embedding cache. `CorePool.stats()` adds up the cache counters of all its cores (what
the server's `/metrics` shows).

Knows the decode core's constructor; knows nothing of requests or HTTP.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .generation import DEFAULT_CHUNK_TOKENS, DecodeCore
from .generation_records import TokenIds
from .image_cache import ImageEmbeddingCache
from .model import NVLMModel
from .textstream import Decoder

DEFAULT_IMAGE_CACHE_BYTES = 512 * 2**20  # ~17 images of 7 tiles at 72B scale (29 MiB each in bf16)


@dataclass(frozen=True)
class DecodeSettings:
    """How the engine decodes.

    Attributes:
        prefix_caching: keep finished sequences' KV cached for later requests that start with
            the same content (conversation turns, the same document page). On by default.
        image_cache_bytes: image embeddings kept so the same image with another prompt skips
            the vision tower (0 disables it).
        chunk_tokens: prompt tokens prefilled per step, so running streams keep flowing while
            a long prompt is prefilled.
        max_slots: sequences the KV cache holds at most, running and cached.
        kv_tokens: KV cache tokens at most over all sequences; None: what the placement plan
            leaves (no bound on the CPU).
        compile: decode steps through `torch.compile(fullgraph=True)`, as CUDA graphs on CUDA.
    """

    prefix_caching: bool = True
    image_cache_bytes: int = DEFAULT_IMAGE_CACHE_BYTES
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    max_slots: int = 64
    kv_tokens: int | None = None
    compile: bool = False


class CorePool:
    """Makes the decode cores of one engine and lends them to direct calls."""

    def __init__(self, model: NVLMModel, decoder: Decoder, ids: TokenIds, *, context_length: int,
                 settings: DecodeSettings) -> None:
        self.model, self.decoder, self.ids = model, decoder, ids
        self.context_length = context_length
        self.settings = settings
        self.images = ImageEmbeddingCache(settings.image_cache_bytes)
        self._idle: list[DecodeCore] = []
        self._made: weakref.WeakSet[DecodeCore] = weakref.WeakSet()
        self._lock = threading.Lock()

    def new_core(self, *, max_slots: int | None = None) -> DecodeCore:
        """A fresh core sharing this engine's model and image cache (the caller owns it)."""
        s = self.settings
        core = DecodeCore(self.model, self.decoder, self.ids, context_length=self.context_length,
                          kv_tokens=s.kv_tokens, max_slots=max_slots or s.max_slots, chunk_tokens=s.chunk_tokens,
                          prefix_caching=s.prefix_caching, image_cache=self.images, compile=s.compile)
        with self._lock:
            self._made.add(core)
        return core

    @contextmanager
    def borrow(self) -> Iterator[DecodeCore]:
        """An idle core (made if none), given back when the block ends."""
        with self._lock:
            core = self._idle.pop() if self._idle else None
        core = core or self.new_core()
        try:
            yield core
        finally:
            if not core.busy:
                with self._lock:
                    self._idle.append(core)

    def stats(self) -> dict[str, int]:
        """Prefix and image cache counters, summed over every core of this engine."""
        with self._lock:
            cores = list(self._made)
        totals = dict.fromkeys(("queries", "hits", "hit_tokens", "query_tokens", "evictions", "idle_slots"), 0)
        for core in cores:
            prefix = core.prefix.stats()
            for name in totals:
                totals[name] += getattr(prefix, name)
        images = self.images.stats()
        out = {f"prefix_{name}": value for name, value in totals.items()}
        out.update(image_cache_hits=images.hits, image_cache_misses=images.misses,
                   image_cache_evictions=images.evictions, image_cache_entries=images.entries,
                   image_cache_bytes=images.bytes)
        return out
