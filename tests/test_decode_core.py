"""The engine's own decode core (issue 12), checked against the reference path on a tiny random NVLM-D.

- `decoder.prefill_chunk` / `decode_step` logits against `reference_decode.prefill` / `decode_one`
  (transformers' layers over `DynamicCache`), single rows and a batch with a dead row;
- greedy tokens against `greedy_reference` for single requests, batches, merged batches,
  every prefill chunk size, prefix-cache hits, image-cache hits, evictions, shared prefixes;
- slot bookkeeping: cancel and finish free slots, the KV cache stays within its budget;
- one host transfer per decode step; `torch.compile(fullgraph=True)` without graph breaks or
  recompiles over a growing context.

Everything runs in fp32 on the CPU (one test also on CUDA when there is one). The engines of
this file share one loaded model (`_engine`): each has its own cores, caches and counters.
"""

from __future__ import annotations

import collections
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

from nvlm_engine import NVLMEngine, generation
from nvlm_engine.cores import DecodeSettings
from nvlm_engine.decoder import decode_step, mixed_step, prefill_chunk
from nvlm_engine.errors import RequestFailedError
from nvlm_engine.generation import DecodeCore, Delta, GenerationResult, PreparedRequest
from nvlm_engine.image_cache import image_key
from nvlm_engine.kv_cache import KVCache, KVCacheFullError
from nvlm_engine.reference_decode import decode_one, greedy_reference, prefill
from nvlm_engine.sampling import make_options

ATOL = 1e-4  # fp32 logits: the same arithmetic in a different order (SDPA kernels, masks)


# --- engines, requests, references ---------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tiny_checkpoint: Path) -> NVLMEngine:
    return NVLMEngine.from_pretrained(tiny_checkpoint, device_map="cpu", dtype="float32")


def _engine(base: NVLMEngine, **settings) -> NVLMEngine:
    """A fresh engine over `base`'s loaded model: its own cores, caches and counters."""
    return NVLMEngine(base.model, base.tokenizer, context_length=base.context_length,
                      decoding=DecodeSettings(**settings))


@pytest.fixture(scope="module")
def nocache(base: NVLMEngine) -> NVLMEngine:
    """The engine without prefix or image caching: what a cache hit must reproduce."""
    return _engine(base, prefix_caching=False, image_cache_bytes=0)


_REFERENCES: dict[tuple, tuple[list[int], list[float]]] = {}


def _reference_run(engine: NVLMEngine, request: PreparedRequest) -> tuple[list[int], list[float]]:
    """Greedy tokens of `request` on the reference path and each one's logprob (memoized).

    The loop of `reference_decode.greedy_reference`, also keeping `log_softmax` of the raw
    logits at the chosen token (what `GenerationResult.logprobs` holds): token equality alone is
    a weak oracle on a random model, whose argmax survives most small errors in attention.
    """
    pixels = request.pixel_values
    key = (tuple(request.prompt_ids), None if pixels is None else image_key(pixels), request.options.max_new_tokens)
    if key not in _REFERENCES:
        tokens: list[int] = []
        logprobs: list[float] = []
        with torch.inference_mode():
            logits, step, valid = prefill(engine.model, [request], engine.token_ids)
            for _ in range(request.options.max_new_tokens):
                token = int(torch.argmax(logits[0]))
                if token == engine.token_ids.end:
                    break
                tokens.append(token)
                logprobs.append(float(torch.log_softmax(logits[0], dim=-1)[token]))
                logits, valid = decode_one(engine.model, torch.tensor([token], device=valid.device), step, valid)
        _REFERENCES[key] = (tokens, logprobs)
    return _REFERENCES[key]


def _logprobs(result: GenerationResult) -> list[float]:
    assert result.logprobs is not None, "ask for logprobs=True: they are the sensitive part of the check"
    return [entry.logprob for entry in result.logprobs]


def _expect_reference(engine: NVLMEngine, request: PreparedRequest, result: GenerationResult) -> None:
    """The result's tokens equal the reference's, and so do their logprobs within fp32 tolerance."""
    tokens, logprobs = _reference_run(engine, request)
    assert result.token_ids == tokens
    assert _logprobs(result) == pytest.approx(logprobs, abs=ATOL, rel=0)


def _expect_same(result: GenerationResult, expected: GenerationResult) -> None:
    assert result.token_ids == expected.token_ids
    assert _logprobs(result) == pytest.approx(_logprobs(expected), abs=ATOL, rel=0)


def _noise(seed: int, width: int = 448, height: int = 448) -> Image.Image:
    """Random pixels (one 448x448 tile by default, so the tiling never depends on the image count)."""
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy())


def _user(text: str, *images: Image.Image) -> dict:
    return {"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                        {"type": "text", "text": text}]}


def _raw(engine: NVLMEngine, seed: int, length: int, max_new_tokens: int) -> PreparedRequest:
    """A prompt of random token ids (no chat template, so no two share even their first token)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 100_000, (length,), generator=g).tolist()
    return PreparedRequest(prompt_ids=ids, pixel_values=None, options=make_options(max_new_tokens=max_new_tokens, logprobs=True))


TEXT = [_user("Hi there, what can you do for me today?")]
IMAGE = [_user("Describe the picture.", _noise(1))]
TWO_IMAGES = [_user("Compare them.", _noise(2), _noise(3))]
TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two plus two, in a long and detailed explanation?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "Why?"},
]


class _Outcome:
    """What a core handed out, per request index."""

    def __init__(self) -> None:
        self.results: dict[int, GenerationResult] = {}
        self.errors: dict[int, RequestFailedError] = {}
        self.deltas: list[Delta] = []

    def take(self, deltas: list[Delta]) -> list[Delta]:
        for delta in deltas:
            self.deltas.append(delta)
            if delta.result is not None:
                assert delta.index not in self.results
                self.results[delta.index] = delta.result
            if delta.error is not None:
                self.errors[delta.index] = delta.error
        return deltas


def _drive(core: DecodeCore, outcome: _Outcome, max_steps: int = 3000) -> _Outcome:
    """Step `core` until it holds no request (failing the test if it never gets there)."""
    for _ in range(max_steps):
        if not core.busy:
            return outcome
        outcome.take(core.step())
    pytest.fail(f"the core is still busy after {max_steps} steps")


def _row_of(core: DecodeCore, request: PreparedRequest):
    for row in (*core.waiting, *core.prefilling, *core.ready, *core.running.values()):
        if row.request is request:
            return row
    return None


def _stats_delta(engine: NVLMEngine, run):
    before = engine.cache_stats()
    out = run()
    after = engine.cache_stats()
    return out, {k: after[k] - before[k] for k in after}


# --- 1. decoder numerics -------------------------------------------------------------------------


def _new_kv(model, slots: int, capacity: int) -> KVCache:
    lm = model.language_model
    kv = KVCache([layer.input_layernorm.weight.device for layer in lm.model.layers],
                 kv_heads=lm.config.num_key_value_heads, head_dim=lm.model.layers[0].self_attn.head_dim,
                 dtype=torch.float32, max_capacity=4096)
    kv.ensure(slots, capacity)
    return kv


def _prompt_embeds(engine: NVLMEngine, request: PreparedRequest) -> torch.Tensor:
    model = engine.model
    image = model.encode_images(request.pixel_values) if request.pixel_values is not None else None
    return model.embed(torch.tensor([request.prompt_ids]), image, engine.token_ids.image)


@pytest.mark.parametrize(("messages", "chunk"), [(TEXT, None), (IMAGE, None), (IMAGE, 100)],
                         ids=["text", "image", "image-in-chunks-of-100"])
def test_prefill_and_decode_logits_equal_the_reference(base: NVLMEngine, messages, chunk) -> None:
    with torch.inference_mode():
        _check_single_row(base, messages, chunk)


def _check_single_row(base: NVLMEngine, messages, chunk: int | None) -> None:
    request = base.prepare(messages, max_new_tokens=8)
    n = len(request.prompt_ids)
    ref_logits, step, valid = prefill(base.model, [request], base.token_ids)
    kv = _new_kv(base.model, 1, n + 8)
    embeds = _prompt_embeds(base, request)
    starts = list(range(0, n, chunk or n))
    for start in starts:
        logits = prefill_chunk(base.model, kv, 0, embeds[:, start : start + (chunk or n)], start)
    assert len(starts) == (1 if chunk is None else math.ceil(n / chunk))
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
    length = n
    for _ in range(6):
        token = torch.argmax(ref_logits, dim=-1)  # [1]
        ref_logits, valid = decode_one(base.model, token, step, valid)
        logits = decode_step(base.model, kv, token, torch.tensor([length]), torch.tensor([0]), window=length + 1)
        length += 1
        torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)


def test_batched_decode_with_a_dead_row_equals_the_reference(base: NVLMEngine) -> None:
    """3 rows of different lengths in slots 0, 2, 3; slot 1 holds no request: its write goes to scratch."""
    with torch.inference_mode():
        _check_dead_row(base)


def _check_dead_row(base: NVLMEngine) -> None:
    requests = [base.prepare(m, max_new_tokens=8) for m in (TEXT, IMAGE, TURNS)]
    lengths = [len(r.prompt_ids) for r in requests]
    assert len(set(lengths)) == 3
    ref_logits, step, valid = prefill(base.model, requests, base.token_ids)  # left-padded, masked
    kv = _new_kv(base.model, 4, max(lengths) + 8)
    slots = [0, 2, 3]
    for slot, request in zip(slots, requests):
        logits = prefill_chunk(base.model, kv, slot, _prompt_embeds(base, request), 0)
        torch.testing.assert_close(logits[0], ref_logits[slots.index(slot)], atol=ATOL, rtol=0)
    for _ in range(5):
        tokens = torch.argmax(ref_logits, dim=-1)  # [3]
        ref_logits, valid = decode_one(base.model, tokens, step, valid)
        row_tokens = torch.tensor([tokens[0], base.token_ids.pad, tokens[1], tokens[2]])
        positions = torch.tensor([lengths[0], 0, lengths[1], lengths[2]])
        write = torch.tensor([0, kv.scratch, 2, 3])
        logits = decode_step(base.model, kv, row_tokens, positions, write, window=max(lengths) + 1)
        assert logits.shape[0] == 4
        torch.testing.assert_close(logits[slots], ref_logits, atol=ATOL, rtol=0)
        lengths = [n + 1 for n in lengths]
    for keys, values in zip(kv.keys, kv.values):
        assert not keys[1].any() and not values[1].any()  # the dead row's slot is never written
        assert keys[kv.scratch, :, 0].abs().sum() > 0  # its writes went to the scratch slot


# --- 2. greedy tokens equal the reference --------------------------------------------------------


@pytest.mark.parametrize("messages", [TEXT, IMAGE], ids=["text", "image"])
def test_single_request_greedy_equals_the_reference(base: NVLMEngine, messages) -> None:
    engine = _engine(base)
    request = engine.prepare(messages, max_new_tokens=10, logprobs=True)
    result = engine.run([request])[0]
    _expect_reference(engine, request, result)
    assert result.token_ids == greedy_reference(engine.model, request, engine.token_ids, 10)  # the oracle's own loop
    assert len(result.token_ids) == 10


def test_generate_batch_of_mixed_requests_equals_each_reference(base: NVLMEngine) -> None:
    engine = _engine(base)
    requests = [engine.prepare(m, max_new_tokens=n, logprobs=True)
                for m, n in zip((IMAGE, TEXT, TWO_IMAGES, TURNS), (6, 9, 4, 7))]
    results = engine.run(requests)
    for request, result in zip(requests, results):
        _expect_reference(engine, request, result)
    assert [len(r.token_ids) for r in results] == [6, 9, 4, 7]
    assert len({tuple(r.token_ids) for r in results}) == 4


def test_merged_batches_equal_each_solo_reference(base: NVLMEngine) -> None:
    """Requests admitted into a running batch decode exactly as they would alone."""
    engine = _engine(base)
    core = engine.new_core()
    a, b, c = (engine.prepare(m, max_new_tokens=n, logprobs=True) for m, n in ((IMAGE, 12), (TEXT, 8), (TURNS, 5)))
    outcome = _Outcome()
    outcome.take(core.admit([(0, a)]))
    for _ in range(3):
        outcome.take(core.step())
    assert len(_row_of(core, a).generated) >= 2  # a is decoding when b comes
    outcome.take(core.admit([(1, b)]))
    for _ in range(2):
        outcome.take(core.step())
    outcome.take(core.admit([(2, c)]))
    _drive(core, outcome)
    assert not outcome.errors
    for i, request in enumerate((a, b, c)):
        _expect_reference(engine, request, outcome.results[i])


# --- 3. chunked prefill --------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_tokens", [1, 7, 64, 100_000])
def test_chunked_prefill_gives_the_reference_tokens(base: NVLMEngine, monkeypatch, chunk_tokens: int) -> None:
    engine = _engine(base, chunk_tokens=chunk_tokens, prefix_caching=False)
    request = engine.prepare(IMAGE, max_new_tokens=6, logprobs=True)
    calls: list[int] = []

    def counted(model, kv, tokens, positions, writes, window, chunks, embeds, logits_of):
        calls.extend(chunk.length for chunk in chunks)
        return mixed_step(model, kv, tokens, positions, writes, window, chunks, embeds, logits_of)

    monkeypatch.setattr(generation, "mixed_step", counted)
    result = engine.run([request])[0]
    n = len(request.prompt_ids)
    assert len(calls) == math.ceil(n / chunk_tokens) and sum(calls) == n
    _expect_reference(engine, request, result)


def test_running_rows_get_a_token_every_step_while_a_long_prompt_prefills(base: NVLMEngine, monkeypatch) -> None:
    """...in the same forward pass as the prompt's chunk (the weights are read once per step)."""
    engine = _engine(base, chunk_tokens=64)
    core = engine.new_core()
    passes: list[tuple[int, int]] = []  # (decode rows, chunk tokens) of every forward pass

    def counted(model, kv, tokens, positions, writes, window, chunks=(), embeds=None, logits_of=()):
        passes.append((0 if tokens is None else tokens.shape[0], sum(c.length for c in chunks)))
        return mixed_step(model, kv, tokens, positions, writes, window, chunks, embeds, logits_of)

    monkeypatch.setattr(generation, "mixed_step", counted)
    monkeypatch.setattr(generation, "decode_step", lambda *args: counted(*args[:6]))  # (not its compiled layers)
    running = engine.prepare(TEXT, max_new_tokens=40, logprobs=True)
    newcomer = engine.prepare(TWO_IMAGES, max_new_tokens=5, logprobs=True)  # 2 x 256 image tokens: 8+ chunks
    outcome = _Outcome()
    outcome.take(core.admit([(0, running)]))
    for _ in range(3):
        outcome.take(core.step())
    row = _row_of(core, running)
    assert row in core.running.values()
    outcome.take(core.admit([(1, newcomer)]))
    prefill_steps = 0
    while _row_of(core, newcomer) in (*core.waiting, *core.prefilling):  # waiting: the cache grows meanwhile
        before = len(row.generated)
        prefilling = _row_of(core, newcomer) in core.prefilling
        passes.clear()
        outcome.take(core.step())
        assert len(row.generated) == before + 1  # the running row got its token in this step
        assert len(passes) == 1 and passes[0][0] >= 1, passes  # one pass
        if prefilling:
            assert passes[0][1] > 0, passes  # ...with the row and a chunk
            prefill_steps += 1
    assert prefill_steps >= (len(newcomer.prompt_ids) - 64) // 64
    assert len(_row_of(core, newcomer).generated) == 1  # sampled in the step its prefill ended
    _drive(core, outcome)
    _expect_reference(engine, running, outcome.results[0])
    _expect_reference(engine, newcomer, outcome.results[1])


def test_a_prompt_whose_pass_fails_ends_alone(base: NVLMEngine, monkeypatch) -> None:
    """A step's pass that fails with a prompt chunk in it is retried part by part: the running row
    and the other prompt go on, exactly; only the failing prompt's request ends, with an error."""
    engine = _engine(base, chunk_tokens=4096, prefix_caching=False)
    core = engine.new_core()
    running = engine.prepare(TEXT, max_new_tokens=12, logprobs=True)
    poisoned = engine.prepare(IMAGE, max_new_tokens=5)
    healthy = engine.prepare(TURNS, max_new_tokens=5, logprobs=True)
    outcome = _Outcome()
    outcome.take(core.admit([(0, running)]))
    outcome.take(core.step())
    outcome.take(core.admit([(1, poisoned), (2, healthy)]))
    bad_slot = _row_of(core, poisoned).slot

    def failing(model, kv, tokens, positions, writes, window, chunks=(), embeds=None, logits_of=()):
        if any(chunk.slot == bad_slot for chunk in chunks):
            raise RuntimeError("the device ran out of memory")
        return mixed_step(model, kv, tokens, positions, writes, window, chunks, embeds, logits_of)

    monkeypatch.setattr(generation, "mixed_step", failing)
    _drive(core, outcome)
    assert set(outcome.errors) == {1} and "prefilling its prompt" in str(outcome.errors[1])
    _expect_reference(engine, running, outcome.results[0])
    _expect_reference(engine, healthy, outcome.results[2])
    assert not core.busy and bad_slot not in core.running


# --- 4. prefix cache ------------------------------------------------------------------------------


def test_an_identical_request_hits_and_gives_the_same_tokens(base: NVLMEngine) -> None:
    engine = _engine(base)
    messages = [_user("An identical question about this noise, asked twice.", _noise(11))]
    first, miss = _stats_delta(engine, lambda: engine.generate(messages, max_new_tokens=8, logprobs=True))
    assert miss["prefix_hits"] == 0 and miss["prefix_queries"] == 1
    request = engine.prepare(messages, max_new_tokens=8, logprobs=True)
    second, hit = _stats_delta(engine, lambda: engine.run([request])[0])
    assert hit["prefix_hits"] == 1
    assert hit["prefix_hit_tokens"] == len(request.prompt_ids) - 1
    _expect_same(second, first)
    _expect_reference(engine, request, first)


def test_turn_two_hits_turn_one_and_equals_the_uncached_engine(base: NVLMEngine, nocache: NVLMEngine) -> None:
    engine = _engine(base)
    turn1 = [_user("What is in this picture?", _noise(21))]
    request1 = engine.prepare(turn1, max_new_tokens=8, logprobs=True)
    answer = engine.run([request1])[0]
    turn2 = turn1 + [{"role": "assistant", "content": answer.text}, _user("And in this one?", _noise(22))]
    request2 = engine.prepare(turn2, max_new_tokens=8, logprobs=True)
    assert request2.prompt_ids[: len(request1.prompt_ids)] == request1.prompt_ids
    result, stats = _stats_delta(engine, lambda: engine.run([request2])[0])
    assert stats["prefix_hits"] == 1
    assert stats["prefix_hit_tokens"] >= len(request1.prompt_ids)  # turn 1's prompt, image included
    _expect_same(result, nocache.generate(turn2, max_new_tokens=8, logprobs=True))


def test_different_images_with_identical_ids_never_share_kv(base: NVLMEngine, nocache: NVLMEngine) -> None:
    engine = _engine(base)
    a = [_user("Describe.", _noise(31))]
    b = [_user("Describe.", _noise(32))]
    request_a, request_b = (engine.prepare(m, max_new_tokens=8, logprobs=True) for m in (a, b))
    assert request_a.prompt_ids == request_b.prompt_ids  # the ids cannot tell the images apart
    first_pad = request_b.prompt_ids.index(engine.token_ids.image)
    result_a = engine.run([request_a])[0]
    result_b, stats = _stats_delta(engine, lambda: engine.run([request_b])[0])
    assert stats["prefix_hit_tokens"] == first_pad  # the text before the image, not one pad more
    _expect_same(result_b, nocache.generate(b, max_new_tokens=8, logprobs=True))
    assert result_b.token_ids != result_a.token_ids


# --- 5. image-embedding cache --------------------------------------------------------------------


def test_the_same_image_after_other_text_skips_the_vision_tower(base: NVLMEngine, nocache: NVLMEngine,
                                                                monkeypatch) -> None:
    engine = _engine(base)
    picture = _noise(41)
    first = [_user("What is it?", picture)]
    second = [{"role": "system", "content": "You are a careful assistant; look twice."}, _user("What is it?", picture)]
    expected = nocache.generate(second, max_new_tokens=8, logprobs=True)
    calls: list[int] = []
    encode = engine.model.encode_images

    def counted(pixel_values, *args, **kwargs):
        calls.append(pixel_values.shape[0])
        return encode(pixel_values, *args, **kwargs)

    monkeypatch.setattr(engine.model, "encode_images", counted)
    engine.generate(first, max_new_tokens=4)
    assert calls == [1]
    request = engine.prepare(second, max_new_tokens=8, logprobs=True)
    result, stats = _stats_delta(engine, lambda: engine.run([request])[0])
    assert calls == [1]  # no second pass through the vision tower
    assert stats["image_cache_hits"] == 1 and stats["image_cache_misses"] == 0
    assert stats["prefix_hit_tokens"] < request.prompt_ids.index(engine.token_ids.image)  # not the prefix cache
    _expect_same(result, expected)


# --- 6. eviction under a tiny budget -------------------------------------------------------------

TINY_KV = 3 * 256  # two sequences of 256 tokens and the scratch slot


def test_requests_in_sequence_evict_lru_and_stay_exact(base: NVLMEngine) -> None:
    engine = _engine(base, kv_tokens=TINY_KV)
    core = engine.new_core()
    stats = []

    def run(request: PreparedRequest) -> None:
        outcome = _Outcome()
        outcome.take(core.admit([(0, request)]))
        _drive(core, outcome)
        assert not outcome.errors
        _expect_reference(engine, request, outcome.results[0])
        assert (core.kv.slots + 1) * core.kv.capacity <= TINY_KV

    requests = [_raw(engine, seed, 20 + 7 * seed, 6) for seed in range(5)]
    for request in requests:
        run(request)
        stats.append(core.prefix.stats().evictions)
    assert core.kv.slots == 2
    assert stats == [0, 0, 1, 2, 3]  # from the third request on, the least recently used gives way
    assert engine.cache_stats()["prefix_evictions"] == 3
    # the two most recent stayed: the older one of them hits (and is now the most recent) ...
    hits = core.prefix.stats()
    run(requests[3])
    assert core.prefix.stats().hit_tokens - hits.hit_tokens == len(requests[3].prompt_ids) - 1
    # ... and an evicted one misses, evicting the least recently used (request 4)
    hits = core.prefix.stats()
    run(requests[0])
    assert core.prefix.stats().hits == hits.hits
    assert core.prefix.stats().evictions == 4
    run(requests[3])
    assert core.prefix.stats().hit_tokens - hits.hit_tokens == len(requests[3].prompt_ids) - 1


@pytest.mark.parametrize("big_first", [True, False], ids=["big-first", "big-second"])
def test_a_request_larger_than_the_budget_fails_alone(base: NVLMEngine, big_first: bool) -> None:
    engine = _engine(base, kv_tokens=TINY_KV)
    engine.generate(TEXT, max_new_tokens=3)  # leaves an idle cached slot behind
    normal = engine.prepare(TURNS, max_new_tokens=6, logprobs=True)
    big = engine.prepare(TEXT, max_new_tokens=300)  # needs 512 tokens of capacity: 2 x 512 > 768 alone
    requests = [big, normal] if big_first else [normal, big]
    deltas: list[Delta] = []
    with pytest.raises(RequestFailedError) as raised:
        for delta in engine.stream_batch(requests):
            deltas.append(delta)  # noqa: PERF402 (kept as they come: the loop ends in a raise)
    big_index, normal_index = requests.index(big), requests.index(normal)
    finals = {d.index: d for d in deltas if d.result is not None or d.error is not None}
    assert set(finals) == {0, 1}
    failed = finals[big_index]
    assert failed.result is None and isinstance(failed.error, RequestFailedError)
    assert isinstance(failed.error.__cause__, KVCacheFullError) and failed.error.stage == "prefill"
    assert raised.value is failed.error
    assert finals[normal_index].error is None
    _expect_reference(engine, normal, finals[normal_index].result)
    # the engine goes on serving
    _expect_reference(engine, normal, engine.generate(TURNS, max_new_tokens=6, logprobs=True))


# --- 7. concurrent requests sharing a prefix -----------------------------------------------------

LONG = ("Read the picture carefully, then list every object you see, their colours, their positions "
        "relative to each other, and anything unusual about them; finally, ")


@pytest.mark.parametrize("when", ["together", "while-running", "while-prefilling"])
def test_concurrent_requests_share_a_prefix(base: NVLMEngine, monkeypatch, when: str) -> None:
    engine = _engine(base, chunk_tokens=64)
    picture = _noise(51)
    one = engine.prepare([_user(LONG + "answer in French.", picture)], max_new_tokens=10, logprobs=True)
    two = engine.prepare([_user(LONG + "write it all as a numbered list of short German sentences, 12 at most.", picture)],
                         max_new_tokens=10, logprobs=True)
    common = next(i for i, (x, y) in enumerate(zip(one.prompt_ids, two.prompt_ids)) if x != y)
    assert common > 256 + 20
    copies: list[tuple[int, int, int]] = []
    copy = KVCache.copy_prefix

    def counted(self, source, target, length):
        copies.append((source, target, length))
        return copy(self, source, target, length)

    monkeypatch.setattr(KVCache, "copy_prefix", counted)
    core = engine.new_core()
    outcome = _Outcome()
    if when == "together":
        outcome.take(core.admit([(0, one), (1, two)]))
        expected_hit = None
    else:
        outcome.take(core.admit([(0, one)]))
        if when == "while-running":
            while _row_of(core, one) not in core.running.values():
                outcome.take(core.step())
            outcome.take(core.step())
            expected_hit = common
        else:
            outcome.take(core.step())
            outcome.take(core.step())
            assert _row_of(core, one) in core.prefilling
            expected_hit = 2 * 64
        before = core.prefix.stats()
        outcome.take(core.admit([(1, two)]))
        after = core.prefix.stats()
        assert after.hits == before.hits + 1
        assert after.hit_tokens - before.hit_tokens == expected_hit
        assert copies == [(_row_of(core, one).slot, _row_of(core, two).slot, expected_hit)]
        assert _row_of(core, two).length == expected_hit  # only the rest is prefilled
    _drive(core, outcome)
    assert not outcome.errors
    _expect_reference(engine, one, outcome.results[0])
    _expect_reference(engine, two, outcome.results[1])
    assert outcome.results[0].token_ids != outcome.results[1].token_ids


# --- 8. cancel and finish free slots -------------------------------------------------------------


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["cached", "uncached"])
def test_cancel_and_finish_free_slots(base: NVLMEngine, prefix_caching: bool) -> None:
    engine = _engine(base, chunk_tokens=64, prefix_caching=prefix_caching)
    core = engine.new_core()
    cancelled = engine.prepare(TEXT, max_new_tokens=200)
    finishing = engine.prepare(TURNS, max_new_tokens=4)
    mid_prefill = engine.prepare(TWO_IMAGES, max_new_tokens=200)
    outcome = _Outcome()
    outcome.take(core.admit([(0, cancelled), (1, finishing), (2, mid_prefill)]))
    while _row_of(core, cancelled) not in core.running.values():
        outcome.take(core.step())
    assert _row_of(core, mid_prefill) in core.prefilling
    assert core.kv.slots >= 3
    mid_prefill.cancel.set()
    outcome.take(core.step())
    assert _row_of(core, mid_prefill) is None  # ended while prefilling
    cancelled.cancel.set()
    _drive(core, outcome)
    assert [outcome.results[i].finish_reason for i in range(3)] == ["cancelled", "length", "cancelled"]
    assert not core.busy
    assert not (core.running or core.prefilling or core.waiting or core.ready)
    slots, keys = core.kv.slots, core.kv.keys[0]
    # three new requests at once: every slot must have come back
    again = [engine.prepare(m, max_new_tokens=5, logprobs=True) for m in ([_user("Something new.")], IMAGE, TURNS)]
    outcome = _Outcome()
    outcome.take(core.admit(list(enumerate(again))))
    taken = {_row_of(core, r).slot for r in again}
    assert taken <= set(range(slots)) and len(taken) == 3
    _drive(core, outcome)
    assert core.kv.slots == slots and core.kv.keys[0] is keys  # the KV cache did not grow
    for i, request in enumerate(again):
        _expect_reference(engine, request, outcome.results[i])
    assert not core.busy


# --- 9. one host sync per decode step -------------------------------------------------------------

_SYNCS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")


def _to_cpu(args: tuple, kwargs: dict) -> bool:
    device = kwargs.get("device")
    for arg in args:
        if isinstance(arg, (str, torch.device)):
            device = arg
        elif isinstance(arg, torch.Tensor):
            device = arg.device
    return device is not None and torch.device(device).type == "cpu"


class HostSyncCounter(TorchFunctionMode):
    """Counts tensor calls that make the host wait for a value (or copy a device tensor to the CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if args and isinstance(args[0], torch.Tensor):
            on_device = args[0].device.type != "cpu"
            if name in _SYNCS or (on_device and name in ("cpu", "numpy")):
                self.counts[name] += 1
            elif name == "to" and on_device and _to_cpu(args[1:], kwargs):
                self.counts["to(cpu)"] += 1
        return func(*args, **kwargs)


def test_the_counter_sees_every_kind_of_sync() -> None:
    t = torch.tensor([1.5, 2.0])
    with HostSyncCounter() as counter:
        t.tolist(), t[0].item(), bool(t[0]), int(t[0]), float(t[0]), [1, 2][t[0].long()]
    assert counter.counts == {name: 1 for name in _SYNCS}


@pytest.fixture(scope="module", params=["cpu", "cuda"])
def sync_engine(request, base: NVLMEngine, tiny_checkpoint: Path) -> NVLMEngine:
    if request.param == "cpu":
        return _engine(base)
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return NVLMEngine.from_pretrained(tiny_checkpoint, device_map="cuda", dtype="float32")


def test_a_decode_step_syncs_the_host_once(sync_engine: NVLMEngine) -> None:
    engine = sync_engine
    core = engine.new_core()
    requests = [
        engine.prepare(TEXT, max_new_tokens=40, logprobs=True, top_logprobs=2),  # greedy
        engine.prepare(IMAGE, max_new_tokens=40, temperature=0.8, top_p=0.9, seed=3),
        engine.prepare(TURNS, max_new_tokens=40, repetition_penalty=1.3),
    ]
    outcome = _Outcome()
    outcome.take(core.admit(list(enumerate(requests))))
    for _ in range(20):
        if len(core.running) == 3 and not (core.prefilling or core.waiting or core.ready):
            break
        outcome.take(core.step())
    assert len(core.running) == 3 and not (core.prefilling or core.waiting)
    rows = [_row_of(core, r) for r in requests]
    for _ in range(5):
        before = [len(row.generated) for row in rows]
        with HostSyncCounter() as counter:
            outcome.take(core.step())
        assert dict(counter.counts) == {"tolist": 1}
        assert [len(row.generated) for row in rows] == [n + 1 for n in before]
    assert not outcome.errors
    assert len(rows[0].logprobs) == len(rows[0].generated) and len(rows[0].logprobs[-1].top) == 2
    core.cancel_all()


# --- 10. torch.compile(fullgraph=True) of the decode step -----------------------------------------


@pytest.mark.slow
def test_compiled_decode_never_breaks_nor_recompiles(base: NVLMEngine) -> None:
    from torch._dynamo.utils import counters

    new_tokens = 200
    eager = _engine(base, prefix_caching=False)
    expected = eager.generate(TEXT, max_new_tokens=new_tokens, logprobs=True)
    assert expected.finish_reason == "length" and len(expected.token_ids) == new_tokens
    torch._dynamo.reset()
    counters.clear()
    engine = _engine(base, compile=True, prefix_caching=False)
    core = engine.new_core()
    request = engine.prepare(TEXT, max_new_tokens=new_tokens, logprobs=True)
    assert len(request.prompt_ids) + new_tokens <= 256  # one window bucket for the whole answer
    compiled_calls = []
    compiled = core._step
    assert compiled is not None

    def counted(*args):
        compiled_calls.append(args[-1])  # the window
        return compiled(*args)

    core._step = counted
    outcome = _Outcome()
    outcome.take(core.admit([(0, request)]))
    for _ in range(4):
        outcome.take(core.step())
    assert compiled_calls  # the first decode steps went through the compiled function
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    assert not counters["graph_break"]
    snapshot = {k: dict(v) for k, v in counters.items() if k in ("stats", "aot_autograd", "inductor", "recompiles")}
    with torch._dynamo.config.patch(error_on_recompile=True):  # (monkeypatch's undo deletes dynamo config keys)
        _drive(core, outcome)
    assert len(compiled_calls) == new_tokens - 1 and set(compiled_calls) == {256}
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == graphs
    assert {k: dict(v) for k, v in counters.items() if k in snapshot} == snapshot  # nothing compiled since
    _expect_same(outcome.results[0], expected)


# --- KV budget and prefix bookkeeping ----------------------------------------------------------


def test_the_kv_cache_never_grows_past_its_token_budget(base: NVLMEngine) -> None:
    budget = 2048  # three sequences of 512 and the scratch slot fit (4 x 512)
    engine = _engine(base, kv_tokens=budget)
    core = engine.new_core()
    requests = [_raw(engine, 100 + i, 290, 10) for i in range(3)]  # 300 tokens each: capacity 512
    outcome = _Outcome()
    outcome.take(core.admit(list(enumerate(requests))))
    _drive(core, outcome)
    assert not outcome.errors
    assert (core.kv.slots + 1) * core.kv.capacity <= budget, (core.kv.slots, core.kv.capacity)


def test_a_request_that_fits_the_budget_alone_runs_after_a_batch(base: NVLMEngine) -> None:
    budget = 2048  # 1 sequence of 1024 + scratch, or 3 of 512 + scratch
    engine = _engine(base, kv_tokens=budget)
    engine.run([_raw(engine, 200 + i, 290, 6) for i in range(2)])  # two slots of 512
    alone = _raw(engine, 300, 590, 6)  # 596 tokens: capacity 1024
    _expect_reference(engine, alone, _engine(base, kv_tokens=budget).run([alone])[0])  # a fresh engine can
    _expect_reference(engine, alone, engine.run([alone])[0])


def test_two_alternating_conversations_both_keep_their_prefix(base: NVLMEngine) -> None:
    engine = _engine(base)
    x1 = [{"role": "user", "content": "Tell me about the history of Rome in detail please."}]
    y1 = [{"role": "user", "content": "Write a short poem about the sea and its waves."}]
    x_answer = engine.generate(x1, max_new_tokens=4)
    y_answer = engine.generate(y1, max_new_tokens=4)
    x2 = engine.prepare(x1 + [{"role": "assistant", "content": x_answer.text}, _user("More.")], max_new_tokens=4)
    y2 = engine.prepare(y1 + [{"role": "assistant", "content": y_answer.text}, _user("More.")], max_new_tokens=4)
    turn1 = len(engine.prepare(x1, max_new_tokens=4).prompt_ids)
    _, x_stats = _stats_delta(engine, lambda: engine.run([x2]))
    _, y_stats = _stats_delta(engine, lambda: engine.run([y2]))
    assert x_stats["prefix_hit_tokens"] >= turn1, x_stats
    assert y_stats["prefix_hit_tokens"] >= len(engine.prepare(y1, max_new_tokens=4).prompt_ids), y_stats


def _doomed_while_another_runs(base: NVLMEngine) -> tuple[NVLMEngine, PreparedRequest, dict[str, int]]:
    """One cached raw sequence, then a normal request and one too big for the budget, together."""
    engine = _engine(base, kv_tokens=TINY_KV)
    cached = _raw(engine, 400, 30, 3)
    engine.run([cached])  # slot 0, idle: there is room for one more sequence of 256
    normal = engine.prepare(TURNS, max_new_tokens=6)
    big = engine.prepare(TEXT, max_new_tokens=300)  # capacity 512: never fits 768
    before = engine.cache_stats()
    with pytest.raises(RequestFailedError) as raised:
        engine.run([normal, big])
    assert isinstance(raised.value.__cause__, KVCacheFullError)
    after = engine.cache_stats()
    return engine, cached, {k: after[k] - before[k] for k in after}


def test_a_request_that_can_never_fit_evicts_no_cached_prefix(base: NVLMEngine) -> None:
    engine, cached, stats = _doomed_while_another_runs(base)
    assert stats["prefix_evictions"] == 0, stats
    _, again = _stats_delta(engine, lambda: engine.run([cached]))
    assert again["prefix_hit_tokens"] == len(cached.prompt_ids) - 1


def test_a_waiting_request_counts_one_prefix_query(base: NVLMEngine) -> None:
    _, _, stats = _doomed_while_another_runs(base)
    assert stats["prefix_queries"] <= 3 and stats["prefix_hits"] <= 2, stats


def test_a_lone_request_runs_in_the_lowest_slot_after_cached_ones(base: NVLMEngine) -> None:
    """Cached sequences below a new request move up, so a decode step never computes rows for them."""
    engine = _engine(base)
    core = engine.new_core()
    outcome = _Outcome()
    cached = [_raw(engine, 500 + i, 40, 3) for i in range(4)]
    outcome.take(core.admit(list(enumerate(cached))))
    _drive(core, outcome)
    assert sorted(core.prefix.idle_slots()) == [0, 1, 2, 3]
    lone = _raw(engine, 600, 40, 6)
    outcome.take(core.admit([(9, lone)]))
    seen: set[int] = set()
    while core.busy:
        outcome.take(core.step())
        seen |= set(core.running)
    assert seen == {0}  # the lone request decoded in slot 0, one row per step
    assert len(core.prefix.idle_slots()) == 5  # every cached sequence is still cached
    again = _Outcome()
    for i, request in enumerate(cached):  # and each still hits its own KV
        before = core.prefix.stats().hit_tokens
        again.take(core.admit([(i, request)]))
        _drive(core, again)
        assert core.prefix.stats().hit_tokens - before == len(request.prompt_ids) - 1
        assert again.results[i].token_ids == outcome.results[i].token_ids
