"""Sampling options and the choice of the next token from logits.

`SamplingOptions` is the one object that carries every per-request generation setting; the
engine never funnels loose keyword arguments further than its public methods. Knows nothing
of models, prompts or text.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .errors import GenerationOptionsError, SamplingError

DEFAULT_MAX_NEW_TOKENS = 1024  # the model card's default

GREEDY_BELOW = 1e-5
"""Temperatures below this count as greedy (0): dividing logits by a tinier one overflows fp32
to inf, the softmax turns NaN and sampling fails. At 1e-5 sampling is already argmax for any
pair of logits more than ~1e-3 apart, so nothing a caller could want is lost."""

MAX_TOP_LOGPROBS = 20  # OpenAI's limit

SEED_MODULUS = 2**64
"""Seeds are reduced modulo 2**64, the range `torch.Generator.manual_seed` accepts. Seeds
already in [-2**63, 2**64) keep the stream torch gives them (it reads a negative seed as its
two's complement, which is what the modulo yields)."""


@dataclass(frozen=True)
class SamplingOptions:
    """Per-request generation settings.

    Attributes:
        max_new_tokens: generated tokens at most (the model card uses 1024).
        temperature: 0 means greedy (the model card's setting); > 0 samples. Finite; values
            below `GREEDY_BELOW` (1e-5) are stored as 0, greedy, so no temperature can overflow
            the logits.
        top_p: nucleus mass in (0, 1]; 1 disables it. (The checkpoint's `top_p: 0` is invalid
            and never used.)
        top_k: keep the k most likely tokens; 0 disables it.
        repetition_penalty: finite and > 0; 1 disables it (the CTRL rule, as transformers applies it).
        seed: makes sampling reproducible per request, whatever else is in the batch. Any
            integer; stored reduced modulo 2**64 (`SEED_MODULUS`), so seeding never fails.
        stop: strings that end the answer; they are not included in the text.
        stop_token_ids: token ids that end the answer besides `<|im_end|>`.
        presence_penalty: in [-2, 2]; subtracted once from the logit of every token already
            generated for this request (OpenAI's rule; 0 disables it).
        frequency_penalty: in [-2, 2]; subtracted from a token's logit once per time it was
            already generated (OpenAI's rule; 0 disables it). Both count the generated tokens
            only, not the prompt, as OpenAI and vLLM do.
        logprobs: record each generated token's log-probability (`GenerationResult.logprobs`).
        top_logprobs: 0..20 most likely alternatives recorded per token; > 0 needs `logprobs`.
        continuation: the answer continues a final assistant message, so its leading whitespace
            is kept (an answer is stripped like the reference's; a continuation's indentation,
            e.g. the body of a function, is part of it).
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    continuation: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            object.__setattr__(self, name, _finite(name, getattr(self, name)))
        object.__setattr__(self, "logprobs", bool(self.logprobs))
        object.__setattr__(self, "top_logprobs", _count("top_logprobs", self.top_logprobs))
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1] (1 disables it), got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 disables it), got {self.top_k}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2] (0 disables it), got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2] (0 disables it), got {self.frequency_penalty}"),
            (0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
             f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}"),
            (self.logprobs or not self.top_logprobs,
             f"top_logprobs={self.top_logprobs} needs logprobs=True (as in OpenAI's API)"),
        ]
        for ok, message in checks:
            if not ok:
                raise GenerationOptionsError(message)
        if self.temperature < GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)
        if self.seed is not None:
            object.__setattr__(self, "seed", _seed(self.seed))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed)
        return g


def _finite(name: str, value: object) -> float:
    """`value` as a finite float; NaN and infinities would poison the logits of the whole row."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise GenerationOptionsError(f"{name} must be a number, got {type(value).__name__}") from e
    if not math.isfinite(number):
        raise GenerationOptionsError(f"{name} must be a finite number, got {number}")
    return number


def _count(name: str, value: object) -> int:
    """`value` as an int; bools and floats are refused rather than silently truncated."""
    if isinstance(value, bool):
        raise GenerationOptionsError(f"{name} must be an integer, got bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError as e:
        raise GenerationOptionsError(f"{name} must be an integer, got {type(value).__name__}") from e


def _seed(value: object) -> int:
    """An integer seed reduced into [0, 2**64), which `torch.Generator.manual_seed` always accepts."""
    if isinstance(value, bool):
        raise GenerationOptionsError("seed must be an integer, got bool")
    try:
        return operator.index(value) % SEED_MODULUS  # type: ignore[arg-type]
    except TypeError as e:
        raise GenerationOptionsError(f"seed must be an integer, got {type(value).__name__}") from e


def make_options(
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    logprobs: bool | None = None,
    top_logprobs: int | None = None,
) -> SamplingOptions:
    """Build `SamplingOptions` from the keyword arguments of the public API (None = default)."""
    if isinstance(stop, str):
        stop = [stop]
    return SamplingOptions(
        max_new_tokens=max_new_tokens,
        temperature=temperature if temperature is not None else 0.0,
        top_p=1.0 if top_p is None else top_p,
        top_k=0 if top_k is None else top_k,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
        seed=seed,
        stop=tuple(stop or ()),
        stop_token_ids=tuple(stop_token_ids or ()),
        presence_penalty=0.0 if presence_penalty is None else presence_penalty,
        frequency_penalty=0.0 if frequency_penalty is None else frequency_penalty,
        logprobs=bool(logprobs),
        top_logprobs=0 if top_logprobs is None else top_logprobs,
    )


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive (multiply negative) logits of already-seen token ids by `penalty`.

    The CTRL rule as transformers' `RepetitionPenaltyLogitsProcessor` applies it.

    Args:
        logits: [V] fp32.
        seen: bool [V], True for the ids of prompt and generated tokens.
    """
    if penalty == 1.0:
        return logits
    seen = seen.to(logits.device)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_presence_frequency_penalty(
    logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's rule: `logits[t] -= presence * (counts[t] > 0) + frequency * counts[t]`.

    Args:
        logits: [V] fp32.
        counts: [V], how often each id was generated so far for this request (not the prompt).
    """
    if presence == 0.0 and frequency == 0.0:
        return logits
    counts = counts.to(device=logits.device, dtype=logits.dtype)
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def sample_token(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None) -> int:
    """Pick the next token from one row of fp32 logits [V].

    Raises:
        SamplingError: no token can be chosen (every id forbidden, or NaN). Checked before
            `torch.multinomial`, which on CUDA fails with a device-side assert that poisons the
            whole process instead of raising for this row.
    """
    if options.greedy:
        if bool(torch.isnan(logits).any() | ~(logits > float("-inf")).any()):
            raise SamplingError("no next token can be chosen: the logits are NaN or every token is forbidden")
        return int(torch.argmax(logits))
    logits = logits / options.temperature
    if options.top_k and options.top_k < logits.shape[-1]:
        kth = torch.topk(logits, options.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if options.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p; the first always stays.
        drop = probs.cumsum(-1) - probs >= options.top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    if not bool(torch.isfinite(probs).all()):
        raise SamplingError("no next token can be chosen: the probabilities are not finite "
                            "(NaN or infinite logits, or every token forbidden)")
    return int(torch.multinomial(probs, 1, generator=generator))


class TokenConstraint(Protocol):
    """A stateful, per-request restriction of the next token, e.g. a grammar matcher.

    The engine calls `allowed()` before each token is chosen and `accept()` after; a request
    whose constraint reports `done` ends with finish_reason "stop".
    """

    def allowed(self) -> torch.Tensor | None:
        """Boolean mask [vocab] of the ids allowed next (shorter masks are padded with False), or None for any."""
        ...

    def accept(self, token_id: int) -> None: ...

    @property
    def done(self) -> bool: ...


def apply_constraint(logits: torch.Tensor, constraint: TokenConstraint | None) -> torch.Tensor:
    """Set the logits of ids the constraint forbids to -inf."""
    if constraint is None:
        return logits
    mask = constraint.allowed()
    if mask is None:
        return logits
    mask = mask.to(device=logits.device, dtype=torch.bool)
    if mask.shape[-1] < logits.shape[-1]:
        mask = torch.nn.functional.pad(mask, (0, logits.shape[-1] - mask.shape[-1]), value=False)
    return logits.masked_fill(~mask[: logits.shape[-1]], float("-inf"))
