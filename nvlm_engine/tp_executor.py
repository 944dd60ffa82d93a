"""Rank 0 of a loaded tensor-parallel engine: drive the workers, notice when one dies, stop them.

`tp_startup.load_tensor_parallel` starts the workers and joins them in a process group of the
engine's own (`tp_worker.Group`: not torch.distributed's default group, so several engines, or
a user's own group, can share a process). The engine's process is rank 0 and the only driver:
`TensorParallelLink` sits on the model as `model.tp_link`, and the decode core's model work goes
through it unchanged:

- `DecodeCore._new_cache` asks it for a `MirroredKVCache`, whose `ensure` and `copy_prefix`
  send the same command to every worker (each command names its core, so caches stay apart);
- `decoder.mixed_step` (decode rows and prefill chunks) enters `link.step(...)`: the
  command goes out by pipe, the layer inputs by broadcast, then rank 0 runs its own shard while
  the workers run theirs; one lock keeps each command and its collectives together when
  several threads decode on one engine;
- `NVLMModel.encode_images` calls `link.encode_images(...)`: every rank holds the vision tower
  and projector; the tiles go out by broadcast, each rank encodes its contiguous slice
  (`tensor_parallel.tile_counts`), and rank 0 gathers the image tokens in order.

Only rank 0 computes logits and samples. Liveness: a watcher thread waits on every
worker's process handle; when one exits, the others are killed at once (so a collective rank 0
is blocked in fails within milliseconds instead of at the group's timeout), and the request in
flight, and every later one, fails with `TensorParallelError` naming the rank and its exit code.
The group has a timeout too, so a hung (not dead) peer cannot block forever. `close()` (also
at interpreter exit) stops the workers and shuts the group down; no process is left behind.
A worker also exits by itself when rank 0's process is gone (`tp_worker`). Rank 0's torch
thread count (lowered on the CPU while the ranks share its cores) is restored at `close()`.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing.connection
import threading
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch

from .decoder import Chunk
from .errors import TensorParallelError
from .kv_cache import KVCache
from .model import encode_tiles
from .tensor_parallel import tile_counts
from .tp_worker import Command, Group, padded_tokens

logger = logging.getLogger(__name__)

TIMEOUT_S = 120.0  # a collective waiting this long for a live peer fails (dead peers fail at once)
_STOP_WAIT_S = 5.0


@dataclass
class Worker:
    """One worker process as rank 0 sees it: its rank, its process handle, its end of the pipe."""

    rank: int
    process: Any  # a multiprocessing Process of the spawn context
    conn: multiprocessing.connection.Connection


class MirroredKVCache(KVCache):
    """Rank 0's KV cache of one decode core: every change is also made to the workers' copies.

    The methods named in `tp_worker.MIRRORED_CACHE_METHODS` are overridden here; a worker's
    copy starts in the same state and gets the same calls in the same order, so it resizes and
    copies exactly as this one does (its tensors hold its own KV heads). A new `KVCache` method
    that changes the tensors must be added there and here (a test checks the list).
    """

    def __init__(self, link: TensorParallelLink, core_id: int, layer_devices: Sequence[torch.device],
                 **settings: Any) -> None:
        super().__init__(layer_devices, **settings)
        self.link, self.core_id = link, core_id

    def ensure(self, *args: Any, **kwargs: Any) -> None:
        before = self.keys
        super().ensure(*args, **kwargs)  # KVCacheFullError here: nothing changed, nothing sent
        if self.keys is not before:  # resized: the workers resize the same way
            self.link.send(Command("ensure", self.core_id, args, kwargs))

    def copy_prefix(self, *args: Any, **kwargs: Any) -> None:
        self.link.send(Command("copy_prefix", self.core_id, args, kwargs))
        super().copy_prefix(*args, **kwargs)


class TensorParallelLink:
    """Rank 0's handle on its workers: commands, broadcasts, liveness, shutdown.

    Made by `load_tensor_parallel`; set as `model.tp_link` (with `model.tp_reduce`).
    """

    def __init__(self, workers: list[Worker], *, tp: int, group: Group, threads_before: int) -> None:
        self.tp = tp
        self._workers = workers
        self._group = group
        self._lock = threading.Lock()  # one command and its collectives at a time
        self._failure: str | None = None
        self._failed = threading.Event()
        self._closed = False
        self._drops: deque[int] = deque()  # cores whose caches were garbage-collected on rank 0
        self._core_ids = itertools.count()
        self._threads_before = threads_before
        # At interpreter exit (or if the link is dropped unclosed): end the workers, leave the group.
        self._finalizer = weakref.finalize(self, reap, [w.process for w in workers], [w.conn for w in workers],
                                           group=group)
        self._watcher = threading.Thread(target=self._watch, name="nvlm-tp-watcher", daemon=True)
        self._watcher.start()

    # --- what the decode core and the decoder call ------------------------------------------

    def new_cache(self, layer_devices: Sequence[torch.device], **settings: Any) -> MirroredKVCache:
        """A KV cache for a new decode core, mirrored on every worker."""
        core = next(self._core_ids)
        max_tokens = settings.get("max_tokens")
        self.send(Command("new_cache", core, (settings["max_capacity"], -1 if max_tokens is None else max_tokens,
                                              settings["max_slots"], settings["kv_heads"], settings["head_dim"],
                                              settings.get("static_addresses", False))))
        cache = MirroredKVCache(self, core, layer_devices, **settings)
        weakref.finalize(cache, self._drops.append, core)
        return cache

    @contextmanager
    def step(self, kv: MirroredKVCache, hidden: torch.Tensor, positions: torch.Tensor, write_slots: torch.Tensor,
             window: int, chunks: tuple[Chunk, ...], *, compiled: bool = False) -> Iterator[None]:
        """Start the workers on a step (`decoder.mixed_step` / `decode_step`); rank 0 runs its own
        layers inside the block. `compiled`: a decode-only step that rank 0 runs compiled; the
        workers run their layers through their own compiled function too (same shapes, one graph)."""
        with self._guard():
            self._send(Command("step", kv.core_id, (hidden.shape[1], write_slots.shape[0], window, chunks, compiled)))
            self._group.broadcast(hidden.contiguous())
            self._group.broadcast(torch.cat([positions, write_slots.to(positions.device)]).to(hidden.device, torch.long))
            yield

    def encode_images(self, model: torch.nn.Module, pixel_values: torch.Tensor, chunk_tiles: int) -> torch.Tensor:
        """Tiles [T, 3, H, W] -> image tokens [T, 256, hidden], each rank encoding a contiguous slice.

        Rank 0 encodes the first slice with its own tower while the workers encode theirs; the
        slices come back by one gather, padded to the largest (`tp_worker.padded_tokens`).
        """
        vision, projector = model.vision_model, model.mlp1
        first = vision.embeddings.patch_embedding.weight
        counts = tile_counts(pixel_values.shape[0], self.tp)
        with self._guard():
            self._send(Command("encode", -1, (tuple(counts), tuple(pixel_values.shape[1:]), chunk_tiles)))
            pixels = pixel_values.to(device=first.device, dtype=first.dtype).contiguous()
            self._group.broadcast(pixels)
            ours = encode_tiles([(vision, projector)], model.config, pixels[: counts[0]], chunk_tiles)
            pieces = self._group.gather(padded_tokens(ours, max(counts), model.config, ours.dtype, ours.device))
        assert pieces is not None  # rank 0 is the gather's root
        return torch.cat([piece[:count] for piece, count in zip(pieces, counts)])

    def send(self, command: Command) -> None:
        """Send one command that needs no collective (cache bookkeeping)."""
        with self._guard():
            self._send(command)

    # --- inspection and shutdown ----------------------------------------------------------

    def worker_stats(self) -> list[dict[str, Any]]:
        """Each worker's resident tensors (`weights`: name -> bytes) and KV caches (`kv`: core -> bytes)."""
        with self._guard():
            self._send(Command("stats"))
            return [w.conn.recv() for w in self._workers]

    @property
    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    @property
    def exitcodes(self) -> list[int | None]:
        """Each worker's exit code (None while it runs; 0 after a clean `close()`)."""
        return [w.process.exitcode for w in self._workers]

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the workers and shut the group down; later calls fail with `TensorParallelError`."""
        locked = self._lock.acquire(timeout=TIMEOUT_S)  # a step in flight ends first (or is cut off)
        try:
            self._shutdown(graceful=locked and self._failure is None)
        finally:
            if locked:
                self._lock.release()

    # --- internals ------------------------------------------------------------------------

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Hold the lock; on any failure shut everything down (the ranks are out of step)."""
        with self._lock:
            self._check()
            try:
                yield
            except Exception as e:
                self._failed.wait(2.0)  # the watcher names the worker that died, if one did
                self._fail(f"step failed on rank 0 ({type(e).__name__}: {e})")
                self._shutdown(graceful=False)
                raise TensorParallelError(self._message()) from e
            except BaseException:  # KeyboardInterrupt mid-step: the workers cannot be resynced
                self._fail("step interrupted on rank 0")
                self._shutdown(graceful=False)
                raise

    def _check(self) -> None:
        if self._failure is not None:
            self._shutdown(graceful=False)
            raise TensorParallelError(self._message())
        if self._closed:
            raise TensorParallelError("the tensor-parallel engine was closed (engine.close()); recreate it to "
                                      "generate again.")

    def _message(self) -> str:
        return (f"tensor-parallel {self._failure}; the engine was shut down; recreate it "
                f"(NVLMEngine.from_pretrained(..., tensor_parallel={self.tp})).")

    def _fail(self, reason: str) -> None:
        if self._failure is None:
            self._failure = reason
        self._failed.set()

    def _send(self, command: Command) -> None:
        drops: list[int] = []
        while self._drops:
            drops.append(self._drops.popleft())
        command = replace(command, drops=tuple(drops)) if drops else command
        for worker in self._workers:
            worker.conn.send(command)

    def _watch(self) -> None:
        """Wait on every worker's process handle; the first to exit ends the engine."""
        sentinels = {w.process.sentinel: w for w in self._workers}
        while not self._closed:
            ready = multiprocessing.connection.wait(list(sentinels), timeout=0.5)
            if not ready or self._closed:
                continue
            dead = sorted((sentinels[s] for s in ready), key=lambda w: (not (w.process.exitcode or 0) < 0, w.rank))
            worker = dead[0]
            worker.process.join(0.1)
            self._fail(f"worker rank {worker.rank} exited (code {worker.process.exitcode})")
            for other in self._workers:  # a peer blocked in a collective with the dead one fails at once
                if other.process.is_alive():
                    other.process.kill()
            if self._lock.acquire(blocking=False):  # idle: shut down now; else the step in flight does
                try:
                    self._shutdown(graceful=False)
                finally:
                    self._lock.release()
            return

    def _shutdown(self, *, graceful: bool) -> None:
        """Stop every worker (politely when `graceful`), reap them, shut the group down."""
        if self._closed:
            return
        self._closed = True
        if graceful:
            for worker in self._workers:
                try:
                    worker.conn.send(Command("stop"))
                except OSError:
                    pass
        self._finalizer.detach()
        reap([w.process for w in self._workers], [w.conn for w in self._workers],
              wait_s=_STOP_WAIT_S if graceful else 0.0, group=self._group)
        if threading.current_thread() is not self._watcher:  # thread settings are per thread for OpenMP
            torch.set_num_threads(self._threads_before)
            self._watcher.join(timeout=2.0)


def reap(processes: list[Any], conns: list[multiprocessing.connection.Connection], wait_s: float = 2.0,
          group: Group | None = None) -> None:
    """Close the pipes (an idle worker exits on their end), join `processes` for up to `wait_s`
    seconds, kill the rest, leave the group. Also what runs at interpreter exit."""
    for conn in conns:
        conn.close()
    for process in processes:
        process.join(wait_s)
    for process in processes:
        if process.is_alive():
            process.kill()
        process.join(_STOP_WAIT_S)
    if group is not None:
        group.shutdown()
