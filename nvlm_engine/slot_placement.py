"""Where a new request's KV goes: which slot, what it reuses, what gives way.

`SlotPlanner.place` decides for one request, given the cache, the prefix index and the slots
running requests hold:

- an idle slot whose cached content the prompt covers (all but a short tail, e.g. the previous
  turn of the same conversation) is taken over: no copy;
- a shorter match (a shared system prompt, another conversation's first turn) is copied into
  a free slot, so the idle sequence stays cached for its own next turn;
- a free slot is the lowest one no request runs in: a decode step computes every row up to the
  highest running slot, so cached sequences below are moved up rather than computed each step;
- cached sequences are evicted least recently used first, and only when that makes room (a
  request that can never fit evicts nothing).

Knows the KV cache's sizes and the prefix index; knows nothing of models or sampling.
"""

from __future__ import annotations

from collections.abc import Iterator

from .kv_cache import KVCache, KVCacheFullError
from .prefix_cache import PrefixIndex, PrefixMatch

TAKEOVER_TAIL = 4  # cached tokens a request may discard when it takes an idle sequence's slot over


class SlotPlanner:
    """One placement decision over `kv` and `prefix`, with `busy` the slots of running requests.

    `background`: a resize of the cache the placement needs is made off the caller's thread
    (`KVCache.ensure(background=True)`): `place` raises `KVCacheGrowing` until it is ready.
    """

    def __init__(self, kv: KVCache, prefix: PrefixIndex, busy: set[int], *, background: bool = False) -> None:
        self.kv, self.prefix, self.busy, self.background = kv, prefix, busy, background

    def place(self, match: PrefixMatch | None, need: int) -> tuple[int, int]:
        """The slot for a request of `need` tokens and how many prompt positions it already holds.

        Raises:
            KVCacheFullError: no room, even with every cached sequence evicted.
            KVCacheGrowing: `background`, and the cache is still being resized for it.
        """
        if match is not None and match.idle:
            tail = self.prefix.length(match.slot) - match.length
            if tail <= TAKEOVER_TAIL or not self._can_place(need, protect=match.slot):
                occupied = self.busy | set(self.prefix.idle_slots())
                self.kv.ensure(match.slot + 1, need, used=max(occupied) + 1, background=self.background)
                self.prefix.take(match.slot)
                self.prefix.truncate(match.slot, match.length)
                return match.slot, match.length
        slot = self._free_slot(need, protect=match.slot if match is not None else None)
        if match is not None:  # copy the shared prefix rather than recompute it
            self.kv.copy_prefix(match.slot, slot, match.length)
            return slot, match.length
        return slot, 0

    def _placements(self, protect: int | None) -> Iterator[tuple[list[int], int, int]]:
        """Ways to find a slot, cheapest first: (idle slots to evict, the slot, slots in use after)."""
        busy = self.busy | ({protect} if protect is not None else set())
        idle = [s for s in self.prefix.idle_slots() if s != protect]  # least recently used first
        for evicted in range(len(idle) + 1):
            kept = busy | set(idle[evicted:])
            slot = next(s for s in range(len(kept) + 1) if s not in kept)
            yield idle[:evicted], slot, max(kept | {slot}) + 1

    def _can_place(self, need: int, protect: int | None = None) -> bool:
        """Whether a slot of `need` tokens can be had without evicting a cached sequence."""
        _, slot, used = next(self._placements(protect))
        return self.kv.fits(slot + 1, need, used=used)

    def _free_slot(self, need: int, protect: int | None = None) -> int:
        """A slot for `need` tokens: a free one, a new one, or one given up by cached sequences
        (least recently used first; none is evicted unless that makes room)."""
        for victims, slot, used in self._placements(protect):
            if self.kv.fits(slot + 1, need, used=used):
                for victim in victims:
                    self.prefix.evict(victim)
                self.kv.ensure(slot + 1, need, used=used, background=self.background)
                return self._compact(slot, protect)
        raise KVCacheFullError(f"no KV cache room for a sequence of {need} tokens")

    def _compact(self, slot: int, protect: int | None) -> int:
        """The lowest slot no request runs in, for a new request that was given `slot`.

        A decode step computes every row up to the highest running slot, so a request placed
        above cached sequences would make every step pay for them. A cached sequence below
        `slot` is moved up into it instead (one copy of its KV, once).
        """
        busy = self.busy | ({protect} if protect is not None else set())
        low = next(s for s in range(slot + 1) if s not in busy)
        if low == slot or low not in self.prefix.idle_slots():
            return slot
        self.kv.copy_prefix(low, slot, self.prefix.length(low))
        self.prefix.move(low, slot)
        return low
