"""One request's failure ends that request only (issue 10, C1).

A poisoned request (a temperature that overflows the logits, a seed torch cannot take, a
constraint that raises or forbids every token, a prefill that fails only with it in the
group) gets its own typed `RequestFailedError`; every other request in its batch finishes
token-identical to its solo answer. And the options that poisoned the batch are made safe
(tiny temperatures are greedy, seeds are reduced modulo 2**64) or refused (NaN, infinities).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable

import pytest
import torch
from PIL import Image

from nvlm_engine import GenerationOptionsError, GenerationResult, NVLMEngine, PreparedRequest, SamplingOptions
from nvlm_engine.errors import RequestFailedError, SamplingError
from nvlm_engine.sampling import GREEDY_BELOW
from nvlm_engine.scheduler import RequestHandle, Scheduler

OTHERS = [("Hi", 7), ("What is the total?", 11), ("Describe the chart in detail please.", 4), ("Count to five.", 9)]
SECRET = "the user's secret text"


def _conv(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


def _picture() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (600, 800, 3), generator=g, dtype=torch.uint8)
    return [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(pixels.numpy())},
                                         {"type": "text", "text": "Describe the picture."}]}]


def _wait(handle: RequestHandle, timeout: float = 60) -> GenerationResult:
    """`handle.wait()`, failing instead of hanging when the scheduler never ends the request."""
    outcome: list[GenerationResult | BaseException] = []

    def wait() -> None:
        try:
            outcome.append(handle.wait())
        except BaseException as e:  # re-raised in the test's thread
            outcome.append(e)

    reader = threading.Thread(target=wait, daemon=True)  # a daemon: a hung reader never blocks exit
    reader.start()
    reader.join(timeout)
    if not outcome:
        raise AssertionError(f"the request did not end within {timeout}s")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


@pytest.fixture(scope="module")
def solo(tiny_engine: NVLMEngine) -> list[list[int]]:
    return [tiny_engine.generate(_conv(q), max_new_tokens=n).token_ids for q, n in OTHERS]


@pytest.fixture()
def scheduler(tiny_engine: NVLMEngine):
    s = Scheduler(tiny_engine, max_batch_size=8, max_queue=64)
    yield s
    s.close()


class _RaisingConstraint:
    """A grammar matcher with a bug: `allowed()` raises (with request content in its message)."""

    done = False

    def allowed(self) -> torch.Tensor | None:
        raise RuntimeError(SECRET)

    def accept(self, token_id: int) -> None:
        pass


class _NothingAllowed:
    """A constraint that forbids every token: the row's logits are all -inf."""

    done = False

    def allowed(self) -> torch.Tensor | None:
        return torch.zeros(8, dtype=torch.bool)  # padded with False to the vocabulary

    def accept(self, token_id: int) -> None:
        pass


def _bypass(request: PreparedRequest, **values: object) -> PreparedRequest:
    """Force option values past `SamplingOptions` validation: what the batch must survive anyway."""
    for name, value in values.items():
        object.__setattr__(request.options, name, value)
    return request


def _tiny_temperature(engine: NVLMEngine) -> PreparedRequest:
    return _bypass(engine.prepare(_conv("Tell me a story."), max_new_tokens=6), temperature=1e-300)


def _huge_seed(engine: NVLMEngine) -> PreparedRequest:
    return _bypass(engine.prepare(_conv("Tell me a story."), max_new_tokens=6, temperature=1.0), seed=2**70)


def _raising_constraint(engine: NVLMEngine) -> PreparedRequest:
    return engine.prepare(_conv("Tell me a story."), max_new_tokens=6, constraint=_RaisingConstraint())


def _nothing_allowed_greedy(engine: NVLMEngine) -> PreparedRequest:
    return engine.prepare(_conv("Tell me a story."), max_new_tokens=6, constraint=_NothingAllowed())


def _nothing_allowed_sampled(engine: NVLMEngine) -> PreparedRequest:
    return engine.prepare(_conv("Tell me a story."), max_new_tokens=6, temperature=0.8, seed=3,
                          constraint=_NothingAllowed())


def _missing_tile(engine: NVLMEngine) -> PreparedRequest:
    """An image request whose tiles do not match its image tokens: its prefill fails, alone or grouped."""
    request = engine.prepare(_picture(), max_new_tokens=6)
    return dataclasses.replace(request, pixel_values=request.pixel_values[:-1])


POISONS: dict[str, tuple[Callable[[NVLMEngine], PreparedRequest], str]] = {
    "temperature 1e-300": (_tiny_temperature, "decode"),
    "seed 2**70": (_huge_seed, "prefill"),
    "constraint raises": (_raising_constraint, "decode"),
    "constraint forbids all (greedy)": (_nothing_allowed_greedy, "decode"),
    "constraint forbids all (sampled)": (_nothing_allowed_sampled, "decode"),
    "prefill fails in the group": (_missing_tile, "prefill"),
}


# --- isolation: scheduler ------------------------------------------------------------------


@pytest.mark.parametrize("poison", list(POISONS))
def test_scheduler_fails_only_the_poisoned_request(tiny_engine: NVLMEngine, scheduler: Scheduler,
                                                   solo: list[list[int]], poison: str) -> None:
    make, stage = POISONS[poison]
    requests = [tiny_engine.prepare(_conv(q), max_new_tokens=n) for q, n in OTHERS]
    requests.insert(2, make(tiny_engine))
    handles = scheduler.submit_many(requests)  # an idle worker admits them in one prefill group
    bad = handles.pop(2)
    with pytest.raises(RequestFailedError) as info:
        _wait(bad)
    assert info.value.stage == stage
    assert info.value.__cause__ is not None
    assert SECRET not in str(info.value)
    assert [_wait(h).token_ids for h in handles] == solo
    assert scheduler.running == 0
    # the scheduler still serves
    assert _wait(scheduler.submit(tiny_engine.prepare(_conv("Hi"), max_new_tokens=2))).usage.completion_tokens == 2


def test_scheduler_async_reader_gets_the_typed_error(tiny_engine: NVLMEngine, scheduler: Scheduler) -> None:
    import asyncio

    async def main() -> None:
        handle = scheduler.submit(_raising_constraint(tiny_engine), loop=asyncio.get_running_loop())
        with pytest.raises(RequestFailedError):
            async for _ in handle.astream():
                pass

    asyncio.run(asyncio.wait_for(main(), 120))


# --- isolation: the engine's direct path ---------------------------------------------------


@pytest.mark.parametrize("poison", list(POISONS))
def test_decode_requests_finishes_the_others_then_raises(tiny_engine: NVLMEngine, solo: list[list[int]],
                                                         poison: str) -> None:
    make, stage = POISONS[poison]
    requests = [tiny_engine.prepare(_conv(q), max_new_tokens=n) for q, n in OTHERS]
    requests.insert(2, make(tiny_engine))
    results: dict[int, list[int]] = {}
    errors: list[int] = []
    with pytest.raises(RequestFailedError) as info:
        for delta in tiny_engine.stream_batch(requests):
            if delta.result is not None:
                results[delta.index] = delta.result.token_ids
            if delta.error is not None:
                errors.append(delta.index)
    assert info.value.stage == stage
    assert errors == [2]
    assert [results[i] for i in (0, 1, 3, 4)] == solo
    with pytest.raises(RequestFailedError):  # run() never returns a batch with a result missing
        tiny_engine.run([tiny_engine.prepare(_conv("Hi"), max_new_tokens=3), make(tiny_engine)])


def test_generate_and_stream_raise_the_typed_error(tiny_engine: NVLMEngine) -> None:
    with pytest.raises(RequestFailedError) as info:
        tiny_engine.generate(_conv("Hi"), max_new_tokens=4, constraint=_NothingAllowed())
    assert isinstance(info.value.__cause__, SamplingError)
    with pytest.raises(RequestFailedError):
        list(tiny_engine.stream(_conv("Hi"), max_new_tokens=4, constraint=_RaisingConstraint()))


# --- validation: made safe or refused ------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-6, 0.0])
def test_tiny_temperatures_are_greedy(tiny_engine: NVLMEngine, temperature: float) -> None:
    options = SamplingOptions(temperature=temperature)
    assert options.greedy and options.temperature == 0.0
    greedy = tiny_engine.generate(_conv("Hi"), max_new_tokens=8)
    assert tiny_engine.generate(_conv("Hi"), max_new_tokens=8, temperature=temperature, seed=1).token_ids == greedy.token_ids


def test_the_greedy_threshold_is_documented_and_sampling_starts_at_it() -> None:
    assert GREEDY_BELOW == 1e-5
    assert not SamplingOptions(temperature=GREEDY_BELOW).greedy


@pytest.mark.parametrize(
    "options",
    [dict(temperature=math.nan), dict(temperature=math.inf), dict(top_p=math.nan), dict(top_p=-math.inf),
     dict(repetition_penalty=math.inf), dict(repetition_penalty=math.nan), dict(temperature="hot"),
     dict(seed=1.5), dict(seed="7")],
)
def test_non_finite_or_mistyped_options_are_refused(options: dict) -> None:
    with pytest.raises(GenerationOptionsError):
        SamplingOptions(**options)


@pytest.mark.parametrize("seed, stored", [(2**70, 2**70 % 2**64), (2**64, 0), (-1, 2**64 - 1), (-(2**80), -(2**80) % 2**64),
                                          (7, 7)])
def test_seeds_are_reduced_modulo_2_64(seed: int, stored: int) -> None:
    options = SamplingOptions(temperature=1.0, seed=seed)
    assert options.seed == stored
    assert options.generator(torch.device("cpu")) is not None


def test_reduced_seeds_sample_like_their_residue(tiny_engine: NVLMEngine) -> None:
    kwargs = dict(max_new_tokens=10, temperature=1.0)
    assert (tiny_engine.generate(_conv("Hi"), seed=2**70 + 5, **kwargs).token_ids
            == tiny_engine.generate(_conv("Hi"), seed=5, **kwargs).token_ids)
    # torch already read -1 as 2**64 - 1: the reduction keeps that stream
    assert (tiny_engine.generate(_conv("Hi"), seed=-1, **kwargs).token_ids
            == tiny_engine.generate(_conv("Hi"), seed=2**64 - 1, **kwargs).token_ids)
