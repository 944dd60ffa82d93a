"""A tensor-parallel worker rank: its process, its shard of the decoder layers, its mirror of the KV caches.

Rank 0 (the engine's process, `tp_startup.py`) starts one such process per other rank. The
worker reads its slice of every decoder-layer tensor (`tensor_parallel.fill_shards`, quantizing
its shard of each decoder linear as it is read when the engine is quantized) and the whole
vision tower and projector, reports "loaded" through its pipe, joins the process group,
and then serves `Command`s from the pipe in order, forever:

- `new_cache` / `ensure` / `copy_prefix`: the same operation on its own `KVCache` of that core
  (its KV heads only), so every cache stays in step with rank 0's;
- `step`: receive the step's layer inputs by broadcast (the flat hidden states [1, N, hidden]
  of its decode rows and prefill chunks, then their positions and the rows' write slots), then
  run `decoder.step_hidden` on its shard; the all-reduces inside pair with rank 0's. It
  computes no logits: rank 0 alone does, and samples. A decode-only step that rank 0 runs
  compiled (`DecodeSettings(compile=True)`) runs here through this rank's own compiled
  `step_hidden` (`decoder.compile_decode`): the same static shapes, the same graph every step;
- `encode`: receive a request's image tiles by broadcast, encode this rank's contiguous slice
  (`tensor_parallel.tile_counts`) with its own copy of the vision tower and projector, and send
  the image tokens to rank 0 by gather (padded to the largest slice, trimmed by rank 0);
- `stats`: reply with the bytes of every tensor it holds, the class of each decoder linear and
  its compile counters (what tests measure);
- `stop`: leave the process group and exit.

Commands come by pipe, not by collective: an idle worker blocks on the pipe with no timeout,
and the pipe's end of file says rank 0 is gone. A worker also exits when its parent process
changes (rank 0 killed), so none is left behind. Any failure is printed and ends the process
with a non-zero code, which rank 0's watcher turns into a `TensorParallelError`.

For tests only: `NVLM_ENGINE_TP_TEST_EXIT="<rank>:<stage>"` in the environment makes that rank
exit with code 3 at `stage`: "load" (before reading its tensors) or "join" (after reporting
"loaded", before joining the group; a second later, so that rank 0 is waiting in the
rendezvous by then), the two moments rank 0 must notice a death while starting.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as _c10d  # the named-group table (see `Group`)

from .checkpoint import TensorInfo
from .config import NVLMConfig
from .quantization import QuantizationScheme, is_quantized_module


@dataclass(frozen=True)
class Command:
    """One instruction from rank 0 to every worker (sent by pipe; our own process group only).

    Attributes:
        op: "new_cache", "step", "encode", "stats", "stop", or a `KVCache` method that
            changes the cache (`MIRRORED_CACHE_METHODS`), called with `args` and `kwargs`.
        core: the decode core (KV cache) it applies to.
        args, kwargs: the operation's arguments (ints, tuples of ints, chunk records).
        drops: caches of cores rank 0 no longer has; the worker frees them first.
    """

    op: str
    core: int = -1
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    drops: tuple[int, ...] = ()


# The `KVCache` methods that change a cache: rank 0's `MirroredKVCache` sends each call to the workers.
MIRRORED_CACHE_METHODS = ("ensure", "copy_prefix")


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to load its shard and join the group."""

    rank: int
    tp: int
    port: int
    backend: str
    device: str
    dtype: torch.dtype
    config: NVLMConfig
    context_length: int
    infos: dict[str, TensorInfo]  # the decoder-layer tensors, the vision tower's and the projector's
    timeout_s: float
    threads: int
    parent_pid: int
    quantization: QuantizationScheme | None = None  # of this rank's decoder-linear shards


logger = logging.getLogger(__name__)
TEST_EXIT_ENV = "NVLM_ENGINE_TP_TEST_EXIT"  # "<rank>:<stage>": that rank exits with code 3 there (tests)
TEST_EXIT_CODE = 3


class Group:
    """The engine's own process group: its ranks only, not torch.distributed's default group.

    Being nobody's default group, several tensor-parallel engines (or a user's own
    `init_process_group`) can live in one process. `timeout_s` bounds a collective that waits
    on a live but stuck peer; a dead peer's closed connection fails a collective at once.

    The group is registered under `name` (torch's table of named groups, not the default group)
    so that its all-reduce is torch's functional collective, which `torch.compile` traces into
    the compiled decode step (and, on CUDA, into its captured graph) instead of breaking the
    graph on a call into the process group object.
    """

    def __init__(self, backend: str, port: int, rank: int, tp: int, timeout_s: float,
                 store: dist.TCPStore | None = None) -> None:
        timeout = timedelta(seconds=timeout_s)
        if store is None:
            store = dist.TCPStore("127.0.0.1", port, tp, is_master=False, timeout=timeout)
        self.store = store  # kept alive as long as the group
        self.name = f"nvlm-tp-{port}"  # one live group per rendezvous port on this host
        prefixed = dist.PrefixStore(self.name, store)
        if backend == "gloo":
            kind, device = dist.ProcessGroup.BackendType.GLOO, torch.device("cpu")
            self._backend: Any = dist.ProcessGroupGloo(prefixed, rank, tp, timeout)
        else:
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            kind, device = dist.ProcessGroup.BackendType.NCCL, torch.device("cuda")
            self._backend = dist.ProcessGroupNCCL(prefixed, rank, tp, options)
        self.pg = dist.ProcessGroup(prefixed, rank, tp)
        self.pg._set_default_backend(kind)
        self.pg._register_backend(device, kind, self._backend)
        self.pg._set_group_name(self.name)
        _c10d._register_process_group(self.name, self.pg)
        self._root = dist.BroadcastOptions()
        self._root.rootRank = 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over every rank (the row-parallel linears' partial outputs), a new tensor.

        Torch's functional all-reduce on this group: the same call runs eager and compiled.
        """
        summed = torch.ops._c10d_functional.all_reduce(tensor, "sum", self.name)
        return torch.ops._c10d_functional.wait_tensor(summed)

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Rank 0's `tensor` into every other rank's `tensor`, in place."""
        self.pg.broadcast([tensor], self._root).wait()

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `tensor` (same shape on all) to rank 0, in rank order; None on the others."""
        root = dist.GatherOptions()
        root.rootRank = 0
        outputs = [[torch.empty_like(tensor) for _ in range(self.pg.size())]] if self.pg.rank() == 0 else []
        self.pg.gather(outputs, [tensor], root).wait()
        return outputs[0] if outputs else None

    def shutdown(self) -> None:
        """Leave the group (connections closed); the group cannot be used afterwards."""
        try:
            _c10d._unregister_process_group(self.name)
        except Exception:  # noqa: BLE001, S110 (not registered: nothing to undo)
            pass
        try:
            self._backend.shutdown()
        except Exception:  # noqa: BLE001, S110 (already broken by a dead peer: nothing left to close)
            pass


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Entry point of worker rank `spec.rank` (a spawned process; its log lines go to stderr)."""
    logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s nvlm-engine TP rank {spec.rank}: %(message)s")
    _exit_with_parent(spec.parent_pid)
    try:
        _test_exit(spec.rank, "load")
        model = _load(spec)
    except Exception as e:
        logger.exception("tensor-parallel worker rank %d failed to load its shard", spec.rank)
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        sys.exit(1)
    from .tensor_parallel import tensor_bytes

    conn.send(("loaded", sum(tensor_bytes(model).values())))
    _test_exit(spec.rank, "join")
    group: Group | None = None
    try:
        group = Group(spec.backend, spec.port, spec.rank, spec.tp, spec.timeout_s)
        model.tp_reduce = group.all_reduce
        with torch.inference_mode():
            _serve(spec, model, conn, group)
    except Exception:
        logger.exception("tensor-parallel worker rank %d failed", spec.rank)
        sys.exit(1)
    finally:
        if group is not None:
            group.shutdown()


def _load(spec: WorkerSpec) -> torch.nn.Module:
    from .checkpoint import fill_model
    from .tensor_parallel import WorkerModel, fill_shards, layer_infos, rebuild_rotary, vision_infos

    device = torch.device(spec.device)
    torch.set_num_threads(spec.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = WorkerModel(spec.config, spec.context_length, spec.tp)
    fill_shards(model, layer_infos(spec.infos), rank=spec.rank, tp=spec.tp, device=device, dtype=spec.dtype,
                quantization=spec.quantization)
    fill_model(model, vision_infos(spec.infos), device_of=lambda _: device, dtype=spec.dtype)
    rebuild_rotary(model, device)
    model.vision_model.drop_dummy_heads()  # as rank 0's `prepare_for_inference` does, from the same tensors
    return model.eval()


def _serve(spec: WorkerSpec, model: torch.nn.Module, conn: Connection, group: Group) -> None:
    """Run rank 0's commands until "stop" or until rank 0 is gone."""
    from .decoder import compile_decode, step_hidden
    from .kv_cache import KVCache
    from .model import encode_tiles
    from .tensor_parallel import tensor_bytes

    device = torch.device(spec.device)
    layers = model.language_model.model.layers
    hidden_size = spec.config.llm.hidden_size
    caches: dict[int, KVCache] = {}
    compiled_step: Callable[..., torch.Tensor] | None = None  # made at the first compiled step
    compiled_steps = 0
    while True:
        try:
            command: Command = conn.recv()
        except EOFError:  # rank 0 closed its end (or died): nothing more will come
            return
        for core in command.drops:
            caches.pop(core, None)
        op, args = command.op, command.args
        if op == "stop":
            return
        if op == "new_cache":
            capacity, max_tokens, max_slots, kv_heads, head_dim, static_addresses = args
            attn = layers[0].self_attn
            assert (kv_heads, head_dim) == (attn.k_proj.out_features // attn.head_dim, attn.head_dim), "shard mismatch"
            caches[command.core] = KVCache([device] * len(layers), kv_heads=kv_heads, head_dim=head_dim,
                                           dtype=spec.dtype, max_capacity=capacity,
                                           max_tokens=None if max_tokens < 0 else max_tokens, max_slots=max_slots,
                                           static_addresses=static_addresses)
        elif op in MIRRORED_CACHE_METHODS:
            getattr(caches[command.core], op)(*args, **command.kwargs)
        elif op == "step":
            tokens, rows, window, chunks, compiled = args
            hidden = torch.empty((1, tokens, hidden_size), dtype=spec.dtype, device=device)
            flat = torch.empty((tokens + rows,), dtype=torch.long, device=device)  # positions, then the rows' slots
            group.broadcast(hidden)
            group.broadcast(flat)
            if compiled and compiled_step is None:
                compiled_step = compile_decode(step_hidden, device)
            run = compiled_step if compiled else step_hidden
            run(model, caches[command.core], hidden, flat[:tokens], flat[tokens:], window, chunks)
            compiled_steps += compiled
        elif op == "encode":
            counts, tile_shape, chunk_tiles = args
            pixels = torch.empty((sum(counts), *tile_shape), dtype=spec.dtype, device=device)
            group.broadcast(pixels)
            start, count = sum(counts[: spec.rank]), counts[spec.rank]
            tokens = (encode_tiles([(model.vision_model, model.mlp1)], spec.config, pixels[start : start + count],
                                   chunk_tiles) if count else None)
            group.gather(padded_tokens(tokens, max(counts), spec.config, spec.dtype, device))
        elif op == "stats":
            conn.send({"weights": tensor_bytes(model), "kv": {c: kv.nbytes for c, kv in caches.items()},
                       "kv_heads": {c: kv.kv_heads for c, kv in caches.items()},
                       "linears": {n: type(m).__name__ for n, m in model.named_modules() if is_quantized_module(n)},
                       "compiled": _compile_counts(compiled_steps)})
        else:
            raise AssertionError(f"unknown command {op!r}")


def _compile_counts(steps: int) -> dict[str, int]:
    """Compiled steps run, and this process's `torch.compile` counters: graphs made (a recompile
    is one more), graph breaks."""
    from torch._dynamo.utils import counters

    return {"steps": steps, "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values())}


def padded_tokens(tokens: torch.Tensor | None, tiles: int, config: NVLMConfig, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """A rank's image tokens [t, 256, hidden] zero-padded to `tiles` tiles: what every rank sends to the gather
    (collectives need one shape on all ranks; rank 0 trims each rank's padding)."""
    out = torch.zeros((tiles, config.tokens_per_tile, config.llm.hidden_size), dtype=dtype, device=device)
    if tokens is not None:
        out[: tokens.shape[0]] = tokens
    return out


def _test_exit(rank: int, stage: str) -> None:
    """Exit here when the test hook names this rank and stage (see the module docstring)."""
    if os.environ.get(TEST_EXIT_ENV) == f"{rank}:{stage}":
        time.sleep(1.0 if stage == "join" else 0.0)
        logger.warning("exiting at stage %r (%s is set)", stage, TEST_EXIT_ENV)
        os._exit(TEST_EXIT_CODE)


def _exit_with_parent(parent_pid: int) -> None:
    """Exit at once if rank 0's process goes away (then nobody can stop this one)."""

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="nvlm-tp-parent-watch", daemon=True).start()
