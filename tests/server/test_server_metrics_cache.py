"""`/metrics` shows the engine's prefix-cache and image-embedding-cache counters (read at scrape time)."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nvlm_server import ServerSettings
from nvlm_server.app import _CacheCollector

from .conftest import running_server

STATS = {"prefix_queries": 7, "prefix_hits": 5, "prefix_hit_tokens": 900, "prefix_query_tokens": 1200,
         "prefix_evictions": 2, "prefix_idle_slots": 3, "image_cache_hits": 4, "image_cache_misses": 6,
         "image_cache_evictions": 1, "image_cache_entries": 5, "image_cache_bytes": 123456}

EXPECTED = {  # sample name -> (family type, STATS key)
    "nvlm_prefix_cache_queries_total": ("counter", "prefix_queries"),
    "nvlm_prefix_cache_hits_total": ("counter", "prefix_hits"),
    "nvlm_prefix_cache_hit_tokens_total": ("counter", "prefix_hit_tokens"),
    "nvlm_prefix_cache_query_tokens_total": ("counter", "prefix_query_tokens"),
    "nvlm_prefix_cache_evictions_total": ("counter", "prefix_evictions"),
    "nvlm_prefix_cache_idle_slots": ("gauge", "prefix_idle_slots"),
    "nvlm_image_cache_hits_total": ("counter", "image_cache_hits"),
    "nvlm_image_cache_misses_total": ("counter", "image_cache_misses"),
    "nvlm_image_cache_evictions_total": ("counter", "image_cache_evictions"),
    "nvlm_image_cache_entries": ("gauge", "image_cache_entries"),
    "nvlm_image_cache_bytes": ("gauge", "image_cache_bytes"),
}


class _FakeEngine:
    """Stands for NVLMEngine at the package boundary: only `cache_stats()`."""

    def __init__(self, stats: dict[str, int]) -> None:
        self.stats = dict(stats)
        self.calls = 0

    def cache_stats(self) -> dict[str, int]:
        self.calls += 1
        return dict(self.stats)


def _samples(text: str) -> dict[str, tuple[str, float]]:
    """sample name -> (family type, value) of a Prometheus text exposition."""
    return {sample.name: (family.type, sample.value)
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _scrape(registry: CollectorRegistry) -> dict[str, tuple[str, float]]:
    return _samples(generate_latest(registry).decode())


# -- the collector, with a fake engine ------------------------------------------------------------


def test_cache_collector_exposes_every_stat_with_one_call_per_scrape() -> None:
    engine = _FakeEngine(STATS)
    registry = CollectorRegistry()
    registry.register(_CacheCollector(engine))
    assert engine.calls == 0  # registering reads nothing
    samples = _scrape(registry)
    assert engine.calls == 1
    for name, (kind, key) in EXPECTED.items():
        assert samples[name] == (kind, STATS[key]), name
    engine.stats["prefix_hits"] = 6  # read lazily: the next scrape sees the new value
    assert _scrape(registry)["nvlm_prefix_cache_hits_total"] == ("counter", 6)
    assert engine.calls == 2


def test_cache_collector_exposes_nothing_without_cache_stats() -> None:
    registry = CollectorRegistry()
    registry.register(_CacheCollector(object()))
    text = generate_latest(registry).decode()
    assert "nvlm_prefix_cache" not in text and "nvlm_image_cache" not in text


def test_cache_collector_leaves_out_missing_keys_and_survives_a_failing_engine() -> None:
    registry = CollectorRegistry()
    registry.register(_CacheCollector(_FakeEngine({"prefix_hits": 1})))
    samples = _scrape(registry)
    assert samples["nvlm_prefix_cache_hits_total"] == ("counter", 1)
    assert not any(name.startswith("nvlm_image_cache") for name in samples)

    class Broken:
        def cache_stats(self) -> dict[str, int]:
            raise RuntimeError("boom")

    registry = CollectorRegistry()
    registry.register(_CacheCollector(Broken()))
    assert "nvlm_prefix_cache" not in generate_latest(registry).decode()


def test_create_app_serves_the_cache_stats_on_metrics(tiny_engine, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeEngine(STATS)
    monkeypatch.setattr(tiny_engine, "cache_stats", fake.cache_stats, raising=False)
    with running_server(tiny_engine, ServerSettings(model_name="nvlm-tiny")) as url:
        samples = _samples(httpx.get(url + "/metrics").text)
    for name, (kind, key) in EXPECTED.items():
        assert samples[name] == (kind, STATS[key]), name
    assert "nvlm_queue_depth" in samples  # the other metrics are still there


# -- the real engine (pending the lead's integration of NVLMEngine.cache_stats) -------------------


def _png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (448, 448), color).save(buffer, format="PNG")  # one tile
    return buffer.getvalue()


def _chat(url: str, content: object) -> int:
    body = {"model": "nvlm-tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 4,
            "temperature": 0}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens"]


def _cache_counters(url: str) -> dict[str, float]:
    samples = _samples(httpx.get(url + "/metrics").text)
    assert "nvlm_prefix_cache_hits_total" in samples, "the engine exposes no cache_stats() (integration pending)"
    return {name: value for name, (_, value) in samples.items() if name.startswith(("nvlm_prefix", "nvlm_image"))}


def _delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after[name] - before[name]


def test_two_identical_chat_requests_show_a_prefix_hit(server_url) -> None:
    content = "Prefix cache check: name three prime numbers above one hundred."
    _chat(server_url, content)
    before = _cache_counters(server_url)
    prompt_tokens = _chat(server_url, content)
    after = _cache_counters(server_url)
    assert _delta(after, before, "nvlm_prefix_cache_queries_total") >= 1
    assert _delta(after, before, "nvlm_prefix_cache_hits_total") >= 1
    # all but the last prompt token (recomputed for its logits) came from the first request's slot
    assert _delta(after, before, "nvlm_prefix_cache_hit_tokens_total") >= prompt_tokens - 1
    assert _delta(after, before, "nvlm_prefix_cache_query_tokens_total") >= prompt_tokens - 1


def _image_first(png: bytes, text: str) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": _data_url(png)}}, {"type": "text", "text": text}]


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def test_an_image_prefix_is_reused_only_for_the_same_image(server_url) -> None:
    red, blue = _png((200, 20, 20)), _png((20, 20, 200))
    _chat(server_url, _image_first(red, "What color is this square?"))
    before = _cache_counters(server_url)
    _chat(server_url, _image_first(red, "Describe this picture in one word."))  # same image, other question
    after = _cache_counters(server_url)
    assert _delta(after, before, "nvlm_prefix_cache_hit_tokens_total") >= 256  # the image's pads were reused

    before = after
    prompt_tokens = _chat(server_url, _image_first(blue, "What color is this square?"))  # the first's token ids
    after = _cache_counters(server_url)
    assert _delta(after, before, "nvlm_image_cache_misses_total") >= 1
    # token ids equal the first request's, but the content differs from the first pad on
    assert _delta(after, before, "nvlm_prefix_cache_hit_tokens_total") <= prompt_tokens - 256


def test_the_same_image_after_different_text_skips_the_vision_tower(server_url) -> None:
    green = _png((20, 180, 40))

    def text_first(text: str) -> list[dict]:
        return [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": _data_url(green)}}]

    _chat(server_url, text_first("Here is a picture."))
    before = _cache_counters(server_url)
    _chat(server_url, text_first("Tell me about this image, please."))  # the prefix differs before the image
    after = _cache_counters(server_url)
    assert _delta(after, before, "nvlm_image_cache_hits_total") >= 1
    assert _delta(after, before, "nvlm_image_cache_misses_total") == 0
