"""Image-embedding cache: the vision tower's output per image, keyed by the image's pixels.

The same image asked again with a different prompt (a follow-up question, a retry) skips the
vision tower: `image_key` hashes the preprocessed tiles `pixel_values` [T, 3, H, W] (dtype,
shape and raw bytes, so a different tiling or normalisation is a different key), and
`ImageEmbeddingCache` keeps the embeddings of the most recently used images under a byte
budget. The same 62-bit key also stands for the image in the prefix cache's content keys
(`nvlm_engine.prefix_cache.content_keys`): token ids alone cannot tell two images apart.

A hash collision (2**-62 per pair of distinct images) would answer about the wrong image; at
a million distinct images that is about 1e-7 over the cache's whole life. Raw bytes are
hashed, so two tensors equal as numbers but not as bits (-0.0 and 0.0) are merely a miss.

Thread-safe: the cache is filled by the decode thread and read by `/metrics` scrapes.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

__all__ = ["ImageCacheStats", "ImageEmbeddingCache", "image_key"]

_KEY_BITS = 62


def image_key(pixel_values: torch.Tensor) -> int:
    """A 62-bit content hash of one image's preprocessed tiles [T, 3, H, W].

    blake2b over the dtype, the shape and the raw bytes. A contiguous CPU tensor is hashed in
    place through a byte view (no copy); a non-contiguous or device tensor is copied once to
    contiguous CPU memory. The result is in [0, 2**62), so `-(1 + key)` fits an int64 and
    never equals a token id (see `prefix_cache.content_keys`).
    """
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    tensor = pixel_values.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()  # no copy when already contiguous
    digest = hashlib.blake2b(digest_size=8, person=b"nvlm-image-v1")
    digest.update(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    if tensor.numel():
        # A uint8 view of the same memory: works for every dtype numpy lacks (bfloat16) too.
        raw = tensor.reshape(-1).view(torch.uint8).numpy()
        digest.update(memoryview(raw))
    return int.from_bytes(digest.digest(), "little") >> (64 - _KEY_BITS)


@dataclass(frozen=True)
class ImageCacheStats:
    """Counters since the cache was built and what it holds now."""

    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class ImageEmbeddingCache:
    """LRU of image embeddings under a byte budget (`max_bytes` 0 disables it).

    A disabled cache stores nothing, `get` returns None, and it counts nothing (its stats stay
    zero, so a dashboard never shows misses for a cache that is off). Embeddings are stored as
    given (on their device; the caller should not modify them in place afterwards).
    """

    def __init__(self, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, torch.Tensor] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: int) -> torch.Tensor | None:
        """The embeddings stored under `key` (now the most recently used), or None; counts a hit or a miss."""
        if not self.enabled:
            return None
        with self._lock:
            embeddings = self._entries.get(key)
            if embeddings is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return embeddings

    def put(self, key: int, embeddings: torch.Tensor) -> None:
        """Store `embeddings` under `key` as the most recently used entry.

        Least recently used entries are evicted until the total is within `max_bytes`. An entry
        larger than `max_bytes` on its own is not stored (and evicts nothing). Storing a key
        again replaces its entry.
        """
        if not self.enabled:
            return
        size = _nbytes(embeddings)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= _nbytes(old)
            while self._entries and self._bytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= _nbytes(evicted)
                self._evictions += 1
            self._entries[key] = embeddings
            self._bytes += size

    def stats(self) -> ImageCacheStats:
        with self._lock:
            return ImageCacheStats(hits=self._hits, misses=self._misses, evictions=self._evictions,
                                   entries=len(self._entries), bytes=self._bytes)

    def clear(self) -> None:
        """Drop every entry (not counted as evictions); the counters keep going, as Prometheus counters should."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries
