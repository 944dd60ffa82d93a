"""How many prompt tokens a step may prefill while other requests are decoding.

A fixed chunk is right on one machine and wrong on the next: on an H200 a 512-token chunk of
Qwen2-72B costs about what a decode step does, on a CPU it costs 15-20 decode steps, and every
running stream waits for it. `ChunkBudget` measures both (moving averages of the step's wall
time, which includes the step's one device sync) and sizes the chunk so that a step that also
prefills takes at most about `1 + ALLOWANCE` times a decode-only step: running streams keep
their pace (inter-token gap bounded) while a long prompt is prefilled. With nothing decoding,
the whole configured chunk is used: nobody waits. Budgets are powers of two, so chunk
boundaries (and with them the last bits of a prefill's floats) change only when the measured
speeds really do.

Knows wall-clock times and token counts; knows nothing of models or requests.
"""

from __future__ import annotations

MIN_CHUNK = 16  # tokens: below this, per-chunk overheads dominate
ALLOWANCE = 0.75  # a prefilling step may take this much of a decode step's time more
_SMOOTHING = 0.2  # weight of the newest measurement in the moving averages


class ChunkBudget:
    """Prefill tokens per step, sized from measured decode-step time and prefill speed.

    Args:
        max_tokens: the configured chunk (`DecodeSettings.chunk_tokens`): never more.
    """

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max(1, max_tokens)
        self.decode_s: float | None = None  # a decode-only step
        self.prefill_s_per_token: float | None = None

    def tokens(self, *, decoding: bool) -> int:
        """The prefill budget of the next step; `decoding`: rows are waiting for their next token."""
        if not decoding or self.decode_s is None or self.prefill_s_per_token is None:
            return self.max_tokens
        fitting = int(ALLOWANCE * self.decode_s / max(self.prefill_s_per_token, 1e-9))
        if fitting >= self.max_tokens:
            return self.max_tokens
        power = MIN_CHUNK  # a power of two: chunk boundaries move only when the speeds really change
        while power * 2 <= fitting:
            power *= 2
        return min(power, self.max_tokens)

    def record(self, seconds: float, *, prefilled: int, decoded: bool) -> None:
        """One step took `seconds`: it prefilled `prefilled` tokens and ran a decode step or not."""
        if prefilled == 0 and decoded:
            self.decode_s = _average(self.decode_s, seconds)
        elif prefilled:
            prefill = seconds - (self.decode_s or 0.0) if decoded else seconds
            self.prefill_s_per_token = _average(self.prefill_s_per_token, max(prefill, 0.0) / prefilled)


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - _SMOOTHING) * old + _SMOOTHING * new
