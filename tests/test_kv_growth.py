"""The KV cache grows off the decoding thread while streams run (`KVCache.ensure(background=True)`).

Zero-filling the bigger tensors is most of a resize (about 80 ms for 150 MiB on a CPU): done
inside a step, it stalls every running stream. These tests check the background resize keeps
what it must, and that a decode core with streams running never zero-fills on its own thread.
"""

from __future__ import annotations

import threading
import time
import weakref

import pytest
import torch

from nvlm_engine import NVLMEngine
from nvlm_engine.cores import DecodeSettings
from nvlm_engine.generation import PreparedRequest
from nvlm_engine.kv_cache import KVCache, KVCacheGrowing
from nvlm_engine.sampling import make_options


def _cache() -> KVCache:
    kv = KVCache([torch.device("cpu")] * 2, kv_heads=2, head_dim=4, dtype=torch.float32, max_capacity=4096)
    kv.background_bytes = 0  # tiny tensors: in the background all the same
    kv.ensure(2, 100)
    for t in (*kv.keys, *kv.values):
        t[:2, :, :100] = torch.randn(2, 2, 100, 4)
    return kv


def _wait_ready(kv: KVCache, slots: int, capacity: int) -> int:
    """Call `ensure(background=True)` until it stops raising; returns how many times it raised."""
    raised = 0
    deadline = time.monotonic() + 30
    while True:
        try:
            kv.ensure(slots, capacity, background=True)
            return raised
        except KVCacheGrowing:
            raised += 1
            assert time.monotonic() < deadline, "the background resize never finished"
            time.sleep(0.01)


def test_a_background_resize_swaps_in_later_and_keeps_every_slot() -> None:
    kv = _cache()
    before_keys, before = kv.keys, [t[:2, :, :100].clone() for t in (*kv.keys, *kv.values)]
    with pytest.raises(KVCacheGrowing):
        kv.ensure(2, 1000, background=True)
    assert kv.keys is before_keys and kv.capacity == 256  # nothing changed yet: decoding goes on
    _wait_ready(kv, 2, 1000)
    assert kv.capacity == 1024 and kv.keys is not before_keys
    for old, new in zip(before, (*kv.keys, *kv.values)):
        assert torch.equal(new[:2, :, :100], old)
        assert not new[:, :, 100:].any() and not new[2].any()  # the rest is zeros (no NaN garbage)


def test_a_moved_target_drops_the_pending_resize() -> None:
    kv = _cache()
    with pytest.raises(KVCacheGrowing):
        kv.ensure(2, 1000, background=True)
    kv.ensure(2, 3000)  # another need came first: done now, at its own size
    assert kv.capacity == 4096
    kv.ensure(2, 1000, background=True)  # already big enough: no resize, no raise


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> NVLMEngine:
    return NVLMEngine.from_pretrained(tiny_checkpoint, device_map="cpu", dtype="float32", progress=False)


def _request(seed: int, length: int, new_tokens: int) -> PreparedRequest:
    ids = torch.randint(1000, 100_000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    return PreparedRequest(prompt_ids=ids, pixel_values=None, options=make_options(max_new_tokens=new_tokens))


def test_a_long_newcomer_never_resizes_the_cache_on_the_decoding_thread(engine: NVLMEngine, monkeypatch) -> None:
    fresh = NVLMEngine(engine.model, engine.tokenizer, context_length=engine.context_length,
                       decoding=DecodeSettings(chunk_tokens=128))
    core = fresh.new_core()
    running, newcomer = _request(1, 40, 30), _request(2, 700, 4)  # 256 tokens of capacity, then 1024
    zeroed_on: list[str] = []
    zeros = KVCache._zeros

    def recorded(self, *args):
        zeroed_on.append(threading.current_thread().name)
        return zeros(self, *args)

    monkeypatch.setattr(KVCache, "_zeros", recorded)
    core.kv.background_bytes = 0  # the tiny model's cache: in the background all the same
    deltas = core.admit([(0, running)])
    while not core.running:
        deltas += core.step()
    assert core.kv.capacity == 256
    zeroed_on.clear()
    deltas += core.admit([(1, newcomer)])
    row = next(r for r in core.running.values() if r.index == 0)
    while core.busy:
        before = len(row.generated)
        deltas += core.step()
        if row.finish_reason is None:
            assert len(row.generated) == before + 1  # the stream never waited for the resize
    assert core.kv.capacity >= 1024
    assert zeroed_on and set(zeroed_on) == {"nvlm-kv-grow"}, zeroed_on
    results = {d.index: d.result for d in deltas if d.result is not None}
    assert not [d for d in deltas if d.error is not None]
    for index, request in ((0, running), (1, newcomer)):
        solo = NVLMEngine(engine.model, engine.tokenizer, context_length=engine.context_length).run(
            [PreparedRequest(prompt_ids=request.prompt_ids, pixel_values=None, options=request.options)])[0]
        assert results[index].token_ids == solo.token_ids


def test_a_resize_without_room_for_both_goes_layer_by_layer() -> None:
    """Old and new tensors together would pass the budget: no background allocation, and each old
    tensor is freed as its copy is made (the new size plus one layer at most, never old + new)."""
    layers = 4
    kv = KVCache([torch.device("cpu")] * layers, kv_heads=1, head_dim=4, dtype=torch.float32, max_capacity=4096,
                 max_tokens=2 * 1024 + 256)
    kv.background_bytes = 0
    kv.ensure(1, 100)  # 2 x 256 tokens
    old = [weakref.ref(t) for t in (*kv.keys, *kv.values)]
    still_old: list[int] = []
    zeros = kv._zeros

    def counted(*args):
        still_old.append(sum(ref() is not None for ref in old))
        return zeros(*args)

    kv._zeros = counted
    kv.ensure(1, 1000, background=True)  # 2 x 1024 new + 2 x 256 old > 2 x 1024 + 256: done now, not raised
    assert kv.capacity == 1024
    assert still_old == list(range(2 * layers, 0, -1))  # one old tensor less at every new one


def test_a_small_resize_is_made_at_once() -> None:
    kv = KVCache([torch.device("cpu")] * 2, kv_heads=2, head_dim=4, dtype=torch.float32, max_capacity=4096)
    kv.ensure(2, 100)
    kv.ensure(2, 1000, background=True)  # 3 x 1024 x 2 x 2 x 4 x 4 bytes x 2 layers: far below the threshold
    assert kv.capacity == 1024
    kv.background_bytes = kv.nbytes  # now the next doubling is big enough to go to the background
    with pytest.raises(KVCacheGrowing):
        kv.ensure(2, 2000, background=True)
