"""How many prompt tokens a step may prefill while other requests are decoding.

A fixed chunk is right on one machine and wrong on the next: on an H200 a 512-token chunk of
Qwen2-72B riding along with a decode step costs little more than the step (reading the weights
dominates), on a CPU it costs several steps, and every running stream waits for it. A step is
one forward pass over all its tokens (`decoder.mixed_step`), so its time is close to a line in
the number of tokens it processes, `seconds ~ fixed + per_token * tokens`. `ChunkBudget` fits
that line to the measured steps (least squares, exponentially weighted so that it follows the
machine: the step's wall time includes its one device sync) and gives a step with `rows` running
rows as many prompt tokens as keep it within `1 + ALLOWANCE` times a decode-only step of those
rows: running streams keep their pace (the inter-token gap is bounded) while a long prompt is
prefilled. With nothing decoding the whole configured chunk is used: nobody waits. Until the
line is known (the recent steps had about the same size) a step prefills as many tokens as the
last one did (`MIN_CHUNK` at first), every other step `MIN_CHUNK` more, so that the steps' sizes
differ and the next fit can be made. A fitted budget is a power of two, and at most doubles
from one step to the next, so one noisy fit costs little.

Knows wall-clock times and token counts; knows nothing of models or requests.
"""

from __future__ import annotations

MIN_CHUNK = 16  # tokens: below this, per-chunk overheads dominate
ALLOWANCE = 1.0  # a prefilling step may take this much of a decode step's time more
_DECAY = 0.98  # weight of a measurement one step older (the fit follows about the last 50 steps)
_MIN_SPREAD = float((MIN_CHUNK // 4) ** 2)  # tokens^2: the variance of the steps' sizes needed to trust the line


class ChunkBudget:
    """Prefill tokens per step, from a line fitted to measured step times vs tokens per step.

    Args:
        max_tokens: the configured chunk (`DecodeSettings.chunk_tokens`): never more.
        allowance: how much longer than a decode-only step a prefilling step may take, as a
            fraction of it (`ALLOWANCE`; `math.inf`: no bound, the whole chunk every step).
    """

    def __init__(self, max_tokens: int, *, allowance: float = ALLOWANCE) -> None:
        self.max_tokens = max(1, max_tokens)
        self.allowance = allowance
        self._sums = (0.0, 0.0, 0.0, 0.0, 0.0)  # weighted count, sum x, sum y, sum x^2, sum xy
        self._last = MIN_CHUNK  # the last budget given while rows were decoding
        self._probe = False  # the next unknown-line budget is `_last + MIN_CHUNK` (steps of two sizes)

    def tokens(self, *, rows: int) -> int:
        """The prefill budget of the next step, which decodes `rows` running rows."""
        if rows == 0 or self.allowance == float("inf"):
            return self.max_tokens
        line = self.line()
        if line is None:  # steps of one size say nothing of the slope: every other one is a bit larger
            probe, self._probe = self._probe, not self._probe
            return min(self._last + (MIN_CHUNK if probe else 0), self.max_tokens)
        self._last = min(self._fitting(rows, *line), 2 * self._last)  # at most doubling: a noisy fit costs little
        return self._last

    def _fitting(self, rows: int, fixed: float, per_token: float) -> int:
        if per_token <= 0:
            return self.max_tokens  # bigger steps measured no slower: prefill rides along for free
        fitting = int(self.allowance * max(fixed + per_token * rows, 0.0) / per_token)
        power = MIN_CHUNK  # a power of two: chunk boundaries move only when the speeds really change
        while power * 2 <= min(fitting, self.max_tokens):
            power *= 2
        return min(power, self.max_tokens)

    def record(self, seconds: float, *, tokens: int) -> None:
        """One step took `seconds` over `tokens` tokens (its decode rows plus its prefilled tokens)."""
        if tokens <= 0:
            return
        w, sx, sy, sxx, sxy = (_DECAY * s for s in self._sums)
        x = float(tokens)
        self._sums = (w + 1.0, sx + x, sy + seconds, sxx + x * x, sxy + x * seconds)

    def line(self) -> tuple[float, float] | None:
        """(seconds of a step's fixed cost, seconds per token), or None while unknown."""
        w, sx, sy, sxx, sxy = self._sums
        if w == 0:
            return None
        mean_x, mean_y = sx / w, sy / w
        spread = sxx / w - mean_x * mean_x
        if spread < _MIN_SPREAD:
            return None
        per_token = (sxy / w - mean_x * mean_y) / spread
        return mean_y - per_token * mean_x, per_token
