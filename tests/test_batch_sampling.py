"""`BatchSampler`: a whole decode step's tokens chosen on the device with one host transfer.

Greedy rows are checked token for token (and the penalized logits bit for bit) against the
per-row functions of `sampling.py`, as today's `generation._choose` applies them; sampled rows
against their distribution, their seed and the rest of their batch; logprobs against
`log_softmax` of the raw logits; and the transfers against a `TorchFunctionMode` that records
every call that makes the host wait for the device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from nvlm_engine.batch_sampling import BatchSampler, SampledStep
from nvlm_engine.errors import SamplingError
from nvlm_engine.sampling import (
    SamplingOptions,
    apply_constraint,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    sample_token,
)

CPU = torch.device("cpu")
# The exactness tests also run on CUDA where there is one: its kernels round differently (CUDA
# divides by a Python scalar as a multiplication by its reciprocal).
DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


class _Mask:
    """A `TokenConstraint` that only hands out a fixed mask (for `apply_constraint`)."""

    def __init__(self, mask: torch.Tensor | None) -> None:
        self.mask = mask

    def allowed(self) -> torch.Tensor | None:
        return self.mask


class _Reference:
    """One row as today's `generation._choose` / `_advance` treat it, with `sampling.py`'s functions."""

    def __init__(self, options: SamplingOptions, prompt: list[int], vocab: int) -> None:
        self.options, self.prompt, self.vocab = options, prompt, vocab
        self.generated: list[int] = []

    def penalized(self, logits: torch.Tensor) -> torch.Tensor:
        o = self.options
        if o.repetition_penalty != 1.0:
            seen = torch.zeros(self.vocab, dtype=torch.bool)
            seen[torch.tensor(self.prompt + self.generated, dtype=torch.long)] = True
            logits = apply_repetition_penalty(logits, seen, o.repetition_penalty)
        if o.presence_penalty or o.frequency_penalty:
            counts = torch.zeros(self.vocab, dtype=torch.float32)
            for t in self.generated:
                counts[t] += 1
            logits = apply_presence_frequency_penalty(logits, counts, o.presence_penalty, o.frequency_penalty)
        return logits

    def choose(self, logits: torch.Tensor, mask: torch.Tensor | None) -> int:
        return sample_token(apply_constraint(self.penalized(logits), _Mask(mask)), self.options, None)


def _sampler(
    vocab: int, rows: list[tuple[SamplingOptions, list[int]]], slots: int | None = None, device: torch.device = CPU
) -> BatchSampler:
    sampler = BatchSampler(vocab, device, slots or len(rows))
    for slot, (options, prompt) in enumerate(rows):
        sampler.admit(slot, options, prompt)
    return sampler


def _random_mask(generator: torch.Generator, length: int) -> torch.Tensor:
    mask = torch.rand(length, generator=generator) < 0.5
    mask[int(torch.randint(length, (1,), generator=generator))] = True
    return mask


GREEDY_ROWS = [
    SamplingOptions(),
    SamplingOptions(repetition_penalty=1.3),
    SamplingOptions(repetition_penalty=0.7),
    SamplingOptions(presence_penalty=0.7, frequency_penalty=0.4),
    SamplingOptions(repetition_penalty=1.2, presence_penalty=-0.5, frequency_penalty=1.5),
    SamplingOptions(repetition_penalty=1.1, frequency_penalty=0.3),
]


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_greedy_rows_equal_the_per_row_reference_over_many_steps(device: torch.device) -> None:
    vocab, steps = 48, 120
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(vocab, (6,), generator=g).tolist() for _ in GREEDY_ROWS]
    # Sampled rows in the same batch must not change the greedy rows.
    others = [SamplingOptions(temperature=0.8, seed=3, top_p=0.9), SamplingOptions(temperature=1.0, top_k=5)]
    rows = list(zip(GREEDY_ROWS, prompts)) + [(o, [1]) for o in others]
    sampler = _sampler(vocab, rows, device=device)
    references = [_Reference(o, p, vocab) for o, p in zip(GREEDY_ROWS, prompts)]
    slots = list(range(len(rows)))
    for step in range(steps):
        logits = (torch.randn(len(rows), vocab, generator=g) * 0.5).to(device)  # small: penalties decide often
        masks = [_random_mask(g, vocab - 5) if (step + i) % 3 == 0 else None for i in range(len(rows))]
        result = sampler.sample(logits, slots, masks)
        assert result.errors == [None] * len(rows)
        for i, reference in enumerate(references):
            expected = reference.choose(logits[i], masks[i])
            assert result.tokens[i] == expected, f"row {i}, step {step}"
            reference.generated.append(expected)
        for i in range(len(references), len(rows)):
            assert masks[i] is None or bool(masks[i][result.tokens[i]])


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_penalized_logits_equal_the_reference_bit_for_bit(device: torch.device) -> None:
    vocab = 40
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(vocab, (5,), generator=g).tolist() for _ in GREEDY_ROWS]
    sampler = _sampler(vocab, list(zip(GREEDY_ROWS, prompts)), device=device)
    references = [_Reference(o, p, vocab) for o, p in zip(GREEDY_ROWS, prompts)]
    slots = list(range(len(GREEDY_ROWS)))
    changed = 0
    for _ in range(30):
        logits = (torch.randn(len(slots), vocab, generator=g) * 3).to(device)
        penalized = sampler._penalize(logits, torch.tensor(slots, device=device), list(GREEDY_ROWS))
        for i, reference in enumerate(references):
            assert torch.equal(penalized[i], reference.penalized(logits[i])), f"row {i}"
        changed += int((penalized != logits).any(dim=-1).sum())
        for reference, token in zip(references, sampler.sample(logits, slots, [None] * len(slots)).tokens):
            reference.generated.append(token)
    assert changed > 0  # the penalties really acted (the comparison was not of untouched logits)


def _run(sampler: BatchSampler, logits: list[torch.Tensor], slots: list[int]) -> list[list[int]]:
    return [sampler.sample(step, slots, [None] * len(slots)).tokens for step in logits]


@pytest.mark.parametrize("options", [
    SamplingOptions(temperature=1.0, seed=7),
    SamplingOptions(temperature=0.7, seed=-3, top_p=0.8),
    SamplingOptions(temperature=1.3, seed=2**70, top_k=9, presence_penalty=0.5),
])
def test_a_seeded_row_draws_the_same_alone_or_in_any_batch(options: SamplingOptions) -> None:
    vocab, steps = 32, 60
    g = torch.Generator().manual_seed(3)
    own = [torch.randn(1, vocab, generator=g) for _ in range(steps)]
    alone = [t[0] for t in _run(_sampler(vocab, [(options, [1, 2])]), own, [0])]
    again = [t[0] for t in _run(_sampler(vocab, [(options, [1, 2])]), own, [0])]
    assert alone == again
    assert len(set(alone)) > 3  # really sampled, not a constant
    neighbours = [
        (SamplingOptions(temperature=0.9, seed=11, top_k=4), [3]),  # forces the sort of the batch
        (SamplingOptions(), [4]),
        (SamplingOptions(temperature=1.0, top_p=0.5, repetition_penalty=1.2), [5]),  # unseeded
    ]
    batch = _sampler(vocab, neighbours + [(options, [1, 2])], slots=6)
    rows = [torch.cat([torch.randn(3, vocab, generator=g), own[s]]) for s in range(steps)]
    in_batch = [t[3] for t in _run(batch, rows, [0, 1, 2, 3])]
    assert in_batch == alone
    reordered = _sampler(vocab, [(options, [1, 2])] + neighbours, slots=4)
    rows = [torch.cat([own[s], torch.randn(3, vocab, generator=g)]) for s in range(steps)]
    assert [t[0] for t in _run(reordered, rows, [0, 1, 2, 3])] == alone
    other_seed = SamplingOptions(**{**options.__dict__, "seed": 12345})
    assert [t[0] for t in _run(_sampler(vocab, [(other_seed, [1, 2])]), own, [0])] != alone


def test_unseeded_rows_use_the_default_generator() -> None:
    vocab = 50
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(4))
    options = [(SamplingOptions(temperature=1.5), []), (SamplingOptions(temperature=1.5, seed=9), [])]
    draws = []
    for _ in range(2):
        torch.manual_seed(123)
        sampler = _sampler(vocab, options)
        draws.append([sampler.sample(logits[:2], [0, 1], [None, None]).tokens for _ in range(20)])
    assert draws[0] == draws[1]
    torch.manual_seed(124)
    sampler = _sampler(vocab, options)
    other = [sampler.sample(logits[:2], [0, 1], [None, None]).tokens for _ in range(20)]
    assert [t[0] for t in other] != [t[0] for t in draws[0]]  # the unseeded row follows torch.manual_seed
    assert [t[1] for t in other] == [t[1] for t in draws[0]]  # the seeded one does not


@pytest.mark.parametrize("options", [
    SamplingOptions(temperature=1.0, top_k=1, seed=1),
    SamplingOptions(temperature=2.0, top_k=1),
    SamplingOptions(temperature=1.0, top_p=1e-6, seed=2),
    SamplingOptions(temperature=0.5, top_p=1e-6, top_k=7),
])
def test_top_k_one_and_tiny_top_p_are_greedy(options: SamplingOptions) -> None:
    vocab, rows = 64, 8
    g = torch.Generator().manual_seed(5)
    sampler = _sampler(vocab, [(options, [])] * rows)
    for _ in range(25):
        logits = torch.randn(rows, vocab, generator=g) * 2
        assert sampler.sample(logits, list(range(rows)), [None] * rows).tokens == logits.argmax(-1).tolist()


def test_draws_follow_the_filtered_softmax() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    probs = torch.softmax(logits, -1)
    cases = [  # options, expected frequencies
        (SamplingOptions(temperature=1.0), probs),
        (SamplingOptions(temperature=0.5), torch.softmax(logits / 0.5, -1)),
        (SamplingOptions(temperature=1.0, top_k=2), torch.cat([probs[:2] / probs[:2].sum(), torch.zeros(2)])),
        # Mass before token 2 is 0.88 < 0.9, before token 3 it is 0.97: token 3 alone goes.
        (SamplingOptions(temperature=1.0, top_p=0.9), torch.cat([probs[:3] / probs[:3].sum(), torch.zeros(1)])),
    ]
    per_case, steps = 40, 100
    rows = [(SamplingOptions(**{**o.__dict__, "seed": 1000 * c + r}), []) for c, (o, _) in enumerate(cases)
            for r in range(per_case)]
    sampler = _sampler(4, rows)
    batch = logits.expand(len(rows), 4).contiguous()
    counts = torch.zeros(len(cases), 4)
    for _ in range(steps):
        for i, token in enumerate(sampler.sample(batch, list(range(len(rows))), [None] * len(rows)).tokens):
            counts[i // per_case, token] += 1
    frequencies = counts / (per_case * steps)
    for (options, expected), observed in zip(cases, frequencies):
        assert torch.allclose(observed, expected, atol=0.02), (options, observed, expected)
        assert bool((observed[expected == 0] == 0).all())  # filtered tokens are never drawn


def test_a_failing_row_fails_alone_and_never_reaches_multinomial() -> None:
    vocab = 30
    g = torch.Generator().manual_seed(6)
    good = [(SamplingOptions(), []), (SamplingOptions(temperature=0.8, seed=4, logprobs=True), [])]
    bad = [
        (SamplingOptions(logprobs=True, top_logprobs=2), []),  # NaN logits, greedy
        (SamplingOptions(temperature=1.0, seed=5), []),  # NaN logits, sampled
        (SamplingOptions(), []),  # mask forbids everything, greedy
        (SamplingOptions(temperature=1.0, top_p=0.5), []),  # mask forbids everything, sampled
        (SamplingOptions(temperature=1.0), []),  # +inf logit: the probabilities are NaN
        (SamplingOptions(), []),  # malformed mask: float
        (SamplingOptions(temperature=1.0), []),  # malformed mask: 2-D
        (SamplingOptions(), []),  # malformed mask: not a tensor
    ]
    sampler = _sampler(vocab, good + bad)
    alone = _sampler(vocab, good)
    logits = torch.randn(len(good) + len(bad), vocab, generator=g)
    logits[2, 3] = logits[3] = float("nan")
    logits[6, 0] = float("inf")
    never = torch.zeros(vocab - 4, dtype=torch.bool)
    masks = [None, None, None, None, never, never, None, torch.ones(vocab),
             torch.ones(2, vocab, dtype=torch.bool), [True] * vocab]
    calls: list[str] = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func: Callable, types: object, args: tuple = (), kwargs: dict | None = None
                               ) -> Any:
            calls.append(getattr(func, "__name__", ""))
            return func(*args, **(kwargs or {}))

    with Watch():
        result = sampler.sample(logits, list(range(len(masks))), masks)
    assert "multinomial" not in calls and calls  # the watch saw the step, and no multinomial in it
    expected = alone.sample(logits[:2], [0, 1], [None, None])
    assert result.tokens[:2] == expected.tokens and result.errors[:2] == [None, None]
    assert result.logprobs[1] == expected.logprobs[1] is not None
    assert result.tokens[2:] == [-1] * len(bad)
    assert all(isinstance(e, SamplingError) for e in result.errors[2:])
    assert all("malformed" in str(e) for e in result.errors[7:])
    assert result.logprobs[2] is None
    # The good rows go on as they would alone.
    for _ in range(5):
        logits = torch.randn(2, vocab, generator=g)
        assert sampler.sample(logits, [0, 1], [None, None]).tokens == alone.sample(logits, [0, 1], [None, None]).tokens


def test_a_failed_step_leaves_the_penalty_state_untouched() -> None:
    vocab = 12
    options = SamplingOptions(repetition_penalty=2.0, frequency_penalty=1.0)
    sampler, fresh = _sampler(vocab, [(options, [5])]), _sampler(vocab, [(options, [5])])
    for logits in (torch.full((1, vocab), float("nan")), torch.randn(1, vocab)):
        logits[0, 0] = 3.0  # the id a failed row would be clamped to
        assert sampler.sample(logits, [0], [torch.zeros(vocab, dtype=torch.bool)]).tokens == [-1]
    logits = torch.randn(1, vocab) + 1
    index = torch.tensor([0])
    assert torch.equal(sampler._penalize(logits, index, [options]), fresh._penalize(logits, index, [options]))


def test_logprobs_are_log_softmax_of_the_raw_logits() -> None:
    vocab = 50
    rows = [
        (SamplingOptions(logprobs=True), [1]),
        (SamplingOptions(temperature=0.9, seed=3, logprobs=True, top_logprobs=3, repetition_penalty=1.5), [1, 2]),
        (SamplingOptions(logprobs=True, top_logprobs=5, presence_penalty=1.0), [3]),
        (SamplingOptions(temperature=1.0), [4]),
    ]
    sampler = _sampler(vocab, rows)
    g = torch.Generator().manual_seed(7)
    for step in range(10):
        logits = torch.randn(len(rows), vocab, generator=g) * 4
        masks = [None, None, _random_mask(g, vocab), None]
        result = sampler.sample(logits, list(range(len(rows))), masks)
        assert result.logprobs[3] is None
        for i, k in [(0, 0), (1, 3), (2, 5)]:
            entry, expected = result.logprobs[i], torch.log_softmax(logits[i].float(), dim=-1)
            assert entry is not None and entry.token_id == result.tokens[i]
            assert entry.logprob == float(expected[entry.token_id].double())
            values, ids = torch.topk(expected, k)
            assert [t for t, _ in entry.top] == ids.tolist()
            assert [v for _, v in entry.top] == values.double().tolist()
            assert [v for _, v in entry.top] == sorted((v for _, v in entry.top), reverse=True)
        if result.tokens[0] != -1:  # greedy without penalties: the token is the top-1
            assert result.tokens[0] == int(logits[0].argmax())


def test_masks_shorter_or_longer_than_the_vocabulary() -> None:
    vocab = 20
    sampler = _sampler(vocab, [(SamplingOptions(), []), (SamplingOptions(temperature=1.0, seed=1), [])] * 2)
    logits = torch.arange(vocab, dtype=torch.float32).expand(4, vocab).contiguous()  # the best ids are last
    short = torch.zeros(vocab - 6, dtype=torch.bool)
    short[[3, 7]] = True
    long = torch.zeros(vocab + 5, dtype=torch.bool)
    long[[5, vocab + 1, vocab + 4]] = True  # ids past the vocabulary are ignored
    for _ in range(10):
        result = sampler.sample(logits, [0, 1, 2, 3], [short, short, long, long])
        assert result.tokens[0] == 7 == sample_token(apply_constraint(logits[0], _Mask(short)), SamplingOptions(), None)
        assert result.tokens[1] in (3, 7)
        assert result.tokens[2] == 5 and result.tokens[3] == 5


def test_a_released_slot_readmitted_starts_clean() -> None:
    vocab = 24
    g = torch.Generator().manual_seed(8)
    options = SamplingOptions(repetition_penalty=2.0, presence_penalty=1.5, frequency_penalty=0.5)
    seeded = SamplingOptions(temperature=1.0, seed=77, frequency_penalty=1.0)
    used = _sampler(vocab, [(options, [1, 2, 3]), (seeded, [4])])
    for _ in range(8):
        used.sample(torch.randn(2, vocab, generator=g) * 0.3, [0, 1], [None, None])
    used.release(0)
    used.release(1)
    with pytest.raises(ValueError, match="no admitted request"):
        used.sample(torch.zeros(1, vocab), [0], [None])
    used.admit(0, options, [5])
    used.admit(1, seeded, [6])
    fresh = _sampler(vocab, [(options, [5]), (seeded, [6])])
    for _ in range(8):
        logits = torch.randn(2, vocab, generator=g) * 0.3
        index = torch.tensor([0, 1])
        assert torch.equal(used._penalize(logits, index, [options, seeded]),
                           fresh._penalize(logits, index, [options, seeded]))
        assert used.sample(logits, [0, 1], [None, None]) == fresh.sample(logits, [0, 1], [None, None])


def test_ensure_slots_grows_and_keeps_the_state() -> None:
    vocab = 24
    g = torch.Generator().manual_seed(9)
    first = [(SamplingOptions(repetition_penalty=1.8, frequency_penalty=0.7), [1, 2]),
             (SamplingOptions(temperature=1.0, seed=5, presence_penalty=1.0), [3])]
    late = (SamplingOptions(repetition_penalty=1.4, temperature=0.8, seed=6, logprobs=True), [4, 5])
    grown = _sampler(vocab, first, slots=2)
    grown.ensure_slots(1)  # never shrinks
    assert grown.slots == 2
    roomy = _sampler(vocab, first, slots=6)
    for _ in range(6):
        logits = torch.randn(2, vocab, generator=g) * 0.3
        assert grown.sample(logits, [0, 1], [None, None]) == roomy.sample(logits, [0, 1], [None, None])
    grown.ensure_slots(6)
    assert grown.slots == 6
    for sampler in (grown, roomy):
        sampler.admit(4, *late)
    for _ in range(6):
        logits = torch.randn(3, vocab, generator=g) * 0.3
        index = torch.tensor([0, 1, 4])
        options = [first[0][0], first[1][0], late[0]]
        assert torch.equal(grown._penalize(logits, index, options), roomy._penalize(logits, index, options))
        assert grown.sample(logits, [0, 1, 4], [None] * 3) == roomy.sample(logits, [0, 1, 4], [None] * 3)


# --- one host transfer per step -----------------------------------------------------------------

# Calls that make the host wait for the device (on CUDA), besides the one `.tolist()` allowed.
_WAITS = {
    "item", "__bool__", "__int__", "__float__", "__index__", "__complex__", "cpu", "numpy", "__repr__",
    "__str__", "__format__", "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive",
    "equal", "allclose", "is_nonzero", "repeat_interleave", "bincount", "multinomial",
}


def _names_cpu(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return value.device.type == "cpu"
    return value == "cpu" or (isinstance(value, torch.device) and value.type == "cpu")


class _HostSyncs(TorchFunctionMode):
    """Records the calls that copy device data to the host or wait on it."""

    def __init__(self) -> None:
        super().__init__()
        self.tolist = 0
        self.others: list[str] = []

    def __torch_function__(self, func: Callable, types: object, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", repr(func))
        if name == "tolist":
            self.tolist += 1
        elif name in _WAITS:
            self.others.append(name)
        elif name in ("to", "copy_") and any(_names_cpu(a) for a in [*args[1:], *kwargs.values()]):
            self.others.append(name)  # to the host (a CPU device, or copying into a CPU tensor)
        elif name in ("__getitem__", "__setitem__", "index_put_", "index_put", "where") and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bool
            for a in (args[1] if len(args) > 1 and isinstance(args[1], tuple) else args[1:2])
        ) or (name == "where" and len(args) == 1):
            self.others.append(name)  # boolean indexing: the result's size is data-dependent
        return func(*args, **kwargs)


def test_the_sync_counter_sees_host_syncs() -> None:
    x = torch.ones(3)
    with _HostSyncs() as syncs:
        x.sum().item()
        int(x[0])
        bool(x.any())
        x[x > 0]
        x.to("cpu")
        x.tolist()
    assert syncs.tolist == 1
    assert syncs.others == ["item", "__int__", "__bool__", "__getitem__", "to"]


def test_one_host_transfer_per_step_for_a_mixed_batch() -> None:
    vocab = 64
    rows = [
        (SamplingOptions(), [1]),
        (SamplingOptions(temperature=0.8, seed=3), [2]),
        (SamplingOptions(temperature=1.0, top_k=5, seed=4), [3]),
        (SamplingOptions(temperature=1.2, top_p=0.7), [4]),
        (SamplingOptions(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2), [5, 6]),
        (SamplingOptions(temperature=0.7, logprobs=True, top_logprobs=3, repetition_penalty=1.1), [7]),
        (SamplingOptions(logprobs=True), [8]),
        (SamplingOptions(), [9]),
    ]
    sampler = _sampler(vocab, rows)
    g = torch.Generator().manual_seed(10)
    mask = _random_mask(g, vocab - 3)
    logits = torch.randn(len(rows), vocab, generator=g)
    logits[7] = float("nan")  # a failing row is detected on the device too
    with _HostSyncs() as syncs:
        result = sampler.sample(logits, list(range(len(rows))), [None, None, None, mask, None, None, mask, None])
    assert isinstance(result, SampledStep)
    assert syncs.tolist == 1 and syncs.others == []
    assert result.tokens[7] == -1 and result.errors[6] is None and result.logprobs[5] is not None
    assert len(result.logprobs[5].top) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_cuda_sync_per_step() -> None:
    vocab = 1000
    device = torch.device("cuda")
    rows = [SamplingOptions(), SamplingOptions(temperature=0.8, seed=3, top_p=0.9, repetition_penalty=1.2),
            SamplingOptions(temperature=1.0, logprobs=True, top_logprobs=3, frequency_penalty=0.5)]
    sampler = BatchSampler(vocab, device, len(rows))
    for slot, options in enumerate(rows):
        sampler.admit(slot, options, [1, 2, 3])
    logits = torch.randn(len(rows), vocab, device=device)
    mask = torch.rand(vocab - 7) < 0.5
    sampler.sample(logits, [0, 1, 2], [mask, None, None])  # warm the pinned-memory cache
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning) as warned:
            sampler.sample(logits, [0, 1, 2], [mask, None, None])
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert len([w for w in warned if "synchroniz" in str(w.message)]) == 1


# --- argument checks ----------------------------------------------------------------------------


def test_admit_refuses_prompt_ids_outside_the_vocabulary_and_changes_nothing() -> None:
    sampler = BatchSampler(10, CPU, 2)
    with pytest.raises(SamplingError, match="outside"):
        sampler.admit(0, SamplingOptions(repetition_penalty=1.2), [3, 10])
    with pytest.raises(ValueError, match="no admitted request"):
        sampler.sample(torch.zeros(1, 10), [0], [None])
    sampler.admit(0, SamplingOptions(), [3, 10])  # without the penalty the ids are never used
    assert sampler.sample(torch.eye(10)[:1], [0], [None]).tokens == [0]
    with pytest.raises(ValueError, match="ensure_slots"):
        sampler.admit(2, SamplingOptions(), [])


def test_sample_refuses_arguments_that_disagree() -> None:
    sampler = _sampler(10, [(SamplingOptions(), []), (SamplingOptions(), [])])
    with pytest.raises(ValueError, match=r"\[2, 10\]"):
        sampler.sample(torch.zeros(2, 11), [0, 1], [None, None])
    with pytest.raises(ValueError, match="own slot"):
        sampler.sample(torch.zeros(2, 10), [0, 0], [None, None])
    with pytest.raises(ValueError, match="one mask"):
        sampler.sample(torch.zeros(2, 10), [0, 1], [None])
    assert sampler.sample(torch.zeros(0, 10), [], []) == SampledStep([], [], [])


def test_a_top_p_below_the_smallest_float32_keeps_the_likeliest_token() -> None:
    """top_p=5e-324 is valid (in (0, 1]) but rounds to 0 in fp32: it must act as greedy, not fail the row."""
    sampler = BatchSampler(8, torch.device("cpu"), slots=1)
    sampler.admit(0, SamplingOptions(temperature=1.0, top_p=5e-324, seed=1), [1, 2])
    logits = torch.tensor([[0.1, 3.0, 0.2, -1.0, 0.0, 0.5, 0.3, 0.4]])
    step = sampler.sample(logits, [0], [None])
    assert step.errors == [None] and step.tokens == [1]
