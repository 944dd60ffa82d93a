"""The prefix-cache index (content keys, longest-prefix lookup, idle LRU) and the image-embedding cache."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from nvlm_engine.image_cache import ImageCacheStats, ImageEmbeddingCache, image_key
from nvlm_engine.prefix_cache import PrefixCacheStats, PrefixIndex, PrefixMatch, content_keys

PAD = 151655  # any id stands for <|vision_pad|> here
TAG = 9000  # a tile tag between pads
TPT = 4  # tokens per tile, small so prompts stay readable


def _pixels(seed: int, tiles: int = 2) -> torch.Tensor:
    return torch.randn(tiles, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _keys(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


# -- content keys ---------------------------------------------------------------------------------


def test_content_keys_tell_two_images_apart_with_identical_token_ids() -> None:
    ids = [1, 2] + [PAD] * TPT + [3]
    a = content_keys(ids, PAD, [image_key(_pixels(1, 1))], [1], TPT)
    b = content_keys(ids, PAD, [image_key(_pixels(2, 1))], [1], TPT)
    again = content_keys(ids, PAD, [image_key(_pixels(1, 1))], [1], TPT)
    assert a.dtype == np.int64 and a.shape == (len(ids),)
    assert a[:2].tolist() == [1, 2] and a[-1] == 3  # text keeps its ids
    assert not np.array_equal(a[2:6], b[2:6])
    np.testing.assert_array_equal(a, again)
    assert (a[2:6] < 0).all()  # never a token id


def test_content_keys_follow_pads_split_by_tile_tags_in_prompt_order() -> None:
    # image 0: 2 tiles (pads split by a tile tag); text; image 1: 1 tile
    ids = [7] + [PAD] * TPT + [TAG] + [PAD] * TPT + [8, 9] + [PAD] * TPT + [10]
    keys = content_keys(ids, PAD, [5, 11], [2, 1], TPT)
    expected = [7] + [-6] * TPT + [TAG] + [-6] * TPT + [8, 9] + [-12] * TPT + [10]
    assert keys.tolist() == expected


def test_content_keys_count_mismatch_raises() -> None:
    ids = [1] + [PAD] * TPT + [2]
    with pytest.raises(ValueError, match="pad"):
        content_keys(ids, PAD, [5], [2], TPT)  # needs 2 tiles of pads, has 1
    with pytest.raises(ValueError, match="pad"):
        content_keys(ids, PAD, [], [], TPT)  # pads but no image
    with pytest.raises(ValueError):
        content_keys(ids, PAD, [5, 6], [1], TPT)  # lists of different lengths
    assert content_keys([1, 2, 3], PAD, [], [], TPT).tolist() == [1, 2, 3]


# -- lookup ---------------------------------------------------------------------------------------


def test_lookup_finds_the_longest_prefix_among_several_slots() -> None:
    index = PrefixIndex()
    index.running(0, _keys(1, 2, 9, 9))
    index.running(1, _keys(1, 2, 3, 4, 8))
    index.running(2, _keys(1, 2, 3))
    index.running(3, _keys(5, 6, 7, 8, 9, 10))
    assert index.lookup(_keys(1, 2, 3, 4, 5, 6)) == PrefixMatch(slot=1, length=4, idle=False)
    assert index.lookup(_keys(5, 6, 0)) == PrefixMatch(slot=3, length=2, idle=False)
    assert index.lookup(_keys(42, 1, 2)) is None


def test_lookup_over_long_sequences_finds_a_mismatch_past_the_first_chunks() -> None:
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 150_000, size=20_000)
    index = PrefixIndex()
    for slot, cut in enumerate([700, 5_000, 13_001]):
        stored = prompt.copy()
        stored[cut] = -1
        index.running(slot, stored)
    assert index.lookup(prompt) == PrefixMatch(slot=2, length=13_001, idle=False)


def test_lookup_caps_the_length_at_max_length() -> None:
    index = PrefixIndex()
    index.running(0, _keys(1, 2, 3, 4))
    index.finish(0)
    query = _keys(1, 2, 3, 4)
    assert index.lookup(query, max_length=len(query) - 1) == PrefixMatch(slot=0, length=3, idle=True)
    assert index.lookup(query).length == 4
    assert index.lookup(query, max_length=0) is None


def test_lookup_below_min_match_is_none() -> None:
    index = PrefixIndex(min_match=3)
    index.running(0, _keys(1, 2, 9))
    assert index.lookup(_keys(1, 2, 3, 4)) is None
    index.running(1, _keys(1, 2, 3, 9))
    assert index.lookup(_keys(1, 2, 3, 4)) == PrefixMatch(slot=1, length=3, idle=False)
    with pytest.raises(ValueError):
        PrefixIndex(min_match=0)


def test_lookup_prefers_an_idle_slot_on_equal_length() -> None:
    index = PrefixIndex()
    index.running(0, _keys(1, 2, 3, 7))
    index.running(1, _keys(1, 2, 3, 8))
    index.running(2, _keys(1, 2, 3, 9))
    index.finish(1)
    assert index.lookup(_keys(1, 2, 3, 4)) == PrefixMatch(slot=1, length=3, idle=True)
    # a longer running match still beats a shorter idle one
    index.running(3, _keys(1, 2, 3, 4, 5))
    assert index.lookup(_keys(1, 2, 3, 4, 6)) == PrefixMatch(slot=3, length=4, idle=False)


def test_a_running_slot_matches_with_idle_false() -> None:
    index = PrefixIndex()
    index.running(4, _keys(1, 2, 3))
    assert index.lookup(_keys(1, 2, 3, 4)) == PrefixMatch(slot=4, length=3, idle=False)


def test_extend_and_truncate_change_what_matches() -> None:
    index = PrefixIndex()
    index.running(0, _keys(1, 2, 3))
    index.extend(0, [4, 5])
    assert index.lookup(_keys(1, 2, 3, 4, 5, 6)).length == 5
    index.extend(0, np.arange(100, 3000))  # grows past the initial buffer
    assert index.lookup(np.concatenate([_keys(1, 2, 3, 4, 5), np.arange(100, 3000)])).length == 2905
    index.truncate(0, 2)
    assert index.lookup(_keys(1, 2, 3, 4, 5, 6)).length == 2
    index.truncate(0, 10)  # never grows
    assert index.lookup(_keys(1, 2, 3, 4, 5, 6)).length == 2
    index.extend(0, [7])  # after a truncation, new positions follow the kept prefix
    assert index.lookup(_keys(1, 2, 7, 8)).length == 3
    with pytest.raises(KeyError):
        index.extend(9, [1])
    with pytest.raises(KeyError):
        index.truncate(9, 0)


def test_finish_makes_idle_and_evict_takes_the_least_recently_used() -> None:
    index = PrefixIndex()
    for slot in (0, 1, 2):
        index.running(slot, _keys(slot + 1, 0))
    index.finish(1)
    index.finish(0)
    index.finish(2)
    assert index.idle_slots() == [1, 0, 2]
    index.running(0, _keys(9))  # reused for a new request: no longer idle
    index.finish(0)  # ... and finished again: most recent
    assert index.idle_slots() == [1, 2, 0]
    index.finish(1)  # finishing an idle slot again makes it the most recent
    assert index.idle_slots() == [2, 0, 1]
    assert index.evict() == 2
    assert index.lookup(_keys(3, 0)) is None  # evicted content is forgotten
    assert index.evict() == 0
    assert index.evict() == 1
    assert index.evict() is None
    assert index.stats().evictions == 3


def test_take_removes_an_idle_slot_from_the_lru() -> None:
    index = PrefixIndex()
    index.running(0, _keys(1, 2, 3))
    index.running(1, _keys(4, 5, 6))
    index.finish(0)
    index.finish(1)
    index.take(0)
    assert index.idle_slots() == [1]
    assert index.evict() == 1
    assert index.evict() is None  # a taken slot is never evicted under its new request
    assert index.lookup(_keys(1, 2, 3)) == PrefixMatch(slot=0, length=3, idle=False)
    with pytest.raises(KeyError):
        index.take(0)  # no longer idle


def test_forget_drops_content_and_idle_membership() -> None:
    index = PrefixIndex()
    index.running(0, _keys(1, 2, 3))
    index.finish(0)
    index.forget(0)
    assert index.idle_slots() == [] and index.lookup(_keys(1, 2, 3)) is None
    index.forget(0)  # idempotent
    index.finish(0)  # a forgotten slot does not come back as idle
    assert index.idle_slots() == []


def test_a_disabled_index_never_matches() -> None:
    index = PrefixIndex(enabled=False)
    index.running(0, _keys(1, 2, 3))
    index.extend(0, [4])
    index.finish(0)
    assert index.lookup(_keys(1, 2, 3, 4)) is None
    assert index.idle_slots() == [] and index.evict() is None
    assert index.stats() == PrefixCacheStats(queries=0, hits=0, hit_tokens=0, query_tokens=0, evictions=0,
                                             idle_slots=0)


def test_stats_count_queries_hits_and_tokens() -> None:
    index = PrefixIndex()
    index.running(0, _keys(1, 2, 3, 4))
    index.finish(0)
    index.lookup(_keys(1, 2, 3, 4, 5), max_length=4)  # hit, 4 tokens
    index.lookup(_keys(1, 2, 9))  # hit, 2 tokens
    index.lookup(_keys(7, 8))  # miss
    assert index.stats() == PrefixCacheStats(queries=3, hits=2, hit_tokens=6, query_tokens=10, evictions=0,
                                             idle_slots=1)


def test_lookup_is_fast_for_64_slots_of_32k_tokens() -> None:
    rng = np.random.default_rng(1)
    shared = rng.integers(0, 150_000, size=32_768)
    index = PrefixIndex()
    for slot in range(64):
        keys = shared.copy()
        keys[-1 - slot] = -5  # every slot shares almost all of it: the worst case
        index.running(slot, keys)
    index.lookup(shared)  # warm
    started = time.perf_counter()
    match = index.lookup(shared, max_length=len(shared) - 1)
    elapsed = time.perf_counter() - started
    assert match == PrefixMatch(slot=0, length=len(shared) - 1, idle=False)  # slot 0 differs only at the end
    assert elapsed < 0.25, f"lookup took {elapsed * 1000:.1f} ms"  # ~2 ms expected; generous for shared CPUs


# -- image-embedding cache ------------------------------------------------------------------------


def _embedding(rows: int, fill: float = 0.0) -> torch.Tensor:
    return torch.full((rows, 4), fill, dtype=torch.float32)  # 16 bytes per row


def test_image_cache_evicts_the_least_recently_used_by_bytes() -> None:
    cache = ImageEmbeddingCache(max_bytes=3 * 160)
    for key in (1, 2, 3):
        cache.put(key, _embedding(10, key))  # 160 bytes each: exactly full
    assert cache.stats() == ImageCacheStats(hits=0, misses=0, evictions=0, entries=3, bytes=480)
    assert cache.get(1) is not None  # 1 is now the most recent; 2 the least
    cache.put(4, _embedding(10, 4))
    assert cache.get(2) is None
    assert cache.get(1) is not None and cache.get(3) is not None and cache.get(4) is not None
    cache.put(5, _embedding(20, 5))  # 320 bytes: two entries go (the LRU ones: 1 then 3)
    assert cache.get(1) is None and cache.get(3) is None
    assert torch.equal(cache.get(5), _embedding(20, 5))
    stats = cache.stats()
    assert stats.evictions == 3 and stats.entries == 2 and stats.bytes == 480


def test_image_cache_does_not_store_an_entry_larger_than_its_budget() -> None:
    cache = ImageEmbeddingCache(max_bytes=200)
    cache.put(1, _embedding(10))
    cache.put(2, _embedding(13))  # 208 bytes
    assert cache.get(2) is None
    assert cache.get(1) is not None  # and it evicted nothing
    assert cache.stats().evictions == 0 and cache.stats().bytes == 160


def test_image_cache_counts_hits_and_misses_and_replaces_a_key() -> None:
    cache = ImageEmbeddingCache(max_bytes=10_000)
    assert cache.get(7) is None
    cache.put(7, _embedding(2, 1.0))
    assert torch.equal(cache.get(7), _embedding(2, 1.0))
    cache.get(7)
    cache.get(8)
    cache.put(7, _embedding(3, 2.0))  # same key again: replaced, bytes not counted twice
    assert cache.stats() == ImageCacheStats(hits=2, misses=2, evictions=0, entries=1, bytes=48)
    cache.clear()
    assert cache.get(7) is None and cache.stats().entries == 0 and cache.stats().bytes == 0


def test_image_cache_is_disabled_at_zero_bytes() -> None:
    cache = ImageEmbeddingCache(max_bytes=0)
    cache.put(1, _embedding(1))
    assert cache.get(1) is None
    assert cache.stats() == ImageCacheStats(hits=0, misses=0, evictions=0, entries=0, bytes=0)
    with pytest.raises(ValueError):
        ImageEmbeddingCache(max_bytes=-1)


def test_image_key_changes_with_one_pixel_and_is_stable() -> None:
    pixels = _pixels(3)
    key = image_key(pixels)
    assert 0 <= key < 2**62
    assert image_key(pixels) == key == image_key(pixels.clone())
    changed = pixels.clone()
    changed[1, 2, 7, 7] += 1e-3
    assert image_key(changed) != key
    assert image_key(pixels.to(torch.bfloat16)) != key  # dtype is part of the key
    assert image_key(pixels.reshape(1, 6, 8, 8)) != key  # and so is the shape
    strided = torch.cat([pixels, pixels], dim=3)[..., ::2]  # non-contiguous
    assert image_key(strided) == image_key(strided.contiguous())
    assert image_key(pixels.to(torch.bfloat16)) == image_key(pixels.to(torch.bfloat16))


def test_move_keeps_content_and_lru_position() -> None:
    index = PrefixIndex()
    for slot in (0, 1):
        index.running(slot, np.arange(10, dtype=np.int64) + 100 * slot)
        index.finish(slot)
    index.move(0, 5)
    assert index.idle_slots() == [5, 1]
    assert index.lookup(np.arange(10, dtype=np.int64), max_length=9) == PrefixMatch(slot=5, length=9, idle=True)
    with pytest.raises(KeyError):
        index.move(2, 6)  # not idle
