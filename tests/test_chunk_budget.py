"""The prefill budget follows measured speeds: a line fitted to step time vs tokens per step.

Each test drives `ChunkBudget` with a machine whose step time is a known line in the tokens a
step processes, and checks the budget a step with running rows gets against that line.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

from nvlm_engine.chunk_budget import ALLOWANCE, MIN_CHUNK, ChunkBudget


def _machine(fixed: float, per_token: float) -> Callable[[int], float]:
    return lambda tokens: fixed + per_token * tokens


def _run(budget: ChunkBudget, cost: Callable[[int], float], rows: list[int], prompt: int = 10_000) -> list[int]:
    """Steps with `rows[i]` decoding rows while one long prompt prefills; the budgets given."""
    given = []
    for r in rows:
        chunk = min(budget.tokens(rows=r), prompt)
        prompt -= chunk
        budget.record(cost(r + chunk), tokens=r + chunk)
        given.append(chunk)
    return given


def _power_below(tokens: float) -> int:
    power = MIN_CHUNK
    while power * 2 <= tokens:
        power *= 2
    return power


def test_full_chunk_when_nothing_decodes_and_min_chunk_until_measured() -> None:
    budget = ChunkBudget(512)
    assert budget.tokens(rows=0) == 512  # nobody waits
    assert budget.tokens(rows=3) == MIN_CHUNK  # nothing measured: a small probe


def test_the_line_is_fitted_from_steps_of_different_sizes() -> None:
    budget = ChunkBudget(512)
    cost = _machine(0.02, 0.0004)
    for tokens in (1, 96, 3, 16, 40, 7):
        budget.record(cost(tokens), tokens=tokens)
    fixed, per_token = budget.line()
    assert abs(fixed - 0.02) < 1e-9 and abs(per_token - 0.0004) < 1e-12


def test_steps_of_one_size_leave_the_line_unknown() -> None:
    budget = ChunkBudget(512)
    for _ in range(5):
        budget.record(0.03, tokens=23)
    assert budget.line() is None


def test_slow_prefill_keeps_the_smallest_chunk() -> None:  # a CPU: a token costs a tenth of a step
    budget = ChunkBudget(512)
    budget.record(0.25, tokens=100)  # a prompt prefilled alone
    assert _run(budget, _machine(0.02, 0.002), [4] * 20)[-1] == MIN_CHUNK


def test_the_budget_matches_the_line_when_the_batch_grows() -> None:
    """Decode-only steps measured at one row must not price the prefill of a step with forty."""
    cost = _machine(0.01, 0.0002)
    budget = ChunkBudget(512)
    budget.record(cost(96), tokens=96)  # the first request's prompt, alone
    rows = [1] * 3 + [r for r in range(1, 41, 3) for _ in range(3)] + [40] * 20
    given = _run(budget, cost, rows)
    expected = _power_below(ALLOWANCE * cost(40) / 0.0002)
    assert expected > _power_below(ALLOWANCE * cost(1) / 0.0002)  # the batch's size matters here
    assert given[-1] == expected, (given, expected)
    assert cost(40 + given[-1]) <= (1 + ALLOWANCE) * cost(40)


def test_fast_prefill_grows_to_the_configured_chunk_by_doubling() -> None:  # a GPU: weights dominate
    budget = ChunkBudget(512)
    cost = _machine(0.03, 0.00001)
    budget.record(cost(1900), tokens=1900)
    given = _run(budget, cost, [1] * 8)
    assert given[-1] == 512
    assert all(b <= 2 * a for a, b in pairwise(given))  # never more than doubling


def test_steps_that_measure_no_slower_with_more_tokens_get_the_full_chunk() -> None:
    budget = ChunkBudget(256)
    for tokens in (1, 64, 2, 128):
        budget.record(0.03, tokens=tokens)
    given = _run(budget, lambda n: 0.03, [2] * 6)
    assert given[-1] == 256


def test_a_long_prefill_at_one_batch_size_still_finds_the_line() -> None:
    """Steps of one size leave the slope unknown; the budget must not stay stuck at its first guess."""
    cost = _machine(0.02, 0.0002)
    budget = ChunkBudget(512)
    given = _run(budget, cost, [7] * 60)
    assert given[0] != given[1]  # while the line is unknown, steps of two sizes
    expected = _power_below(ALLOWANCE * cost(7) / 0.0002)
    assert expected > 2 * MIN_CHUNK
    assert given[-1] == expected, given
