"""Tensor parallelism (issue 13) on the CPU with gloo: the same tokens as one process, 1/TP of the weights.

A tiny NVLM-D with 8 query heads and 4 KV heads (so TP=2 keeps grouped-query attention and TP=4
leaves one KV head per rank) is loaded once in one process and once over 2 processes
(`tensor_parallel=2`, shared by most tests: workers start slowly); checked:

- greedy tokens identical to one process for text, an image, a batch, streaming, chunked
  prefill and a prefix copied from a running request; logits within fp32 tolerance;
- an image's tiles split across the ranks in contiguous slices (also fewer tiles than ranks,
  and uneven), their tokens gathered in order and equal to one process's within tolerance;
- each rank's resident decoder tensors are exactly 1/TP of the split ones (workers report
  their bytes), the workers hold the whole vision tower and projector besides (the tiles of a
  request are split across ranks: `test_tensor_parallel_vision.py`) and nothing else, and the
  KV cache is sharded by KV head;
- sizes that do not divide the heads and unsupported combinations are refused before any
  process starts; TP=4 once; a clean `close()` leaves no process;
- a worker killed with SIGKILL while a request streams: the request fails with
  `TensorParallelError` within seconds, the engine is shut down, no process is left.
"""

from __future__ import annotations

import inspect
import multiprocessing
import os
import signal
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from PIL import Image
from shared_paths import REAL_72B

from nvlm_engine import NVLMEngine, tp_executor
from nvlm_engine.checkpoint import find_weight_files, read_tensor_infos
from nvlm_engine.cores import DecodeSettings
from nvlm_engine.decoder import decode_step, prefill_chunk
from nvlm_engine.errors import RequestFailedError, TensorParallelError, TensorParallelOptionsError
from nvlm_engine.kv_cache import KVCache
from nvlm_engine.tensor_parallel import LAYER_PREFIX, tensor_bytes, tile_counts
from nvlm_engine.testing import build_tiny_checkpoint, tiny_config
from nvlm_engine.tp_executor import MirroredKVCache
from nvlm_engine.tp_worker import MIRRORED_CACHE_METHODS

ATOL = 1e-4  # fp32 logits: the same sums split over ranks and added in another order


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = REAL_72B if (REAL_72B / "vocab.json").is_file() else None
    config = tiny_config(llm_heads=8, llm_kv_heads=4)  # intermediate 192: divisible by 2 and 4
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-tp"), config=config, tokenizer_from=source)


@pytest.fixture(scope="module")
def one(checkpoint: Path) -> NVLMEngine:
    return NVLMEngine.from_pretrained(checkpoint, device_map="cpu", dtype="float32", progress=False)


@pytest.fixture(scope="module")
def tp2(checkpoint: Path):
    engine = NVLMEngine.from_pretrained(checkpoint, device_map="cpu", dtype="float32", progress=False,
                                        tensor_parallel=2)
    yield engine
    engine.close()


def _noise(seed: int, width: int = 448) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (448, width, 3), generator=g, dtype=torch.uint8).numpy())


def _user(text: str, *images: Image.Image) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                         {"type": "text", "text": text}]}]


TEXT = _user("Hi there, what can you do for me today?")
LONG = _user("Tell me everything about the quick brown fox and the lazy dog, in order, with details; " * 3)


def _same(a, b) -> None:
    assert a.token_ids == b.token_ids
    assert a.text == b.text
    assert len(a.token_ids) > 0


# --- same tokens, same logits ------------------------------------------------------------------


def test_text_greedy_identical(one: NVLMEngine, tp2: NVLMEngine) -> None:
    _same(tp2.generate(TEXT, max_new_tokens=24), one.generate(TEXT, max_new_tokens=24))


def test_image_greedy_identical(one: NVLMEngine, tp2: NVLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2:1 image is 2 tiles and a thumbnail: rank 0 encodes 2, the worker 1, and the tokens do not change."""
    own = _spy_rank0_tiles(monkeypatch)
    conversation = _user("Describe the picture.", _noise(1, width=896))
    _same(tp2.generate(conversation, max_new_tokens=12), one.generate(conversation, max_new_tokens=12))
    assert own == [2]


def _spy_rank0_tiles(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record how many tiles rank 0 encodes itself in each tensor-parallel `encode_images`."""
    own: list[int] = []
    real = tp_executor.encode_tiles

    def spy(towers, config, pixels, chunk_tiles):
        own.append(pixels.shape[0])
        return real(towers, config, pixels, chunk_tiles)

    monkeypatch.setattr(tp_executor, "encode_tiles", spy)
    return own


@pytest.mark.parametrize("tiles", [1, 3, 4])
@torch.inference_mode()
def test_image_tokens_split_across_ranks_equal_one_process(one: NVLMEngine, tp2: NVLMEngine,
                                                           monkeypatch: pytest.MonkeyPatch, tiles: int) -> None:
    """Contiguous slices (1 tile: rank 0 alone; 3: 2 + 1; 4: 2 + 2), gathered in order, as one process encodes."""
    pixels = torch.randn((tiles, 3, 448, 448), generator=torch.Generator().manual_seed(tiles))
    own = _spy_rank0_tiles(monkeypatch)
    ours = tp2.model.encode_images(pixels, chunk_tiles=1)  # chunks smaller than a slice: every rank loops
    reference = one.model.encode_images(pixels)
    assert own == [tile_counts(tiles, 2)[0]] == [(tiles + 1) // 2]
    assert ours.shape == reference.shape == (tiles * 256, one.model.config.llm.hidden_size)
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)


def test_tile_counts() -> None:
    assert [tile_counts(t, 2) for t in (1, 2, 3, 7)] == [[1, 0], [1, 1], [2, 1], [4, 3]]
    assert tile_counts(6, 4) == [2, 2, 1, 1] and tile_counts(2, 4) == [1, 1, 0, 0]


def test_batch_greedy_identical(one: NVLMEngine, tp2: NVLMEngine) -> None:
    batch = [TEXT, _user("Compare them.", _noise(2), _noise(3)), LONG, _user("Why is the sky blue?")]
    for ours, reference in zip(tp2.generate_batch(batch, max_new_tokens=10), one.generate_batch(batch, max_new_tokens=10)):
        _same(ours, reference)


def test_streaming_identical(one: NVLMEngine, tp2: NVLMEngine) -> None:
    stream = tp2.stream(LONG, max_new_tokens=20)
    pieces = list(stream)
    reference = one.generate(LONG, max_new_tokens=20)
    assert len(pieces) > 1
    assert "".join(pieces).strip() == reference.text
    _same(stream.result, reference)


def _engine(base: NVLMEngine, **settings) -> NVLMEngine:
    return NVLMEngine(base.model, base.tokenizer, context_length=base.context_length,
                      decoding=DecodeSettings(**settings))


def test_chunked_prefill_and_copied_prefix_identical(one: NVLMEngine, tp2: NVLMEngine, monkeypatch) -> None:
    """Small prefill chunks (masks from start > 0) and a prefix copied from a running slot (mirrored)."""
    copies: list[int] = []
    copy = MirroredKVCache.copy_prefix

    def counted(self, *args, **kwargs):
        copies.append(args[2])
        return copy(self, *args, **kwargs)

    monkeypatch.setattr(MirroredKVCache, "copy_prefix", counted)
    results = []
    for base in (tp2, one):
        engine = _engine(base, chunk_tokens=16)
        first = engine.prepare(_user("The same long start. " * 8 + "Answer in French."), max_new_tokens=8)
        second = engine.prepare(_user("The same long start. " * 8 + "Answer in German, please."), max_new_tokens=8)
        core = engine.new_core()
        done = {d.index: d.result for d in core.admit([(0, first)]) if d.result}
        while not core.running:
            done.update({d.index: d.result for d in core.step() if d.result})
        done.update({d.index: d.result for d in core.admit([(1, second)]) if d.result})
        while core.busy:
            done.update({d.index: d.result for d in core.step() if d.result})
        results.append(done)
    assert copies and copies[0] > 16  # the TP core copied the shared prefix, on every rank
    for index in (0, 1):
        _same(results[0][index], results[1][index])


@torch.inference_mode()
def test_logits_within_tolerance(one: NVLMEngine, tp2: NVLMEngine) -> None:
    ids = torch.tensor([tp2.prepare(LONG, max_new_tokens=1).prompt_ids])
    logits = []
    for engine in (tp2, one):
        kv = engine.new_core().kv
        kv.ensure(2, ids.shape[1] + 8)
        embeds = engine.model.embed(ids, None, engine.token_ids.image)
        first = prefill_chunk(engine.model, kv, 0, embeds[:, :20], 0)
        rest = prefill_chunk(engine.model, kv, 0, embeds[:, 20:], 20)
        step = decode_step(engine.model, kv, torch.tensor([int(rest.argmax()), 0]),
                           torch.tensor([ids.shape[1], 0]), torch.tensor([0, kv.scratch]), ids.shape[1] + 1)
        logits.append((first, rest, step[:1]))
    for ours, reference in zip(*logits):
        assert ours.shape == reference.shape
        torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_compiled_decode_under_tensor_parallelism(one: NVLMEngine, checkpoint: Path) -> None:
    """`DecodeSettings(compile=True)` with TP=2: rank 0's layers and the worker's run compiled
    (fullgraph: the all-reduce is traced, not a graph break), one graph each for a whole growing
    answer, and the tokens are one process's eager tokens."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    engine = NVLMEngine.from_pretrained(checkpoint, device_map="cpu", dtype="float32", progress=False,
                                        tensor_parallel=2, decoding=DecodeSettings(compile=True, prefix_caching=False))
    no_recompile = ExitStack()
    try:
        core = engine.new_core()
        assert core._step is not None
        windows: list[int] = []
        compiled = core._step

        def counted(*args):
            windows.append(args[-1])
            return compiled(*args)

        core._step = counted
        new_tokens = 48
        request = engine.prepare(LONG, max_new_tokens=new_tokens)
        assert len(request.prompt_ids) + new_tokens <= 256  # one window bucket for the whole answer
        tokens: list[int] = []
        deltas = core.admit([(0, request)])
        graphs = None
        while not any(d.result is not None for d in deltas):
            deltas = core.step()
            if len(windows) == 2 and graphs is None:  # compiled once, on every rank: no recompile from here on
                graphs = counters["stats"]["unique_graphs"], engine.model.tp_link.worker_stats()[0]["compiled"]["graphs"]
                no_recompile.enter_context(torch._dynamo.config.patch(error_on_recompile=True))
        result = next(d.result for d in deltas if d.result is not None)
        tokens = result.token_ids
        assert tokens == one.generate(LONG, max_new_tokens=new_tokens).token_ids and len(tokens) == new_tokens
        assert len(windows) == new_tokens - 1 and set(windows) == {256}  # every decode step went compiled
        assert not counters["graph_break"]
        worker = engine.model.tp_link.worker_stats()[0]["compiled"]
        assert worker["steps"] == len(windows) and worker["graph_breaks"] == 0
        assert graphs is not None and graphs[0] >= 1 and graphs[1] >= 1
        assert (counters["stats"]["unique_graphs"], worker["graphs"]) == graphs  # nothing compiled since
    finally:
        no_recompile.close()
        engine.close()


# --- what each rank holds ----------------------------------------------------------------------


def test_each_rank_holds_its_share(checkpoint: Path, tp2: NVLMEngine) -> None:
    infos = read_tensor_infos(find_weight_files(checkpoint))
    full = {n: i for n, i in infos.items() if n.startswith(LAYER_PREFIX)}
    numel = {n: int(torch.Size(i.shape).numel()) for n, i in full.items()}
    (worker,) = tp2.model.tp_link.worker_stats()
    ours = tensor_bytes(tp2.model)
    replicated = ("input_layernorm.weight", "post_attention_layernorm.weight")  # the rest is split in two
    assert sum(name.endswith(replicated) for name in numel) == 2 * 2  # 2 layers
    for rank, held in (("worker", worker["weights"]), ("rank 0", ours)):
        for name, count in numel.items():
            expected = count * 4 if name.endswith(replicated) else count * 4 // 2  # fp32
            assert held[name] == expected, (rank, name)
    # The worker holds the decoder layers' shares, the rotary table, and the vision tower and projector
    # whole, exactly as rank 0 holds them (after the same dummy-head trim): no embeddings, final norm or head.
    vision = {n: b for n, b in ours.items() if n.startswith(("vision_model.", "mlp1."))}
    assert vision and {n: b for n, b in worker["weights"].items() if n.startswith(("vision_model.", "mlp1."))} == vision
    assert {n for n in worker["weights"] if not n.startswith(LAYER_PREFIX) and n not in vision} <= {
        "language_model.model.rotary_emb.inv_freq", "language_model.model.rotary_emb.original_inv_freq"}
    split = sum(count * 4 for name, count in numel.items() if not name.endswith(replicated))
    assert sum(b for n, b in worker["weights"].items() if n in numel and not n.endswith(replicated)) == split // 2
    # KV sharded by KV head: 4 KV heads, 2 on each rank, in every cache of every core.
    core = tp2.new_core()
    core.kv.ensure(1, 16)
    (worker,) = tp2.model.tp_link.worker_stats()
    assert core.kv.kv_heads == 2
    assert set(worker["kv_heads"].values()) == {2}
    assert worker["kv"][core.kv.core_id] == core.kv.nbytes


def test_every_cache_change_is_mirrored() -> None:
    """A `KVCache` method that changes the tensors must reach the workers: new ones must be listed."""
    read_only = {"fits"}
    public = {n for n, f in inspect.getmembers(KVCache, inspect.isfunction) if not n.startswith("_")}
    assert public - read_only == set(MIRRORED_CACHE_METHODS)
    for name in MIRRORED_CACHE_METHODS:
        assert name in MirroredKVCache.__dict__


# --- refused before any process starts ---------------------------------------------------------


@pytest.mark.parametrize("size", [3, 8, 0])
def test_sizes_that_do_not_divide_are_refused(checkpoint: Path, size: int) -> None:
    before = set(multiprocessing.active_children())
    with pytest.raises(TensorParallelOptionsError, match="tensor_parallel"):
        NVLMEngine.from_pretrained(checkpoint, device_map="cpu", dtype="float32", progress=False, tensor_parallel=size)
    assert set(multiprocessing.active_children()) == before


@pytest.mark.parametrize("options", [{"device_map": {"": "cpu"}}, {"device_map": "card"}, {"vision_replicas": True},
                                     {"max_memory": {"cpu": "8GiB"}}, {"max_memory": {0: "8GiB"}}])
def test_unsupported_combinations_are_refused(checkpoint: Path, options: dict) -> None:
    before = set(multiprocessing.active_children())
    with pytest.raises(TensorParallelOptionsError, match="tensor_parallel"):
        NVLMEngine.from_pretrained(checkpoint, **{"device_map": "cpu", "dtype": "float32", "progress": False,
                                                  "tensor_parallel": 2, **options})
    assert set(multiprocessing.active_children()) == before


# --- TP=4, clean close, a killed worker --------------------------------------------------------


def _alive(pid: int) -> bool:
    """Whether `pid` still exists as a process that is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_tp4_identical_and_clean_close(one: NVLMEngine, checkpoint: Path) -> None:
    engine = NVLMEngine.from_pretrained(checkpoint, device_map="cpu", dtype="float32", progress=False,
                                        tensor_parallel=4)
    link = engine.model.tp_link
    pids = link.worker_pids
    try:
        _same(engine.generate(TEXT, max_new_tokens=8), one.generate(TEXT, max_new_tokens=8))
    finally:
        engine.close()
    assert link.exitcodes == [0, 0, 0]  # stopped by command, not killed
    assert not any(_alive(pid) for pid in pids)
    assert not {p.pid for p in multiprocessing.active_children()} & set(pids)
    with pytest.raises(TensorParallelError, match="closed"):
        engine.generate(TEXT, max_new_tokens=2)


def test_killed_worker_fails_the_request_and_shuts_down(checkpoint: Path) -> None:
    engine = NVLMEngine.from_pretrained(checkpoint, device_map="cpu", dtype="float32", progress=False,
                                        tensor_parallel=2)
    link = engine.model.tp_link
    (pid,) = link.worker_pids
    stream = engine.stream(LONG, max_new_tokens=2000, stop_token_ids=[])
    next(stream)  # prefill done, decoding
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises((TensorParallelError, RequestFailedError)) as caught:
        for _ in stream:
            pass
    elapsed = time.monotonic() - killed
    error = caught.value if isinstance(caught.value, TensorParallelError) else caught.value.__cause__
    assert isinstance(error, TensorParallelError)
    assert "worker rank 1 exited (code -9)" in str(error) and "recreate" in str(error)
    assert elapsed < 10
    assert link.closed
    started = time.monotonic()
    with pytest.raises(TensorParallelError, match="rank 1 exited"):
        engine.generate(TEXT, max_new_tokens=2)
    assert time.monotonic() - started < 2
    assert not _alive(pid)
    assert pid not in {p.pid for p in multiprocessing.active_children()}
