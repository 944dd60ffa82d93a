"""Starting a tensor-parallel engine: the memory plan, the workers, rank 0's model, the process group.

`load_tensor_parallel` is what `loading.py` calls for `tensor_parallel > 1`:

1. on CUDA, `rank_kv_tokens` plans every rank's memory first (`placement_tensor.plan_tensor_parallel`,
   each rank at the free memory of the fullest GPU: every rank holds the same share) and refuses,
   with the planner's `PlanError`, a rank that does not fit, before any process starts; its
   smallest KV room is the KV cache every rank is sized for (every rank caches the same tokens).
   On the CPU nothing is planned (its memory is the operating system's business), as before;
2. `tp - 1` worker processes start (`tp_worker.py`, torch.multiprocessing "spawn") while rank 0
   loads its own model (its shard of every decoder layer; the vision tower, projector,
   embeddings, final norm and LM head whole); with `quantization`, every rank quantizes its
   shard of each decoder linear as it reads it (`tensor_parallel.fill_shards`);
3. rank 0 waits for every worker's "loaded", then joins them in the engine's own process group
   (`tp_worker.Group`: gloo on the CPU, NCCL on CUDA, one GPU per rank).

A worker that dies at any of these steps fails the load within a fraction of a second with a
`TensorParallelError` naming its rank and exit code, and the other workers are killed: rank 0
checks the workers between the tensors it reads, and joins the group on a helper thread while
it watches the workers' process handles, instead of waiting out the group's timeout. (If a
worker dies inside the rendezvous, that helper thread stays blocked until the timeout and
then ends; it holds no process and nothing else waits on it.)

Scripts must guard their entry point with `if __name__ == "__main__":` (spawned workers import
the main module). On the CPU each rank gets `cpu_count // tp` torch threads. Knows processes,
devices and the planner; knows nothing of requests (`tp_executor.TensorParallelLink` drives the
ranks once loaded).
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .checkpoint import TensorInfo, fill_model
from .config import NVLMConfig
from .devices import MaxMemory, memory_budget, resolve_dtype
from .errors import TensorParallelError, TensorParallelOptionsError
from .placement_plan import DeviceSpec
from .placement_sizes import Footprint
from .quantization import QuantizationScheme
from .tensor_parallel import (
    build_rank0_model,
    check_tp_size,
    fill_shards,
    layer_infos,
    rank_devices,
    rebuild_rotary,
    vision_infos,
)
from .tp_executor import TIMEOUT_S, TensorParallelLink, Worker, reap
from .tp_worker import Group, WorkerSpec, worker_main

logger = logging.getLogger(__name__)

_POLL_S = 0.05  # how often rank 0 looks at the workers while it joins the group


def rank_kv_tokens(footprint: Footprint, gpus: Sequence[DeviceSpec] | None, *, context_length: int,
                   batch_size: int) -> int | None:
    """KV cache tokens (all sequences together) to size every rank's cache for; None: not bounded (CPU).

    Args:
        footprint: tensor sizes in the compute dtype (and quantization: shards are sized as stored).
        gpus: one spec per rank, rank 0 first, at the memory each may use; None or [] on the CPU.
        context_length, batch_size: what must fit (one sequence of `context_length` per batch row).

    Raises:
        PlanError: a rank does not fit (the planner's message: which rank, by how much, what would fit).
        TensorParallelOptionsError: GPUs the planner does not take for tensor parallelism (unlike GPUs).
    """
    from .placement_tensor import plan_tensor_parallel

    if not gpus:
        return None
    plan = plan_tensor_parallel(footprint, gpus, context_length=context_length, batch_size=batch_size)
    logger.info("tensor-parallel plan: %s; KV room per rank %s tokens", ", ".join(
        f"rank {r}: {d.weight_bytes / 2**30:.1f} GiB weights" for r, d in enumerate(plan.ranks)), plan.kv_tokens)
    return min(plan.kv_tokens)  # every rank caches the same tokens: the tightest rank bounds them all


def rank_gpu_specs(devices: Sequence[torch.device], local: Sequence[DeviceSpec],
                   max_memory: MaxMemory | None = None) -> list[DeviceSpec] | None:
    """The planner's view of the ranks' GPUs: each rank's GPU at the smallest memory among them.

    `local` is `devices.local_gpus()` (free memory now); a GPU `max_memory` lists is planned at
    that budget instead, as in the layer split. The smallest counts for all: every rank gets the
    same share, and a few hundred MiB more in use on one GPU (a CUDA context) must not make the
    GPUs look unlike to the planner. None when the ranks are on the CPU.
    """
    if devices[0].type != "cuda":
        return None
    by_name = {spec.name: spec for spec in local}
    specs = [by_name[str(device)] for device in devices]
    budgets = [memory_budget(max_memory, device) for device in devices]
    smallest = min(spec.memory_bytes if budget is None else budget for spec, budget in zip(specs, budgets))
    return [DeviceSpec(spec.name, smallest, spec.label, spec.capability) for spec in specs]


def check_rank_budgets(max_memory: MaxMemory, devices: Sequence[torch.device]) -> None:
    """Refuse a `max_memory` tensor parallelism cannot honour: a CPU budget (offload), budgets for
    CPU ranks (nothing is planned there), or a GPU that is not one of the ranks'.

    Raises:
        TensorParallelOptionsError: naming what to drop.
    """
    tp = len(devices)
    if memory_budget(max_memory, torch.device("cpu")) is not None:
        raise TensorParallelOptionsError(
            f"max_memory has a 'cpu' budget (CPU offload), which tensor_parallel={tp} cannot use: every rank holds "
            f"its whole shard on its GPU. Drop the cpu entry (--cpu-offload), or load without tensor_parallel "
            f"(the layer split).")
    if devices[0].type != "cuda":
        raise TensorParallelOptionsError(
            f"max_memory budgets GPUs; the tensor_parallel={tp} ranks run on the CPU, where nothing is planned. "
            f"Drop max_memory.")
    stray = [key for key in max_memory if all(memory_budget({key: max_memory[key]}, d) is None for d in devices)]
    if stray:
        raise TensorParallelOptionsError(
            f"max_memory names {', '.join(map(repr, stray))}, which is not one of the ranks' GPUs "
            f"({', '.join(map(str, devices))}). Give budgets for those GPUs only.")


def load_tensor_parallel(folder: Path, config: NVLMConfig, infos: Mapping[str, TensorInfo], *, tp: int,
                         device_map: Any, dtype: str | torch.dtype | None, context_length: int,
                         quantization: QuantizationScheme | None = None,
                         timeout_s: float = TIMEOUT_S) -> torch.nn.Module:
    """Start the workers, load rank 0's model, join the group; returns rank 0's model, linked.

    `quantization` is checked against the ranks' devices by the caller (`quantization.check_runtime`).

    Raises:
        TensorParallelOptionsError: a size or device map tensor parallelism cannot use.
        TensorParallelError: a worker failed to load its shard or exited before joining the group.
    """
    check_tp_size(config.llm, tp)
    devices = rank_devices(device_map, tp)
    compute_dtype = resolve_dtype(dtype, devices[0])
    backend = "nccl" if devices[0].type == "cuda" else "gloo"
    threads_before = torch.get_num_threads()
    threads = max(1, (os.cpu_count() or 1) // tp) if devices[0].type == "cpu" else threads_before
    store = dist.TCPStore("127.0.0.1", 0, tp, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout_s))
    context = torch.multiprocessing.get_context("spawn")
    layers = layer_infos(infos)
    worker_infos = {**layers, **vision_infos(infos)}
    workers: list[Worker] = []
    try:
        for rank in range(1, tp):
            ours, theirs = context.Pipe(duplex=True)
            spec = WorkerSpec(rank=rank, tp=tp, port=store.port, backend=backend, device=str(devices[rank]),
                              dtype=compute_dtype, config=config, context_length=context_length, infos=worker_infos,
                              timeout_s=timeout_s, threads=threads, parent_pid=os.getpid(),
                              quantization=quantization)
            process = context.Process(target=worker_main, args=(spec, theirs), daemon=True,
                                      name=f"nvlm-tp-rank{rank}")
            process.start()
            theirs.close()
            workers.append(Worker(rank, process, ours))
        watch = _StartWatch(workers)
        torch.set_num_threads(threads)
        model = _load_rank0(config, infos, layers, tp=tp, device=devices[0], dtype=compute_dtype,
                            context_length=context_length, check=watch.check, quantization=quantization)
        watch.wait_loaded()
        group = watch.join(lambda: Group(backend, store.port, 0, tp, timeout_s, store=store))
    except BaseException:
        reap([w.process for w in workers], [w.conn for w in workers], wait_s=0.0)
        torch.set_num_threads(threads_before)
        raise
    link = TensorParallelLink(workers, tp=tp, group=group, threads_before=threads_before)
    model.tp_link = link
    model.tp_reduce = group.all_reduce
    logger.info("tensor parallel x%d (%s) on %s: workers %s%s", tp, backend, [str(d) for d in devices],
                link.worker_pids, f"; {quantization.name} decoder-linear shards" if quantization else "")
    return model


def _load_rank0(config: NVLMConfig, infos: Mapping[str, TensorInfo], layers: Mapping[str, TensorInfo], *, tp: int,
                device: torch.device, dtype: torch.dtype, context_length: int,
                check: Callable[[], None], quantization: QuantizationScheme | None) -> torch.nn.Module:
    """Rank 0's model: everything but the decoder layers whole, its slice of every layer tensor
    (its decoder-linear shards quantized with `quantization`)."""
    model = build_rank0_model(config, context_length, tp)
    head = "language_model.lm_head.weight"
    # CPU GEMM kernels read a column-major LM head faster at small batches (as `loading.py` does).
    column_major = frozenset({head}) if device.type == "cpu" else frozenset()
    rest = {n: i for n, i in infos.items() if n not in layers}
    fill_model(model, rest, device_of=lambda _: device, dtype=dtype, column_major=column_major,
               progress=lambda *_: check())
    fill_shards(model, layers, rank=0, tp=tp, device=device, dtype=dtype, check=check, quantization=quantization)
    rebuild_rotary(model, device)
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    assert not leftovers, f"tensors left on meta after loading: {leftovers[:5]}"
    model.prepare_for_inference()
    return model


class _StartWatch:
    """Rank 0's view of its workers while they start: loaded reports, failure reports, exits."""

    def __init__(self, workers: list[Worker]) -> None:
        self.workers = workers
        self.loaded: set[int] = set()

    def check(self) -> None:
        """Raise if a worker reported a failure or exited (non-blocking); note "loaded" reports.

        The error says where the dead worker was: its "loaded" report is read before its exit is
        looked at, and it sent that report before it could exit while joining.
        """
        for worker in self.workers:
            if worker.rank not in self.loaded and worker.conn.poll():
                try:
                    kind, detail = worker.conn.recv()
                except EOFError:
                    kind, detail = "failed", None
                if kind == "loaded":
                    self.loaded.add(worker.rank)
                elif detail is not None:
                    raise TensorParallelError(f"tensor-parallel worker rank {worker.rank} failed to load its shard "
                                              f"({detail}); fix the cause and load the engine again.")
            if worker.process.exitcode is not None:
                worker.process.join(0.1)
                stage = "while joining the process group" if worker.rank in self.loaded else "while loading"
                raise TensorParallelError(f"tensor-parallel worker rank {worker.rank} exited {stage} (code "
                                          f"{worker.process.exitcode}); check its output above, then load again.")

    def wait_loaded(self) -> None:
        """Block until every worker reports its shard loaded; a failure report or an exit raises."""
        while len(self.loaded) < len(self.workers):
            pending = [w for w in self.workers if w.rank not in self.loaded]
            multiprocessing.connection.wait([h for w in pending for h in (w.conn, w.process.sentinel)])
            self.check()

    def join(self, make_group: Callable[[], Group]) -> Group:
        """Join the group on a helper thread (the rendezvous blocks) while watching the workers."""
        outcome: dict[str, Any] = {}

        def rendezvous() -> None:
            try:
                outcome["group"] = make_group()
            except BaseException as e:  # noqa: BLE001 (handed to the loading thread)
                outcome["error"] = e

        thread = threading.Thread(target=rendezvous, name="nvlm-tp-rendezvous", daemon=True)
        thread.start()
        sentinels = [w.process.sentinel for w in self.workers]
        while thread.is_alive():
            multiprocessing.connection.wait(sentinels, timeout=_POLL_S)
            self.check()
        if "error" in outcome:
            self.check()  # a dead worker names the cause better
            raise TensorParallelError(f"tensor-parallel ranks failed to join their process group "
                                      f"({outcome['error']}); load the engine again.") from outcome["error"]
        return outcome["group"]
