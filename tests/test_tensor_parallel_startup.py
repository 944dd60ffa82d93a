"""Starting a tensor-parallel engine (issue 13): dying workers fail it at once; CUDA ranks are planned first.

- A worker that exits while loading, or after loading and before joining the process group
  (`tp_worker`'s test hook, `NVLM_ENGINE_TP_TEST_EXIT`, exits with code 3 at that stage), makes
  `from_pretrained` raise `TensorParallelError` naming the rank and its exit code within seconds
  (the group's timeout is 120 s), and no worker process is left.
- On CUDA the loader plans every rank before starting a process and sizes the KV cache from
  the tightest rank (`tp_startup.rank_kv_tokens`, `rank_gpu_specs`): checked on the CPU with
  `DeviceSpec`s standing for GPUs (the planner's input), as the loader builds them from
  `devices.local_gpus()`. On the CPU nothing is planned.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch

from nvlm_engine import NVLMEngine
from nvlm_engine.errors import TensorParallelError, TensorParallelOptionsError
from nvlm_engine.placement import GIB, DeviceSpec, Footprint, PlanError
from nvlm_engine.placement_tensor import plan_tensor_parallel
from nvlm_engine.testing import build_tiny_checkpoint, tiny_config
from nvlm_engine.tp_startup import check_rank_budgets, rank_gpu_specs, rank_kv_tokens
from nvlm_engine.tp_worker import TEST_EXIT_CODE, TEST_EXIT_ENV

TIMEOUT_S = 120  # tp_executor.TIMEOUT_S: what rank 0 waited before
CONFIG = tiny_config(llm_heads=8, llm_kv_heads=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-tp-start"), config=CONFIG)


def _live_children() -> set[int]:
    """Pids of this process's spawned children (workers; not the resource tracker) still running, from /proc."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            spawned = b"multiprocessing.spawn" in (stat.parent / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and spawned:
            pids.add(int(stat.parent.name))
    return pids


@pytest.mark.parametrize(("tp", "rank", "stage", "words"), [
    (2, 1, "load", "worker rank 1 exited while loading"),
    (2, 1, "join", "worker rank 1 exited while joining the process group"),  # rank 0 waits in the rendezvous
    (4, 3, "join", "worker rank 3 exited while joining the process group"),  # the others are killed
])
def test_a_worker_dying_while_starting_fails_the_load_at_once(checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
                                                               tp: int, rank: int, stage: str, words: str) -> None:
    monkeypatch.setenv(TEST_EXIT_ENV, f"{rank}:{stage}")
    before = set(multiprocessing.active_children())
    children = _live_children()
    started = time.monotonic()
    with pytest.raises(TensorParallelError) as caught:
        NVLMEngine.from_pretrained(checkpoint, device_map="cpu", dtype="float32", progress=False,
                                   tensor_parallel=tp)
    elapsed = time.monotonic() - started
    assert f"{words} (code {TEST_EXIT_CODE})" in str(caught.value) and "load again" in str(caught.value)
    # Starting tp - 1 interpreters that import torch takes seconds on 2 cores; the death is seen within 0.1 s.
    assert elapsed < 30 < TIMEOUT_S
    assert set(multiprocessing.active_children()) == before
    assert _live_children() <= children  # every worker started here was killed and reaped


# --- the CUDA plan, decided on the CPU ---------------------------------------------------------


@pytest.fixture(scope="module")
def footprint() -> Footprint:
    return Footprint.from_config(CONFIG, dtype=torch.bfloat16)


def _gpus(*free: int) -> list[DeviceSpec]:
    return [DeviceSpec(f"cuda:{i}", memory, "H200", (9, 0)) for i, memory in enumerate(free)]


def test_the_cpu_is_not_planned(footprint: Footprint) -> None:
    assert rank_gpu_specs([torch.device("cpu")] * 2, []) is None
    assert rank_kv_tokens(footprint, None, context_length=4096, batch_size=1) is None


def test_each_rank_is_planned_at_the_smallest_free_memory(footprint: Footprint) -> None:
    """A CUDA context on cuda:0 must not make alike GPUs unlike; the fullest GPU bounds every rank."""
    local = _gpus(30 * GIB, 31 * GIB, 29 * GIB, 40 * GIB)  # cuda:3 is not one of the ranks
    devices = [torch.device("cuda", i) for i in range(2)]
    specs = rank_gpu_specs(devices, local)
    assert specs == _gpus(30 * GIB, 30 * GIB)
    assert rank_gpu_specs([torch.device("cuda", 2), torch.device("cuda", 1)], local) == [
        DeviceSpec("cuda:2", 29 * GIB, "H200", (9, 0)), DeviceSpec("cuda:1", 29 * GIB, "H200", (9, 0))]


def test_max_memory_budgets_the_ranks_gpus(footprint: Footprint) -> None:
    """A GPU max_memory lists is planned at its budget (as in the layer split); the smallest still counts for all."""
    local = _gpus(30 * GIB, 31 * GIB)
    devices = [torch.device("cuda", i) for i in range(2)]
    assert rank_gpu_specs(devices, local, {1: "20GiB"}) == _gpus(20 * GIB, 20 * GIB)
    assert rank_gpu_specs(devices, local, {"cuda:0": "40GiB", "cuda:1": "35GiB"}) == _gpus(35 * GIB, 35 * GIB)
    assert rank_gpu_specs(devices, local, {}) == _gpus(30 * GIB, 30 * GIB)
    check_rank_budgets({0: "20GiB", "cuda:1": "20GiB"}, devices)  # every key a rank's GPU: accepted


@pytest.mark.parametrize(("max_memory", "devices", "says"), [
    ({"cpu": "100GiB", 0: "20GiB"}, ["cuda:0", "cuda:1"], "'cpu' budget"),
    ({0: "20GiB"}, ["cpu", "cpu"], "run on the CPU"),
    ({0: "20GiB", "cuda:3": "20GiB"}, ["cuda:0", "cuda:1"], "'cuda:3', which is not one of the ranks' GPUs"),
    ({2: "20GiB"}, ["cuda:0", "cuda:1"], "2, which is not one of the ranks' GPUs"),
])
def test_max_memory_tensor_parallelism_cannot_honour_is_refused(max_memory: dict, devices: list[str],
                                                                says: str) -> None:
    with pytest.raises(TensorParallelOptionsError, match="tensor_parallel|ranks") as info:
        check_rank_budgets(max_memory, [torch.device(d) for d in devices])
    assert says in str(info.value)


def test_kv_cache_is_sized_from_the_tightest_rank(footprint: Footprint) -> None:
    """Every rank caches the same tokens: the budget is the smallest rank's room (rank 0: it holds the head)."""
    gpus = _gpus(3 * GIB, 3 * GIB)
    tokens = rank_kv_tokens(footprint, gpus, context_length=4096, batch_size=2)
    plan = plan_tensor_parallel(footprint, gpus, context_length=4096, batch_size=2)
    rank0, rank1 = plan.kv_tokens
    assert rank0 < rank1  # the embeddings and LM head (152k x 64) leave rank 0 less room
    assert tokens == rank0 >= 4096 * 2
    # By hand for rank 0: what is left after weights, overhead and activations, over its half of a token's KV.
    r0 = plan.ranks[0]
    per_token = 2 * 2 * 8 * 2 * 2  # k and v, 2 of the 4 KV heads of 8 values, 2 layers, bf16
    assert r0.kv_bytes_per_token == per_token
    assert tokens == (gpus[0].memory_bytes - r0.weight_bytes - r0.overhead_bytes - r0.activation_bytes) // per_token


def test_a_rank_that_does_not_fit_is_refused_before_any_process(footprint: Footprint) -> None:
    before = set(multiprocessing.active_children())
    with pytest.raises(PlanError, match=r"rank 0 \(cuda:0\) needs .* short by"):
        rank_kv_tokens(footprint, _gpus(GIB // 2, GIB // 2), context_length=4096, batch_size=1)
    assert set(multiprocessing.active_children()) == before
