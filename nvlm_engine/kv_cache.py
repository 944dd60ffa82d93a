"""The engine's own KV cache: fixed slots of keys and values, preallocated on each layer's device.

Slot `s` holds one sequence's keys and values at positions `0..n-1`, contiguous, in every
decoder layer: `keys[layer][s, :, p]` is position `p`. A request gets a slot when it is admitted
and gives it back when it ends; nothing is copied for either, and no other row's KV moves. The
row of a decode step is its slot, so a step reads `keys[layer][:rows]` as a view. The last slot
is scratch: rows of a step that hold no live request write there, so a step's shapes depend on
bucketed sizes only (what `torch.compile` and CUDA graphs need), never on which rows are live.

Memory grows on demand and is bounded: slots and per-slot capacity double when needed (one copy
per doubling, like a vector), capacity never beyond the context length and slots x capacity
never beyond `max_tokens` (the KV room the placement plan left). Everything starts as zeros: a
masked-out key that held NaN garbage would still poison a row (softmax weight 0 x NaN is NaN).
Zero-filling the bigger tensors is most of a resize's cost (about 80 ms for 150 MiB on a CPU),
so a caller with streams running can ask for a big one (`background_bytes`) to be made in the
background (`ensure(background=True)`):
a thread allocates the zeroed tensors while decoding goes on, and a later call swaps them in,
copying only what is kept; that holds old and new tensors at once, so it is done only when both
fit the budget. Otherwise a resize goes layer by layer, freeing each old tensor as its copy is
made (at most one layer's tensors more than the new size).

Knows tensor shapes and devices; knows nothing of requests, prompts or sampling.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from .errors import NVLMError

MIN_CAPACITY = 256  # tokens per slot at first; doubled as sequences grow
BACKGROUND_BYTES = 32 * 2**20  # a resize at least this big is made in the background when asked (~20 ms on a CPU)


class KVCacheFullError(NVLMError):
    """The KV cache cannot grow to hold a request: wait for others to end, or shorten it."""


class KVCacheGrowing(Exception):  # not an error: a resize is under way, ask again later
    """`ensure(background=True)`: the bigger tensors are being allocated; call again after a step."""


class _Allocation:
    """Zeroed key and value tensors of one shape per layer device, allocated on a thread of their own."""

    def __init__(self, shape: tuple[int, int], make: Callable[[], list[torch.Tensor]]) -> None:
        self.shape = shape
        self.tensors: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.tensors = make(), make()
            except BaseException as e:  # noqa: BLE001 (handed to the caller that takes the tensors)
                self.error = e

        self._thread = threading.Thread(target=run, name="nvlm-kv-grow", daemon=True)
        self._thread.start()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def take(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        self._thread.join()
        if self.error is not None:
            raise self.error
        assert self.tensors is not None
        return self.tensors


class KVCache:
    """Keys and values of every decoder layer for `slots` sequences (plus one scratch slot).

    Args:
        layer_devices: the device of each decoder layer, in order.
        kv_heads, head_dim: the layers' key/value shape.
        dtype: the compute dtype.
        max_capacity: tokens per sequence at most (the engine's context length).
        max_tokens: slots x capacity at most (None: no bound but `max_slots`).
        max_slots: sequences at most.
        static_addresses: mark each new tensor as a static address for `torch.compile`, so CUDA
            graphs read and write the cache in place (a core that compiles its decode step).
    """

    def __init__(self, layer_devices: Sequence[torch.device], *, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 max_capacity: int, max_tokens: int | None = None, max_slots: int = 64,
                 static_addresses: bool = False) -> None:
        self.layer_devices = list(layer_devices)
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype
        self.max_capacity = max_capacity
        self.max_tokens = max_tokens
        self.max_slots = max_slots
        self.slots = 0
        self.capacity = 0
        self.keys: list[torch.Tensor] = []  # per layer [slots + 1, H_kv, capacity, D]
        self.values: list[torch.Tensor] = []
        self.static_addresses = static_addresses
        self._pending: _Allocation | None = None  # a background resize under way
        self.background_bytes = BACKGROUND_BYTES
        """Smaller resizes are made at once even when `ensure(background=True)`: they cost little."""

    @property
    def scratch(self) -> int:
        """The slot that rows without a live request write to."""
        return self.slots

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def fits(self, slots: int, capacity: int, *, used: int | None = None) -> bool:
        """Whether the cache may be resized to hold `slots` sequences of `capacity` tokens.

        `used`: only slots `0..used-1` hold anything (default: all of them); slots beyond may be
        dropped to make room for a longer capacity.
        """
        slots, capacity = self._target(slots, capacity, used)
        return slots <= self.max_slots and capacity <= self.max_capacity and self._within_budget(slots, capacity)

    def ensure(self, slots: int, capacity: int, *, used: int | None = None, background: bool = False) -> None:
        """Resize to at least `slots` sequences of `capacity` tokens; the KV of slots `0..used-1` is kept.

        Slots grow by doubling where the budget allows; when a longer capacity needs room, unused
        slots beyond `used` are dropped (the budget is for slots x capacity, not each alone).
        `background`: allocate the bigger tensors on another thread and raise `KVCacheGrowing`
        until they are ready; the call after that swaps them in.

        Raises:
            KVCacheFullError: beyond `max_slots`, the context length or `max_tokens`.
            KVCacheGrowing: `background` and the resize is not ready yet.
        """
        needed, new_capacity = self._target(slots, capacity, used)
        if needed <= self.slots and new_capacity <= self.capacity:
            return
        if not self.fits(slots, capacity, used=used):
            raise KVCacheFullError(
                f"the KV cache cannot hold {needed} sequence(s) of {new_capacity} tokens (at most {self.max_slots} "
                f"sequences, {self.max_capacity} tokens each, {self.max_tokens or 'no limit on'} tokens in all); "
                "wait for running requests to end, or lower max_new_tokens")
        new_slots = max(needed, self.slots)
        if needed > self.slots:  # doubling keeps growth copies rare
            new_slots = min(max(needed, 2 * self.slots), self.max_slots)
        while new_slots > needed and not self._within_budget(new_slots, new_capacity):
            new_slots -= 1
        shape = (new_slots, new_capacity)
        keep = min(self.slots if used is None else used, new_slots)
        background = background and self._bytes(shape) >= self.background_bytes and self._room_for_both(shape)
        ready = self._background(shape, background)
        if ready is not None:
            keys, values = ready
            self.keys = [self._keep(old, new, keep) for old, new in zip(self._or_empty(self.keys), keys)]
            self.values = [self._keep(old, new, keep) for old, new in zip(self._or_empty(self.values), values)]
        else:  # layer by layer: each old tensor is freed as its copy is made (peak: one layer more)
            self.keys, self.values = self._or_empty(self.keys), self._or_empty(self.values)
            for i, device in enumerate(self.layer_devices):
                self.keys[i] = self._keep(self.keys[i], self._zeros(*shape, device), keep)
                self.values[i] = self._keep(self.values[i], self._zeros(*shape, device), keep)
        self.slots, self.capacity = new_slots, new_capacity

    def _bytes(self, shape: tuple[int, int]) -> int:
        """Bytes of the keys and values of every layer at `shape` (slots, capacity)."""
        per_token = 2 * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8
        return len(self.layer_devices) * (shape[0] + 1) * shape[1] * per_token

    def _room_for_both(self, shape: tuple[int, int]) -> bool:
        """Whether the old tensors and new ones of `shape` fit the budget together (a background
        resize holds both until it swaps)."""
        old = (self.slots + 1) * self.capacity if self.keys else 0
        return self.max_tokens is None or old + (shape[0] + 1) * shape[1] <= self.max_tokens

    def _background(self, shape: tuple[int, int], background: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """A finished background allocation of `shape` (slots, capacity); None: allocate now.

        Raises:
            KVCacheGrowing: `background`, and the allocation was just started or is not done.
        """
        pending = self._pending
        if pending is not None and pending.shape != shape:  # the target moved since: start over
            self._pending = pending = None
        if background and (pending is None or not pending.done):
            if pending is None:
                self._pending = _Allocation(shape, lambda: [self._zeros(*shape, d) for d in self.layer_devices])
            raise KVCacheGrowing(f"allocating {shape[0]} slot(s) of {shape[1]} tokens")
        if pending is not None:
            self._pending = None
            return pending.take()
        return None

    def _target(self, slots: int, capacity: int, used: int | None) -> tuple[int, int]:
        """The slot count and capacity a resize for (`slots`, `capacity`) needs at least."""
        kept = self.slots if used is None else min(used, self.slots)
        return max(slots, kept), max(_grown(capacity, self.max_capacity), self.capacity)

    def _within_budget(self, slots: int, capacity: int) -> bool:
        return self.max_tokens is None or (slots + 1) * capacity <= self.max_tokens

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Copy positions `0..length-1` of slot `source` into slot `target` (a shared prefix)."""
        for keys, values in zip(self.keys, self.values):
            keys[target, :, :length] = keys[source, :, :length]
            values[target, :, :length] = values[source, :, :length]

    def _or_empty(self, tensors: list[torch.Tensor]) -> list[torch.Tensor | None]:
        return list(tensors) if tensors else [None] * len(self.layer_devices)

    def _zeros(self, slots: int, capacity: int, device: torch.device) -> torch.Tensor:
        return torch.zeros((slots + 1, self.kv_heads, capacity, self.head_dim), dtype=self.dtype, device=device)

    def _keep(self, old: torch.Tensor | None, new: torch.Tensor, keep: int) -> torch.Tensor:
        """`new` holding the first `keep` slots of `old` (the old scratch slot is not kept: it holds nothing)."""
        if old is not None and keep:  # (a layer may already be bigger: an earlier resize stopped half way)
            held = min(self.capacity, old.shape[2], new.shape[2])
            new[:keep, :, :held] = old[:keep, :, :held]
        if self.static_addresses:
            torch._dynamo.mark_static_address(new)
        return new


def _grown(tokens: int, limit: int) -> int:
    """`tokens` rounded up to a power of two (at least `MIN_CAPACITY`), at most `limit`."""
    size = MIN_CAPACITY
    while size < tokens:
        size *= 2
    return min(size, limit) if tokens <= limit else tokens
