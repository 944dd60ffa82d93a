"""OpenAI's `logprobs`/`top_logprobs` and `presence_penalty`/`frequency_penalty` in the engine.

Logprobs are checked against `log_softmax` of logits computed independently, step by step, with
the model's own prefill and cached decode; penalties against the formula on a logits tensor and
against a greedy decode that applies the formula by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from nvlm_engine import GenerationOptionsError, NVLMEngine
from nvlm_engine.generation import PreparedRequest, TokenLogprob
from nvlm_engine.reference_decode import decode_one, prefill
from nvlm_engine.sampling import SamplingOptions, apply_presence_frequency_penalty, make_options

HI = [{"role": "user", "content": "Hi"}]
STORY = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper and the sea."}]
REPEAT = [{"role": "user", "content": "a a a a a a a a a a a a"}]
OTHER = [{"role": "user", "content": "What is two plus two?"}]


@torch.inference_mode()
def _reference_logits(engine: NVLMEngine, requests: list[PreparedRequest], tokens: list[list[int]]) -> list[list[torch.Tensor]]:
    """The raw next-token logits [V] of every row at every step, feeding the given tokens."""
    logits, step, valid = prefill(engine.model, requests, engine.token_ids)
    steps = [[logits[r].float()] for r in range(len(requests))]
    for position in range(len(tokens[0]) - 1):
        fed = torch.tensor([row[position] for row in tokens], device=valid.device)
        logits, valid = decode_one(engine.model, fed, step, valid)
        for r in range(len(requests)):
            steps[r].append(logits[r].float())
    return steps


def _assert_logprobs_match(entries: list[TokenLogprob], token_ids: list[int], logits: list[torch.Tensor], k: int) -> None:
    assert [e.token_id for e in entries] == token_ids
    for entry, raw in zip(entries, logits):
        expected = torch.log_softmax(raw, dim=-1)
        assert entry.logprob == pytest.approx(float(expected[entry.token_id]), abs=1e-5)
        assert len(entry.top) == k
        values, ids = torch.topk(expected, k)
        assert [t for t, _ in entry.top] == ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-5)


def test_greedy_logprobs_equal_log_softmax_of_the_logits(tiny_engine: NVLMEngine) -> None:
    request = tiny_engine.prepare(STORY, max_new_tokens=8, logprobs=True, top_logprobs=5)
    (result,) = tiny_engine.run([request])
    assert result.finish_reason == "length" and len(result.logprobs) == 8
    (logits,) = _reference_logits(tiny_engine, [request], [result.token_ids])
    _assert_logprobs_match(result.logprobs, result.token_ids, logits, 5)
    for entry in result.logprobs:  # greedy: the chosen token is the top-1, tops descend
        assert entry.top[0] == (entry.token_id, entry.logprob)
        assert [v for _, v in entry.top] == sorted((v for _, v in entry.top), reverse=True)


def test_logprobs_in_a_batch_with_rows_that_do_not_ask(tiny_engine: NVLMEngine) -> None:
    requests = [
        tiny_engine.prepare(OTHER, max_new_tokens=6),
        tiny_engine.prepare(STORY, max_new_tokens=6, logprobs=True, top_logprobs=3),
        tiny_engine.prepare(HI, max_new_tokens=6, temperature=0.8, seed=1, frequency_penalty=1.0),
        tiny_engine.prepare(HI, max_new_tokens=6, logprobs=True),
    ]
    results = tiny_engine.run(requests)
    assert all(r.finish_reason == "length" for r in results)
    assert results[0].logprobs is None and results[2].logprobs is None
    logits = _reference_logits(tiny_engine, requests, [r.token_ids for r in results])
    _assert_logprobs_match(results[1].logprobs, results[1].token_ids, logits[1], 3)
    _assert_logprobs_match(results[3].logprobs, results[3].token_ids, logits[3], 0)
    # Alone, the row records the same (padding in the batch moves logits by ~1e-6 at most).
    alone = tiny_engine.generate(STORY, max_new_tokens=6, logprobs=True, top_logprobs=3).logprobs
    assert [e.token_id for e in alone] == results[1].token_ids
    assert [e.logprob for e in alone] == pytest.approx([e.logprob for e in results[1].logprobs], abs=1e-4)


def test_deltas_logprobs_concatenate_to_the_result(tiny_engine: NVLMEngine) -> None:
    requests = [tiny_engine.prepare(STORY, max_new_tokens=10, logprobs=True, top_logprobs=2),
                tiny_engine.prepare(HI, max_new_tokens=4, logprobs=True)]
    collected: dict[int, list[TokenLogprob]] = {0: [], 1: []}
    results = {}
    for delta in tiny_engine.stream_batch(requests):
        collected[delta.index] += delta.logprobs
        if delta.result is not None:
            results[delta.index] = delta.result
    for index, result in results.items():
        assert collected[index] == result.logprobs
        assert len(result.logprobs) == len(result.token_ids) == result.usage.completion_tokens


def test_scheduler_carries_logprobs(tiny_engine: NVLMEngine) -> None:
    from nvlm_engine.scheduler import Scheduler

    scheduler = Scheduler(tiny_engine)
    try:
        handle = scheduler.submit(tiny_engine.prepare(STORY, max_new_tokens=6, logprobs=True))
        got = [e for delta in handle.deltas() for e in delta.logprobs]
    finally:
        scheduler.close()
    assert got == handle.result.logprobs and len(got) == 6


def test_presence_and_frequency_penalty_follow_openais_formula() -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    generated = [3, 3, 3, 7, 9, 9]
    counts = torch.zeros(50)
    for token in generated:
        counts[token] += 1
    got = apply_presence_frequency_penalty(logits, counts, 0.5, 1.5)
    expected = logits.clone()
    for token in set(generated):
        expected[token] -= 0.5 + 1.5 * generated.count(token)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert apply_presence_frequency_penalty(logits, counts, 0.0, 0.0) is logits


def test_a_large_frequency_penalty_breaks_repetition(tiny_engine: NVLMEngine) -> None:
    plain = tiny_engine.generate(REPEAT, max_new_tokens=32)
    assert len(set(plain.token_ids)) < len(plain.token_ids)  # the tiny model repeats itself here
    penalized = tiny_engine.generate(REPEAT, max_new_tokens=32, frequency_penalty=2.0)
    assert penalized.token_ids != plain.token_ids
    assert len(set(penalized.token_ids)) > len(set(plain.token_ids))
    looped = tiny_engine.generate(REPEAT, max_new_tokens=32, presence_penalty=-2.0, frequency_penalty=-2.0)
    assert len(set(looped.token_ids)) <= 2  # negative penalties reward repeating


@pytest.mark.parametrize(("presence", "frequency"), [(0.5, 2.0), (-2.0, -1.0), (0.0, 1.5), (-2.0, 0.5)])
def test_greedy_decode_with_penalties_equals_the_formula_applied_by_hand(
    tiny_engine: NVLMEngine, presence: float, frequency: float
) -> None:
    request = tiny_engine.prepare(REPEAT, max_new_tokens=24, presence_penalty=presence, frequency_penalty=frequency)
    (penalized,) = tiny_engine.run([request])
    assert penalized.finish_reason == "length"
    (logits,) = _reference_logits(tiny_engine, [request], [penalized.token_ids])
    counts = torch.zeros_like(logits[0])  # generated tokens only, not the prompt
    for raw, token in zip(logits, penalized.token_ids):
        assert int(torch.argmax(raw - presence * (counts > 0).float() - frequency * counts)) == token
        counts[token] += 1


@pytest.mark.parametrize("options", [
    {"presence_penalty": 2.5}, {"presence_penalty": -2.01}, {"frequency_penalty": 3},
    {"frequency_penalty": math.nan}, {"presence_penalty": math.inf}, {"frequency_penalty": "much"},
    {"top_logprobs": 21}, {"top_logprobs": -1, "logprobs": True}, {"top_logprobs": 3},
    {"top_logprobs": 2.5, "logprobs": True}, {"top_logprobs": True, "logprobs": True},
])
def test_out_of_range_options_are_refused(options: dict) -> None:
    with pytest.raises(GenerationOptionsError):
        make_options(**options)


def test_option_defaults_and_limits() -> None:
    default = SamplingOptions()
    assert (default.presence_penalty, default.frequency_penalty, default.logprobs, default.top_logprobs) == (0.0, 0.0, False, 0)
    edge = make_options(presence_penalty=-2, frequency_penalty=2, logprobs=True, top_logprobs=20)
    assert (edge.presence_penalty, edge.frequency_penalty, edge.top_logprobs) == (-2.0, 2.0, 20)
    assert make_options(presence_penalty=None, logprobs=None, top_logprobs=None) == default


def test_engine_refuses_bad_options_before_compute(tiny_engine: NVLMEngine) -> None:
    with pytest.raises(GenerationOptionsError, match="top_logprobs"):
        tiny_engine.generate(HI, max_new_tokens=2, top_logprobs=2)
