"""What a grammar may cost: static schema bounds, and compiles under a wall-clock budget.

xgrammar 0.2.9 on the 152k vocabulary compiles some schemas very slowly (a regex `a{1,5000}`
takes 1.7 s, `a{1,30000}` about a minute; 300 optional properties 1.7 s; 800 nested arrays
43 s), and a compile cannot be interrupted. So (1) `check_schemas` refuses schemas past
`GrammarLimits` before compiling (a pure function), and (2) `BudgetedCompiler` compiles on its
own few daemon threads, gives each compile a wall-clock budget (the caller gets
`GrammarTooComplexError` past it; the compile runs on, but the schema is remembered as refused
and the pool is bounded, so a full pool answers `GrammarBusyError` at once), and keeps results
in a bounded LRU cache. Knows nothing of tools or tokenizers: `grammar.py` builds what it compiles.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import queue
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from nvlm_engine.errors import NVLMError

__all__ = [
    "BudgetedCompiler",
    "GrammarBusyError",
    "GrammarError",
    "GrammarLimits",
    "GrammarStats",
    "GrammarTooComplexError",
    "check_schemas",
    "compiling",
]

logger = logging.getLogger(__name__)

_REFUSED_KEPT = 1024  # schemas remembered as past the time budget (keys are 32-byte digests)


class GrammarError(NVLMError, ValueError):
    """A grammar refused before or while compiling (a ValueError, like an uncompilable schema)."""


class GrammarTooComplexError(GrammarError):
    """The schema is past a `GrammarLimits` bound, or took longer than the time budget to compile."""


class GrammarBusyError(GrammarError):
    """Every compile worker is busy (with slow schemas, say): retry later."""


@dataclass(frozen=True)
class GrammarLimits:
    """What a schema may cost before it is compiled, and how long compiling it may take.

    The static bounds pass any sane extraction schema (OpenAI's structured outputs allow 5,000
    properties in all, 10 levels of nesting, 1,000 enum values) and refuse the shapes that
    make xgrammar 0.2.9 slow, measured on the 152k-token vocabulary: regex repetitions
    (`a{1,1000}` 0.08 s, `a{1,5000}` 1.7 s, growing quadratically), optional properties (300 in
    one object: 1.7 s) and deep nesting (800 levels: 43 s). Lengths and item counts cost xgrammar
    0.2.9 nothing (maxLength 10**6: 0.03 s); their bound is far past any context window.

    Attributes:
        timeout_s: wall-clock budget of one compile; past it the caller gets `GrammarTooComplexError`.
        queue_timeout_s: how long a compile may wait for a free worker before `GrammarBusyError`.
        max_schema_chars: JSON size of all the schemas of one grammar together.
        max_depth: nesting of JSON objects and arrays inside one schema (a schema level is ~2).
        max_repeat: the largest bound of one regex quantifier (`{n}`, `{n,}`, `{n,m}`).
        max_regex_size: regex atoms once quantifiers are expanded, over all patterns of a grammar
            (`(ab){1,10}c{1,5}` counts 25).
        max_count: the largest minLength/maxLength/minItems/maxItems/minProperties/maxProperties.
        max_properties: properties of one object.
        workers: compile threads; `max_pending`: compiles running or waiting, past which callers
            get `GrammarBusyError` at once; `cache_size`: compiled grammars kept (LRU).
    """

    timeout_s: float = 5.0
    queue_timeout_s: float = 5.0
    max_schema_chars: int = 256 * 1024
    max_depth: int = 64
    max_repeat: int = 1000
    max_regex_size: int = 10_000
    max_count: int = 100_000
    max_properties: int = 256
    workers: int = 2
    max_pending: int = 8
    cache_size: int = 128

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.queue_timeout_s <= 0:
            raise ValueError(f"grammar time budgets must be > 0, got {self.timeout_s} and {self.queue_timeout_s}")
        if self.workers < 1 or self.max_pending < self.workers or self.cache_size < 1:
            raise ValueError(f"need workers >= 1, max_pending >= workers and cache_size >= 1, got {self}")


@dataclass
class GrammarStats:
    """Counters of one `Grammars` (read them to see the cache work)."""

    compiles: int = 0  # compilations started on a worker
    hits: int = 0  # grammars answered from the cache
    refused: int = 0  # GrammarTooComplexError raised: limits, budget, or a schema remembered as refused
    busy: int = 0  # GrammarBusyError raised
    pending: int = 0  # compiles queued or running now, runaway ones past their budget included


_COUNT_KEYS = frozenset({"minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"})
_VALUE_KEYS = frozenset({"const", "default", "enum", "examples"})  # JSON values, not schemas: no keywords inside
_QUANTIFIER = re.compile(r"\{(\d+)(,(\d*))?\}")


def check_schemas(schemas: Iterable[tuple[str, Any]], limits: GrammarLimits | None = None) -> None:
    """Refuse schemas too costly to compile, before compiling them (a few ms for 256 KiB).

    Args:
        schemas: (what, schema) pairs that go into one grammar; `what` names the schema in errors.
        limits: the bounds (default: `GrammarLimits()`).

    Raises:
        GrammarTooComplexError: naming the schema, the bound and its `GrammarLimits` field.
    """
    limits = limits or GrammarLimits()
    chars = regex_size = 0
    for what, schema in schemas:
        regex_size += _check_one(what, schema, limits, regex_size)
        chars += len(json.dumps(schema, ensure_ascii=False))  # safe: _check_one bounded the depth
        if chars > limits.max_schema_chars:
            raise GrammarTooComplexError(f"{what}: the schemas are {chars} characters of JSON; at most "
                                         f"{limits.max_schema_chars} (GrammarLimits.max_schema_chars)")


def _check_one(what: str, schema: Any, limits: GrammarLimits, regex_size: int) -> int:
    """Walks `schema` without recursion; returns the expanded regex size it adds."""
    stack: list[tuple[Any, int, bool]] = [(schema, 1, True)]  # (node, depth, is a schema rather than a JSON value)
    while stack:
        node, depth, keywords = stack.pop()
        if depth > limits.max_depth and isinstance(node, (dict, list)):
            raise GrammarTooComplexError(f"{what} nests objects and arrays more than {limits.max_depth} levels deep "
                                         "(GrammarLimits.max_depth)")
        if isinstance(node, list):
            stack.extend((item, depth + 1, keywords) for item in node)
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            if keywords and key == "pattern" and isinstance(value, str):
                regex_size += _regex_size(what, value, limits)
            elif keywords and key == "patternProperties" and isinstance(value, dict):
                regex_size += sum(_regex_size(what, pattern, limits) for pattern in value)
            elif keywords and key in _COUNT_KEYS and isinstance(value, int) and value > limits.max_count:
                raise GrammarTooComplexError(f"{what} has {key} {value}; at most {limits.max_count} "
                                             "(GrammarLimits.max_count)")
            elif keywords and key == "properties" and isinstance(value, dict) and len(value) > limits.max_properties:
                raise GrammarTooComplexError(f"{what} has an object with {len(value)} properties; at most "
                                             f"{limits.max_properties} (GrammarLimits.max_properties)")
            if regex_size > limits.max_regex_size:
                raise GrammarTooComplexError(f"{what}: its regex patterns expand to {regex_size} atoms; at most "
                                             f"{limits.max_regex_size} (GrammarLimits.max_regex_size)")
            stack.append((value, depth + 1, keywords and key not in _VALUE_KEYS))
    return regex_size


def _regex_size(what: str, pattern: str, limits: GrammarLimits) -> int:
    """Atoms of `pattern` with each quantifier's bound multiplied in (nested groups multiply, a
    sequence or alternation adds): an upper bound of the states xgrammar builds for it."""
    groups = [[0, 0]]  # per open group: [size so far, size of the last atom]
    i = 0
    while i < len(pattern):
        c, atom = pattern[i], 1
        if c == "\\":
            i += 2
            if pattern[i - 1:i] in ("p", "P") and pattern[i:i + 1] == "{":  # \p{L}
                i = pattern.find("}", i) + 1 or len(pattern)
        elif c == "[":
            i += 2 if pattern[i + 1:i + 2] == "]" else 1  # a leading ] is literal
            while i < len(pattern) and pattern[i] != "]":
                i += 2 if pattern[i] == "\\" else 1
            i += 1
        elif c == "(":
            groups.append([0, 0])
            i += 1
            if pattern[i:i + 1] == "?":  # skip a group's flags: (?:  (?=  (?!  (?<=  (?<!  (?<name>  (?P<name>
                if pattern[i + 1:i + 2] in (":", "=", "!") or pattern[i + 1:i + 3] in ("<=", "<!"):
                    i += 2 if pattern[i + 1] != "<" else 3
                elif pattern[i + 1:i + 2] in ("<", "P"):
                    i = (pattern.find(">", i) + 1) or len(pattern)
            continue
        elif c == ")" and len(groups) > 1:
            atom = groups.pop()[0]
            i += 1
        elif c == "{" and (m := _QUANTIFIER.match(pattern, i)):
            low, high = int(m.group(1)), m.group(3)
            bound = max(low, int(high)) if high else low
            if bound > limits.max_repeat:
                raise GrammarTooComplexError(f"{what}: pattern {_clip(pattern)!r} repeats {bound} times; at most "
                                             f"{limits.max_repeat} (GrammarLimits.max_repeat)")
            group = groups[-1]
            group[0] += group[1] * (max(bound, 1) - 1)
            group[1] *= max(bound, 1)
            i = m.end()
            continue
        else:
            i += 1
            if c in "*+?|^$":
                continue  # unbounded repeats and alternation cost no more states than their atoms
        groups[-1][0] += atom
        groups[-1][1] = atom
    return sum(group[0] for group in groups)


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."

class _Job:
    """One compile: its cache key, the work, and when a worker started it."""

    def __init__(self, key: bytes, what: str, build: Callable[[], Any]) -> None:
        self.key, self.what, self.build = key, what, build
        self.future: Future[Any] = Future()
        self.started = threading.Event()
        self.started_at = 0.0


class BudgetedCompiler:
    """Compiles on `limits.workers` daemon threads under a time budget; caches results by key.

    Daemon threads, not a ThreadPoolExecutor: a compile cannot be interrupted, and an executor's
    threads are joined at interpreter exit, so one runaway schema would hold up shutdown.
    Concurrent callers with the same key share one compile.
    """

    def __init__(self, limits: GrammarLimits) -> None:
        self.limits = limits
        self.stats = GrammarStats()
        self._lock = threading.Lock()
        self._cache: OrderedDict[bytes, Any] = OrderedDict()
        self._refused: OrderedDict[bytes, tuple[str, float]] = OrderedDict()  # key -> (reason, budget it ran past)
        self._inflight: dict[bytes, _Job] = {}
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._workers = 0

    def compile(self, key_text: str, what: str, build: Callable[[], Any], timeout_s: float | None) -> Any:
        key = hashlib.sha256(key_text.encode()).digest()
        budget = self.limits.timeout_s if timeout_s is None else timeout_s
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                self.stats.hits += 1
                return compiled
            refusal = self._refused.get(key)
            if refusal is not None and budget <= refusal[1]:
                self.stats.refused += 1
                raise GrammarTooComplexError(refusal[0])
            job = self._inflight.get(key)
            if job is None:
                if self.stats.pending >= self.limits.max_pending:
                    self.stats.busy += 1
                    raise GrammarBusyError(f"all {self.stats.pending} grammar compiles in flight are still running "
                                           f"(GrammarLimits.max_pending); retry {what} later")
                job = self._inflight[key] = _Job(key, what, build)
                self.stats.pending += 1
                if self._workers < self.limits.workers:
                    self._workers += 1
                    threading.Thread(target=self._work, name=f"grammar-compile-{self._workers}", daemon=True).start()
                self._queue.put(job)
        return self._wait(job, budget)

    def count_refusal(self) -> None:
        with self._lock:
            self.stats.refused += 1

    def _wait(self, job: _Job, budget: float) -> Any:
        # 1. a free worker, within the queue budget (a job nobody started is not the schema's fault)
        if not job.started.wait(self.limits.queue_timeout_s) and job.future.cancel():
            with self._lock:
                if self._inflight.get(job.key) is job:
                    del self._inflight[job.key]
                self.stats.busy += 1
            raise GrammarBusyError(f"no grammar compiler was free for {self.limits.queue_timeout_s:g}s; "
                                   f"retry {job.what} later")
        job.started.wait()  # the cancel lost the race: a worker has it now
        # 2. the compile, within the time budget counted from its start
        try:
            return job.future.result(timeout=max(0.0, job.started_at + budget - time.monotonic()))
        except FutureTimeout:
            reason = (f"compiling {job.what} took longer than the {budget:g}s budget; simplify it (smaller "
                      "regex repetitions, fewer optional properties, less nesting)")
            with self._lock:
                self._refused[job.key] = (reason, max(budget, self._refused.get(job.key, ("", 0.0))[1]))
                self._refused.move_to_end(job.key)
                while len(self._refused) > _REFUSED_KEPT:
                    self._refused.popitem(last=False)
                self.stats.refused += 1
            raise GrammarTooComplexError(reason) from None
        except CancelledError:  # another caller of the same key gave up waiting for a worker
            with self._lock:
                self.stats.busy += 1
            raise GrammarBusyError(f"no grammar compiler was free; retry {job.what} later") from None

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if not job.future.set_running_or_notify_cancel():
                with self._lock:
                    self.stats.pending -= 1
                continue
            with self._lock:
                self.stats.compiles += 1
            job.started_at = time.monotonic()
            job.started.set()
            try:
                result = job.build()
            except Exception as e:  # noqa: BLE001 (delivered to the callers)
                self._finish(job, None)
                job.future.set_exception(e)
            else:
                self._finish(job, result)
                job.future.set_result(result)

    def _finish(self, job: _Job, result: Any) -> None:
        elapsed = time.monotonic() - job.started_at
        if elapsed > self.limits.timeout_s:
            logger.warning("compiling %s took %.1fs (budget %gs)", job.what, elapsed, self.limits.timeout_s)
        with self._lock:
            self.stats.pending -= 1
            if self._inflight.get(job.key) is job:
                del self._inflight[job.key]
            if result is not None and job.key not in self._refused:
                self._cache[job.key] = result
                while len(self._cache) > self.limits.cache_size:
                    self._cache.popitem(last=False)


@contextlib.contextmanager
def compiling(what: str) -> Iterator[None]:
    try:
        yield
    except (RuntimeError, ValueError) as e:  # xgrammar's errors on schemas it cannot express
        raise ValueError(f"cannot constrain decoding to {what}: {e}") from e
