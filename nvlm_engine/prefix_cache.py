"""Prefix cache index: which KV-cache slot holds the keys/values of which prompt content.

The engine's KV cache is a fixed set of slots; slot s holds one sequence's keys/values at
positions 0..n-1, contiguous. A finished request leaves its slot resident ("idle"), so a
later request whose prompt starts with the same content reuses that KV: it takes the idle
slot over (truncated to the matched prefix, no copy), or, when the matching slot is still
running another request, the matched prefix is copied into a free slot. `PrefixIndex` only
keeps the bookkeeping (content per slot, the idle LRU, counters); the engine owns the tensors.

Content, not token ids: every `<|vision_pad|>` has the same id, so two prompts about two
different images look identical as ids. `content_keys` replaces each image's pad positions
with a key derived from that image's pixels (`nvlm_engine.image_cache.image_key`); tokens
stay their non-negative ids and image pads become negative, so the two never collide.

Why the longest common prefix per slot, and not hashed fixed-size blocks (vLLM's automatic
prefix caching): blocks pay off when the KV cache is paged, because a matched block is
shared by pointer. Here the KV of a slot is one contiguous run (the CPU attention kernels
have no paged variant), so reuse is a truncation or one contiguous copy whatever the match
length, and nothing is gained by rounding the match down to a block boundary; comparing the
stored keys directly makes reuse token-granular (a prompt sharing 1,000 tokens reuses 1,000,
not 992) and needs no hash table to keep in step with truncations.

Cost of `lookup`: for each slot holding content, a vectorised numpy comparison of its keys
against the query, in chunks that double from 512 keys, stopping at the chunk holding the
first mismatch: about O(match length) per slot, never a Python loop over tokens. The worst
case, 64 slots that all share a 32k-token prefix with the query, compares ~2M int64 pairs:
about 4 ms on one shared CPU core; a slot that differs early costs ~10 microseconds.
Memory: 8 bytes per cached position per slot (32k tokens: 256 KiB).

Thread-safe (one lock): the decode thread updates it; `/metrics` scrapes read `stats()`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["PrefixCacheStats", "PrefixIndex", "PrefixMatch", "content_keys"]

_MAX_IMAGE_KEY = 2**63 - 2  # -(1 + key) must fit an int64
_FIRST_CHUNK = 512


def content_keys(prompt_ids: Sequence[int], image_token_id: int, image_keys: Sequence[int],
                 image_tiles: Sequence[int], tokens_per_tile: int) -> np.ndarray:
    """The content key of each prompt position (int64 array, one per position).

    A position's key is its token id, except that the pad positions (`image_token_id`) of image
    i carry -(1 + image_keys[i]); image i owns the next image_tiles[i] * tokens_per_tile pads in
    prompt order (pads of different tiles may be separated by other tokens, e.g. tile tags).

    Raises:
        ValueError: the number of pads differs from sum(image_tiles) * tokens_per_tile, the
            image lists differ in length, a token id is negative, or an image key is outside
            [0, 2**63 - 2].
    """
    ids = np.asarray(prompt_ids, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"prompt_ids must be one-dimensional, got shape {ids.shape}")
    if len(image_keys) != len(image_tiles):
        raise ValueError(f"{len(image_keys)} image keys for {len(image_tiles)} images")
    if tokens_per_tile < 1:
        raise ValueError(f"tokens_per_tile must be >= 1, got {tokens_per_tile}")
    if ids.size and int(ids.min()) < 0:
        raise ValueError("token ids must be >= 0 (negative keys stand for images)")
    tiles = np.asarray(image_tiles, dtype=np.int64).reshape(-1)
    if tiles.size and int(tiles.min()) < 0:
        raise ValueError(f"image_tiles must be >= 0, got {list(image_tiles)}")
    img = [int(k) for k in image_keys]
    if any(k < 0 or k > _MAX_IMAGE_KEY for k in img):
        raise ValueError("image keys must be in [0, 2**63 - 2]")
    pads = np.flatnonzero(ids == image_token_id)
    expected = int(tiles.sum()) * tokens_per_tile
    if pads.size != expected:
        raise ValueError(f"the prompt has {pads.size} image pad tokens; {list(image_tiles)} tiles x "
                         f"{tokens_per_tile} need {expected}")
    keys = ids.copy()
    if pads.size:
        keys[pads] = np.repeat(-1 - np.asarray(img, dtype=np.int64), tiles * tokens_per_tile)
    return keys


@dataclass(frozen=True)
class PrefixMatch:
    """`slot` holds the KV of the query's first `length` positions; `idle`: no request runs in it."""

    slot: int
    length: int
    idle: bool


@dataclass(frozen=True)
class PrefixCacheStats:
    """Counters since the index was built, and the idle slots now.

    queries: lookups; hits: lookups that returned a match; hit_tokens: matched positions summed;
    query_tokens: positions of the queried keys summed (uncapped), so hit_tokens / query_tokens
    is the share of prompt positions whose KV was reused; evictions: idle slots given up by
    `evict`.
    """

    queries: int
    hits: int
    hit_tokens: int
    query_tokens: int
    evictions: int
    idle_slots: int


class _Content:
    """A slot's keys: a growable int64 buffer and the number of valid positions."""

    __slots__ = ("buffer", "length")

    def __init__(self, keys: np.ndarray) -> None:
        self.buffer = np.empty(max(len(keys) + 256, 1024), dtype=np.int64)
        self.buffer[: len(keys)] = keys
        self.length = len(keys)

    def extend(self, keys: np.ndarray) -> None:
        end = self.length + len(keys)
        if end > len(self.buffer):
            grown = np.empty(max(end, 2 * len(self.buffer)), dtype=np.int64)
            grown[: self.length] = self.buffer[: self.length]
            self.buffer = grown
        self.buffer[self.length : end] = keys
        self.length = end

    def common_prefix(self, keys: np.ndarray, limit: int) -> int:
        """Length of the common prefix of the stored keys and `keys`, at most `limit`."""
        n = min(self.length, limit)
        start, step = 0, _FIRST_CHUNK
        while start < n:
            end = min(n, start + step)
            differ = self.buffer[start:end] != keys[start:end]
            first = int(differ.argmax())  # the first True, or 0 when none
            if differ[first]:
                return start + first
            start, step = end, step * 2
        return n


def _as_keys(keys: Sequence[int] | np.ndarray) -> np.ndarray:
    array = np.asarray(keys, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"keys must be one-dimensional, got shape {array.shape}")
    return array


class PrefixIndex:
    """Which slot holds the KV of which content; longest-prefix lookup; LRU of idle slots.

    A slot is unknown (free: no reusable content), running (a request owns it; its content
    can be copied from), taken (`take`: an idle slot handed to a new request, not yet
    `running`), or idle (resident after `finish`, in the LRU, can be taken over or evicted).

    Disabled (`enabled=False`), the index tracks nothing and never matches: `running`,
    `extend`, `truncate`, `finish` and `take` do nothing, `lookup` returns None and counts
    nothing, `evict` returns None.

    `extend`, `truncate` and `take` on a slot the index does not know raise KeyError (the
    caller's idea of the slot's content is wrong, which would reuse the wrong KV); `finish` and
    `forget` of an unknown slot do nothing (a request cancelled mid-prefill is forgotten first).
    """

    def __init__(self, *, enabled: bool = True, min_match: int = 1) -> None:
        if isinstance(min_match, bool) or not isinstance(min_match, int) or min_match < 1:
            raise ValueError(f"min_match must be an int >= 1, got {min_match!r}")
        self.enabled = bool(enabled)
        self.min_match = min_match
        self._slots: dict[int, _Content] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self._queries = self._hits = self._hit_tokens = self._query_tokens = self._evictions = 0
        self._lock = threading.Lock()

    # -- slot life cycle --------------------------------------------------------------------

    def running(self, slot: int, keys: np.ndarray) -> None:
        """`slot` now runs a request whose KV will cover `keys` (its prompt); it leaves the idle LRU.

        Replaces whatever the slot held. The keys are copied.
        """
        if not self.enabled:
            return
        array = _as_keys(keys)
        with self._lock:
            self._idle.pop(slot, None)
            self._slots[slot] = _Content(array)

    def extend(self, slot: int, keys: Sequence[int]) -> None:
        """More positions of `slot` whose KV is now written (generated tokens fed back)."""
        if not self.enabled:
            return
        array = _as_keys(keys)
        with self._lock:
            self._content(slot).extend(array)

    def truncate(self, slot: int, length: int) -> None:
        """`slot` now holds only its first `length` positions (no-op when it holds fewer)."""
        if not self.enabled:
            return
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        with self._lock:
            content = self._content(slot)
            content.length = min(content.length, length)

    def finish(self, slot: int) -> None:
        """The slot's request ended: the slot becomes idle, the most recently used (disabled: forgotten)."""
        with self._lock:
            if not self.enabled:
                self._forget(slot)
            elif slot in self._slots:
                self._idle.pop(slot, None)
                self._idle[slot] = None

    def forget(self, slot: int) -> None:
        """The slot's content is gone (evicted, failed, cancelled mid-prefill)."""
        with self._lock:
            self._forget(slot)

    def take(self, slot: int) -> None:
        """An idle slot is taken over by a new request: it leaves the idle LRU (its content stays)."""
        if not self.enabled:
            return
        with self._lock:
            if slot not in self._idle:
                raise KeyError(f"slot {slot} is not idle")
            del self._idle[slot]

    def move(self, source: int, target: int) -> None:
        """An idle slot's content moved to `target` (its KV was copied there); same LRU position."""
        if not self.enabled:
            return
        with self._lock:
            if source not in self._idle or target in self._slots:
                raise KeyError(f"cannot move slot {source} to {target}: not idle, or the target holds content")
            self._slots[target] = self._slots.pop(source)
            self._idle = OrderedDict((target if s == source else s, None) for s in self._idle)

    def evict(self, slot: int | None = None) -> int | None:
        """Forget an idle slot and return it (counted as an eviction), or None when none is idle.

        `slot`: that idle slot; default the least recently used one.
        """
        with self._lock:
            if not self._idle or (slot is not None and slot not in self._idle):
                return None
            if slot is None:
                slot, _ = self._idle.popitem(last=False)
            else:
                del self._idle[slot]
            self._slots.pop(slot, None)
            self._evictions += 1
            return slot

    # -- queries ----------------------------------------------------------------------------

    def lookup(self, keys: np.ndarray, *, max_length: int | None = None, count: bool = True) -> PrefixMatch | None:
        """The slot (running or idle) sharing the longest common prefix with `keys`.

        The length is capped at `max_length` (pass len(keys) - 1 so that at least one position is
        recomputed and gives logits). None when the best length is below `min_match`. On equal
        length an idle slot is preferred (no copy), the most recently used first; among running
        slots, the lowest number. Counts a query, its len(keys) query tokens, and on a match a hit
        and its length (unless `count` is False: a request looking again while it waits). Cost: see the module docstring (numpy, about O(match length) per slot).
        """
        if not self.enabled:
            return None
        array = _as_keys(keys)
        limit = len(array) if max_length is None else max(0, min(len(array), max_length))
        with self._lock:
            if count:
                self._queries += 1
                self._query_tokens += len(array)
            best: PrefixMatch | None = None
            best_rank: tuple[int, int, int] | None = None
            if limit >= self.min_match:
                idle_order = {slot: i for i, slot in enumerate(self._idle)}  # larger: more recent
                for slot, content in self._slots.items():
                    length = content.common_prefix(array, limit)
                    if length < self.min_match:
                        continue
                    idle = slot in idle_order
                    rank = (length, 1, idle_order[slot]) if idle else (length, 0, -slot)
                    if best_rank is None or rank > best_rank:
                        best, best_rank = PrefixMatch(slot=slot, length=length, idle=idle), rank
            if best is not None and count:
                self._hits += 1
                self._hit_tokens += best.length
            return best

    def idle_slots(self) -> list[int]:
        """The idle slots, least recently used first (the order `evict` takes them)."""
        with self._lock:
            return list(self._idle)

    def length(self, slot: int) -> int:
        """Positions the index believes `slot` holds (0 for a slot it does not know)."""
        with self._lock:
            content = self._slots.get(slot)
            return 0 if content is None else content.length

    def stats(self) -> PrefixCacheStats:
        with self._lock:
            return PrefixCacheStats(queries=self._queries, hits=self._hits, hit_tokens=self._hit_tokens,
                                    query_tokens=self._query_tokens, evictions=self._evictions,
                                    idle_slots=len(self._idle))

    # -- internals --------------------------------------------------------------------------

    def _content(self, slot: int) -> _Content:
        content = self._slots.get(slot)
        if content is None:
            raise KeyError(f"slot {slot} holds no tracked content")
        return content

    def _forget(self, slot: int) -> None:
        self._slots.pop(slot, None)
        self._idle.pop(slot, None)
