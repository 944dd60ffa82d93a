"""Generation on a tiny random checkpoint: batching, streaming, stops, sampling, cancellation, limits."""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image

from nvlm_engine import ContextLengthError, GenerationOptionsError, NVLMEngine, PromptError
from nvlm_engine.textstream import TextStream


def _image(width: int, height: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _user(text: str, *images: Image.Image) -> list[dict]:
    parts = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


CONVERSATIONS = [
    _user("Describe the picture.", _image(800, 600, 1)),
    _user("Hi"),
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is two plus two, in a long and detailed explanation?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "Why?"},
    ],
    _user("Compare them.", _image(300, 900, 2), _image(500, 500, 3)),
]


def test_batched_greedy_equals_one_by_one(tiny_engine: NVLMEngine) -> None:
    alone = [tiny_engine.generate(c, max_new_tokens=12) for c in CONVERSATIONS]
    batched = tiny_engine.generate_batch(CONVERSATIONS, max_new_tokens=12)
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert [r.text for r in batched] == [r.text for r in alone]
    assert len({tuple(r.token_ids) for r in alone}) == len(alone)  # the requests really differ


def test_batch_with_different_lengths_finishes_each_on_its_own(tiny_engine: NVLMEngine) -> None:
    requests = [tiny_engine.prepare(c, max_new_tokens=n) for c, n in zip(CONVERSATIONS[:3], (3, 9, 5))]
    results = tiny_engine.run(requests)
    assert [r.usage.completion_tokens for r in results] == [3, 9, 5]
    assert all(r.finish_reason == "length" for r in results)


def test_usage_counts_image_tokens(tiny_engine: NVLMEngine) -> None:
    result = tiny_engine.generate(CONVERSATIONS[0], max_new_tokens=4)
    # 800x600 -> 3x2 grid + thumbnail = 7 tiles of 256 tokens (SPEC section 5)
    assert result.usage.image_tokens == 7 * 256
    assert result.usage.prompt_tokens == tiny_engine.count_tokens(CONVERSATIONS[0])
    assert result.usage.prompt_tokens > 7 * 256
    assert result.usage.completion_tokens == len(result.token_ids) == 4
    assert result.usage.total_tokens == result.usage.prompt_tokens + 4


def test_two_images_share_the_tile_budget(tiny_engine: NVLMEngine) -> None:
    # Both images tile differently at 3 and at 6 tiles (SPEC section 5), so the budget shows:
    # 1800x300 (6:1) -> 3x1 + thumbnail at 3, 6x1 + thumbnail at 6;
    # 900x900 (810,000 px) -> 1x1 at 3 (no square grid fits), 2x2 + thumbnail at 6.
    panorama, square = _image(1800, 300, 4), _image(900, 900, 5)
    assert tiny_engine.images.max_tiles == 6
    alone = tiny_engine.prepare(_user("Describe it.", panorama), max_new_tokens=1)
    assert alone.pixel_values.shape[0] == 7 and alone.image_tokens == 7 * 256  # one image keeps all 6
    shared = tiny_engine.generate(_user("Compare them.", panorama, square), max_new_tokens=1)
    # two images: max(1, 6 // 2) = 3 tiles each
    assert shared.usage.image_tokens == ((3 + 1) + 1) * 256
    asked = tiny_engine.prepare(_user("Compare them.", panorama, square), max_new_tokens=1, max_tiles=6)
    assert asked.pixel_values.shape[0] == (6 + 1) + (4 + 1)  # a request's max_tiles applies to each image
    assert asked.image_tokens == 12 * 256


def test_stream_concatenates_to_the_result(tiny_engine: NVLMEngine) -> None:
    stream = tiny_engine.stream(CONVERSATIONS[1], max_new_tokens=30)
    deltas = list(stream)
    assert stream.result is not None
    assert len(deltas) > 1
    assert "".join(deltas) == stream.result.text
    assert stream.result.text == tiny_engine.generate(CONVERSATIONS[1], max_new_tokens=30).text
    assert stream.result.text == stream.result.text.strip()


def test_stop_string_cuts_the_answer_and_never_leaks(tiny_engine: NVLMEngine) -> None:
    full = tiny_engine.generate(CONVERSATIONS[1], max_new_tokens=30).text
    assert len(full) > 10
    stop = full[6:9]
    stream = tiny_engine.stream(CONVERSATIONS[1], max_new_tokens=30, stop=[stop])
    deltas = list(stream)
    assert stream.result.finish_reason == "stop"
    assert stream.result.text == full[: full.index(stop)].strip()
    assert "".join(deltas) == stream.result.text
    assert stop not in "".join(deltas)


def test_stop_token_id_and_max_new_tokens(tiny_engine: NVLMEngine) -> None:
    full = tiny_engine.generate(CONVERSATIONS[1], max_new_tokens=10)
    assert full.finish_reason == "length" and len(full.token_ids) == 10
    cut = tiny_engine.generate(CONVERSATIONS[1], max_new_tokens=10, stop_token_ids=[full.token_ids[4]])
    first = full.token_ids.index(full.token_ids[4])
    assert cut.finish_reason == "stop"
    assert cut.token_ids == full.token_ids[:first]


def test_sampling_is_reproducible_with_a_seed(tiny_engine: NVLMEngine) -> None:
    kwargs = dict(max_new_tokens=12, temperature=1.0, top_p=0.95, top_k=50)
    a = tiny_engine.generate(CONVERSATIONS[1], seed=7, **kwargs)
    b = tiny_engine.generate(CONVERSATIONS[1], seed=7, **kwargs)
    c = tiny_engine.generate(CONVERSATIONS[1], seed=8, **kwargs)
    greedy = tiny_engine.generate(CONVERSATIONS[1], max_new_tokens=12)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert a.token_ids != greedy.token_ids
    # a seeded request gives the same tokens inside a batch as alone
    batched = tiny_engine.generate_batch([CONVERSATIONS[1], CONVERSATIONS[2]], seed=7, **kwargs)
    assert batched[0].token_ids == a.token_ids


def test_top_k_one_is_greedy_and_repetition_penalty_applies(tiny_engine: NVLMEngine) -> None:
    greedy = tiny_engine.generate(CONVERSATIONS[2], max_new_tokens=16)
    top1 = tiny_engine.generate(CONVERSATIONS[2], max_new_tokens=16, temperature=0.7, top_k=1, seed=1)
    assert top1.token_ids == greedy.token_ids
    penalized = tiny_engine.generate(CONVERSATIONS[0], max_new_tokens=16, repetition_penalty=5.0)
    plain = tiny_engine.generate(CONVERSATIONS[0], max_new_tokens=16)
    assert len(set(plain.token_ids)) < len(plain.token_ids)  # the random model repeats itself
    assert len(set(penalized.token_ids)) > len(set(plain.token_ids))


def test_cancel_from_another_thread(tiny_engine: NVLMEngine) -> None:
    stream = tiny_engine.stream(CONVERSATIONS[1], max_new_tokens=500)
    first = next(stream)
    assert first
    worker = threading.Thread(target=stream.cancel)
    worker.start()
    worker.join()
    rest = list(stream)
    assert stream.result.finish_reason == "cancelled"
    assert stream.result.usage.completion_tokens < 10
    assert stream.result.text == (first + "".join(rest)).strip() or stream.result.text.startswith(first.strip())


def test_cancel_event_option(tiny_engine: NVLMEngine) -> None:
    event = threading.Event()
    event.set()
    result = tiny_engine.generate(CONVERSATIONS[1], max_new_tokens=50, cancel=event)
    assert result.finish_reason == "cancelled" and result.token_ids == []


def test_context_overflow_is_refused_before_compute(tiny_engine: NVLMEngine, monkeypatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("model compute ran for a request that cannot fit")

    monkeypatch.setattr(tiny_engine.model, "encode_images", forbidden)
    monkeypatch.setattr("nvlm_engine.generation.mixed_step", forbidden)
    monkeypatch.setattr("nvlm_engine.generation.decode_step", forbidden)
    with pytest.raises(ContextLengthError) as info:
        tiny_engine.generate(CONVERSATIONS[0], max_new_tokens=tiny_engine.context_length)
    assert info.value.context_length == tiny_engine.context_length
    assert info.value.prompt_tokens > 1792
    assert "max_new_tokens" in str(info.value)


@pytest.mark.parametrize(
    "options",
    [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2), dict(max_new_tokens=0),
     dict(repetition_penalty=0.0)],
)
def test_bad_options_are_typed_errors(tiny_engine: NVLMEngine, options: dict) -> None:
    with pytest.raises(GenerationOptionsError):
        tiny_engine.generate(CONVERSATIONS[1], **options)


@pytest.mark.parametrize(
    "messages",
    [
        "just a string",
        [{"role": "user"}],
        [{"role": "user", "content": [{"type": "audio", "audio": b"..."}]}],
        [{"role": "robot", "content": "hi"}],
        [{"role": "assistant", "content": [{"type": "image", "image": Image.new("RGB", (8, 8))}]}],
        [],
    ],
)
def test_malformed_messages_are_prompt_errors(tiny_engine: NVLMEngine, messages) -> None:
    with pytest.raises(PromptError):
        tiny_engine.generate(messages, max_new_tokens=1)


class _Bytes:
    """A byte-level decoder stand-in: token i is the single byte i (the tokenizer boundary)."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_never_splits_a_utf8_character() -> None:
    stream = TextStream(_Bytes())
    deltas = [stream.push(b) for b in "né 😀!".encode()]
    deltas.append(stream.finish())
    assert "".join(deltas) == "né 😀!"
    assert all("\ufffd" not in d for d in deltas)


def test_text_stream_holds_back_partial_stop_strings_and_whitespace() -> None:
    stream = TextStream(_Bytes(), stop=["STOP"])
    shown = []
    for b in "  hello ST":
        shown.append(stream.push(ord(b)))
    assert "".join(shown) == "hello"  # leading spaces dropped; " ST" may start a stop string
    shown.append(stream.push(ord("X")))  # "STX" is not a stop: released
    assert "".join(shown) == "hello STX"
    for b in " bye STOP after":
        shown.append(stream.push(ord(b)))
    shown.append(stream.finish())
    assert stream.stopped
    assert "".join(shown) == "hello STX bye" == stream.text


def test_text_stream_releases_a_dangling_prefix_at_the_end() -> None:
    stream = TextStream(_Bytes(), stop=["<end>"])
    shown = [stream.push(ord(c)) for c in "a <en"]
    assert "".join(shown) == "a"
    shown.append(stream.finish())
    assert "".join(shown) == "a <en" == stream.text


class _OnlyIds:
    """A constraint allowing a fixed sequence of ids, one per step, then done."""

    def __init__(self, ids: list[int], vocab: int) -> None:
        self.ids, self.vocab, self.position = ids, vocab, 0

    def allowed(self) -> torch.Tensor:
        mask = torch.zeros(self.vocab, dtype=torch.bool)
        mask[self.ids[self.position]] = True
        return mask

    def accept(self, token_id: int) -> None:
        assert token_id == self.ids[self.position]
        self.position += 1

    @property
    def done(self) -> bool:
        return self.position == len(self.ids)


def test_token_constraint_forces_the_output(tiny_engine: NVLMEngine) -> None:
    wanted = tiny_engine.tokenizer.encode(' {"name": "search"}')
    constraint = _OnlyIds(wanted, len(tiny_engine.tokenizer))
    result = tiny_engine.generate(CONVERSATIONS[1], max_new_tokens=50, constraint=constraint)
    assert result.token_ids == wanted
    assert result.finish_reason == "stop"
    assert result.text == '{"name": "search"}'
