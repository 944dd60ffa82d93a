"""The prefill budget follows measured speeds: chunks shrink where prefill is slow relative to decode."""

from __future__ import annotations

from nvlm_engine.chunk_budget import MIN_CHUNK, ChunkBudget


def test_full_chunk_until_measured_and_when_nothing_decodes() -> None:
    budget = ChunkBudget(512)
    assert budget.tokens(decoding=True) == 512  # nothing measured yet
    budget.record(0.05, prefilled=0, decoded=True)
    budget.record(1.05, prefilled=512, decoded=True)  # 512 tokens cost 1 s on top of a 50 ms step
    assert budget.tokens(decoding=False) == 512  # nobody waits


def test_slow_prefill_gets_small_power_of_two_chunks() -> None:
    budget = ChunkBudget(512)
    budget.record(0.05, prefilled=0, decoded=True)
    budget.record(1.05, prefilled=512, decoded=True)  # ~2 ms per token: a 50 ms step holds ~25 tokens
    assert budget.tokens(decoding=True) == MIN_CHUNK


def test_fast_prefill_keeps_the_configured_chunk() -> None:
    budget = ChunkBudget(512)
    budget.record(0.03, prefilled=0, decoded=True)
    budget.record(0.045, prefilled=512, decoded=True)  # a GPU: 512 tokens cost half a decode step
    assert budget.tokens(decoding=True) == 512


def test_middle_speeds_round_down_to_a_power_of_two() -> None:
    budget = ChunkBudget(512)
    budget.record(0.1, prefilled=0, decoded=True)
    budget.record(0.1 + 0.001 * 200, prefilled=200, decoded=True)  # 1 ms per token: 100 tokens fit
    assert budget.tokens(decoding=True) == 64
