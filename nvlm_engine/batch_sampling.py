"""Batched choice of the next token for a whole decode step, with one device-to-host transfer.

`BatchSampler` keeps the sampling state of every request slot on the logits' device: its
options as a row of parameters, its seeded `torch.Generator`, and the per-vocabulary state of
its penalties (the ids seen in the prompt and the answer, the counts of generated ids). Its
`sample()` takes the step's logits [B, V] and the rows' masks of allowed ids, and applies, for
all rows at once on the device: the repetition penalty, the presence/frequency penalties, the
masks, then greedy argmax or temperature, top-k, top-p and an inverse-CDF draw. The chosen
tokens update the penalty state on the device, and tokens, a per-row success flag and the
requested logprobs cross to the host together in a single `.tolist()`.

What it knows: `SamplingOptions`, the penalty formulas of `sampling.py` (greedy tokens equal
today's per-row `sample_token` exactly: tested on CPU; on CUDA the repetition penalty follows
torch's rounding of `x / python_float`, see `_penalize`), raw-logit logprobs (`TokenLogprob`).
What it does not know: models, caches, tokenizers, constraints (callers build the masks and
call `accept()`), stop conditions or which tokens end a request. It records every chosen token
in its slot's penalty state; a slot whose request ends is `release()`d and re-`admit()`ted clean.

A seeded row's draw uses one uniform number per step from its own generator, so its tokens
depend on its seed and logits only; the draw is not `torch.multinomial`'s, so sampled tokens
differ from `sample_token`'s for the same seed (the distribution is the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import SamplingError
from .generation_records import TokenLogprob
from .sampling import SamplingOptions

__all__ = ["BatchSampler", "SampledStep"]

# Columns of the per-slot parameter rows (fp32 on the device).
_TEMPERATURE, _TOP_P, _TOP_K, _REPETITION, _INV_REPETITION, _PRESENCE, _FREQUENCY = range(_COLUMNS := 7)

_NOT_CHOSEN = "no next token can be chosen: the logits are NaN or infinite, or every token is forbidden"


@dataclass(frozen=True)
class SampledStep:
    """The outcome of one `BatchSampler.sample()` call, one entry per row given.

    Attributes:
        tokens: the chosen token id per row; -1 for a failed row.
        logprobs: per row, the chosen token's `TokenLogprob` (raw logits) when that row's
            options ask for logprobs and a token was chosen, else None.
        errors: per row, the `SamplingError` explaining why no token could be chosen, else None.
    """

    tokens: list[int]
    logprobs: list[TokenLogprob | None]
    errors: list[Exception | None]


class BatchSampler:
    """Per-slot sampling state on one device; samples a whole decode step with one host transfer.

    Slots are small integers the caller assigns to live requests (`admit` / `release`); a
    decode step passes the slots of its rows in the logits' row order.
    """

    @torch.inference_mode()
    def __init__(self, vocab_size: int, device: torch.device, slots: int) -> None:
        """Allocate the state of `slots` slots for logits of width `vocab_size` on `device`.

        Raises:
            ValueError: `vocab_size` < 1 or `slots` < 0.
        """
        if vocab_size < 1 or slots < 0:
            raise ValueError(f"need vocab_size >= 1 and slots >= 0, got {vocab_size} and {slots}")
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.slots = 0
        self._options: list[SamplingOptions | None] = []
        self._generators: list[torch.Generator | None] = []
        self._params = torch.zeros((0, _COLUMNS), dtype=torch.float32, device=self.device)
        # Allocated at the first admitted request that needs them ([slots, V] each).
        self._seen: torch.Tensor | None = None  # bool: prompt and generated ids (repetition)
        self._counts: torch.Tensor | None = None  # fp32: generated ids (presence, frequency)
        self.ensure_slots(slots)

    @torch.inference_mode()
    def ensure_slots(self, slots: int) -> None:
        """Grow the per-slot state to at least `slots` slots; existing slots keep their state."""
        extra = slots - self.slots
        if extra <= 0:
            return
        self._options += [None] * extra
        self._generators += [None] * extra
        self._params = torch.cat([self._params, self._params.new_zeros((extra, _COLUMNS))])
        if self._seen is not None:
            self._seen = torch.cat([self._seen, self._seen.new_zeros((extra, self.vocab_size))])
        if self._counts is not None:
            self._counts = torch.cat([self._counts, self._counts.new_zeros((extra, self.vocab_size))])
        self.slots = slots

    @torch.inference_mode()
    def admit(self, slot: int, options: SamplingOptions, prompt_ids: Sequence[int]) -> None:
        """Start a request in `slot`: its options, seeded generator and fresh penalty state.

        The repetition penalty's seen ids start as `prompt_ids`; the presence/frequency counts
        start at zero. Nothing is changed when this raises.

        Raises:
            ValueError: `slot` is outside [0, slots).
            SamplingError: a prompt id is outside [0, vocab_size) while the repetition penalty
                is on (it could not be marked as seen).
            Exception: whatever seeding the generator raises (that request alone fails).
        """
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is outside [0, {self.slots}); call ensure_slots first")
        generator = options.generator(self.device)
        repetition = options.repetition_penalty != 1.0
        ids: list[int] = []
        if repetition:
            ids = [int(t) for t in prompt_ids]
            if ids and not 0 <= min(ids) <= max(ids) < self.vocab_size:
                raise SamplingError(f"a prompt token id is outside [0, {self.vocab_size}), the logits' width")
        V = self.vocab_size
        top_k = min(options.top_k, V) if options.top_k > 0 else V
        row = [
            options.temperature if not options.greedy else 1.0,
            options.top_p if options.top_p < 1.0 else float("inf"),
            float(top_k),
            options.repetition_penalty,
            1.0 / options.repetition_penalty,  # double, then fp32: what CUDA's `x / scalar` multiplies by
            options.presence_penalty,
            options.frequency_penalty,
        ]
        self._params[slot] = self._upload(torch.tensor(row, dtype=torch.float32))
        if repetition:
            if self._seen is None:
                self._seen = torch.zeros((self.slots, V), dtype=torch.bool, device=self.device)
            self._seen[slot] = False
            if ids:
                self._seen[slot].index_fill_(0, self._upload(torch.tensor(ids, dtype=torch.long)), True)
        if options.presence_penalty or options.frequency_penalty:
            if self._counts is None:
                self._counts = torch.zeros((self.slots, V), dtype=torch.float32, device=self.device)
            self._counts[slot] = 0.0
        self._options[slot] = options
        self._generators[slot] = generator

    def release(self, slot: int) -> None:
        """Forget the request in `slot`; the slot is free for the next `admit`."""
        if 0 <= slot < self.slots:
            self._options[slot] = None
            self._generators[slot] = None

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, slots: Sequence[int], masks: Sequence[torch.Tensor | None]) -> SampledStep:
        """Choose one token per row, update the rows' penalty state, and copy to the host once.

        Per row, on the device and batched: repetition penalty (CTRL rule, prompt + generated
        ids), presence/frequency penalties (generated ids), the mask, then greedy argmax
        (temperature 0) or temperature, top-k, top-p and a draw with the row's generator.
        Logprobs are `log_softmax` of the raw `logits` (before penalties, temperature, masks).

        Args:
            logits: [B, V] logits of the rows, on this sampler's device (fp32; other float
                dtypes are converted). Not modified.
            slots: the admitted slot of each row (B distinct slots).
            masks: per row, a bool [<= V] mask of the allowed ids (shorter masks are padded
                with False, longer ones cut; any device), or None for any id.

        Returns:
            The tokens, logprobs and per-row errors: a row whose logits are NaN, whose
            distribution is not finite, whose mask forbids every id or is malformed (not a 1-D
            bool tensor) gets token -1 and a `SamplingError`; the other rows are unaffected.

        Raises:
            ValueError: the arguments disagree (shapes, device, a slot not admitted or repeated).
        """
        V = self.vocab_size
        B = len(slots)
        options = self._check(logits, slots, masks)
        if B == 0:
            return SampledStep([], [], [])
        errors: list[Exception | None] = [None] * B
        sampled = [i for i, o in enumerate(options) if not o.greedy]
        logprob_rows = [i for i, o in enumerate(options) if o.logprobs]
        cpu_rows, cpu_masks, dev_rows, dev_masks = [], [], [], []
        for i, mask in enumerate(masks):
            if mask is None:
                continue
            problem = _mask_problem(mask)
            if problem is not None:
                errors[i] = SamplingError(f"the row's mask of allowed ids is malformed: {problem}")
                mask = torch.zeros(V, dtype=torch.bool)  # forbids every id: the row fails on the device
            mask = mask[:V]
            if mask.shape[0] < V:
                mask = torch.nn.functional.pad(mask, (0, V - mask.shape[0]), value=False)
            on_cpu = mask.device.type == "cpu" and self.device.type != "cpu"
            (cpu_rows if on_cpu else dev_rows).append(i)
            (cpu_masks if on_cpu else dev_masks).append(mask)
        # Every index the step needs crosses to the device in one (non-blocking) copy.
        host_index = [*slots, *sampled, *cpu_rows, *dev_rows, *logprob_rows]
        index = self._upload(torch.tensor(host_index, dtype=torch.long))
        index_parts = torch.split(index, [B, len(sampled), len(cpu_rows), len(dev_rows), len(logprob_rows)])
        slot_index, sampled_index, cpu_index, dev_index, logprob_index = index_parts

        x = self._penalize(logits.float(), slot_index, options)
        if cpu_rows or dev_rows:
            allowed = torch.ones((B, V), dtype=torch.bool, device=self.device)
            if cpu_rows:
                allowed.index_copy_(0, cpu_index, self._upload(torch.stack(cpu_masks)))
            if dev_rows:
                moved = [m if m.device == self.device else m.to(self.device, non_blocking=True) for m in dev_masks]
                allowed.index_copy_(0, dev_index, torch.stack(moved))
            x = x.masked_fill(~allowed, float("-inf"))
        # Greedy for every row (cheap), then the sampled rows' draws overwrite theirs.
        tokens = torch.argmax(x, dim=-1)
        ok = ~torch.isnan(x).any(dim=-1) & (x > float("-inf")).any(dim=-1)
        if sampled:
            drawn, drawn_ok = self._draw(
                x.index_select(0, sampled_index),
                slot_index.index_select(0, sampled_index),
                [self._generators[slots[i]] for i in sampled],
                any(0 < options[i].top_k < V or options[i].top_p < 1.0 for i in sampled),
            )
            tokens = tokens.index_copy(0, sampled_index, drawn)
            ok = ok.index_copy(0, sampled_index, drawn_ok)
        tokens = torch.where(ok, tokens, -1)
        self._record(slot_index, tokens, ok, options)

        parts = [tokens.double(), ok.double()]
        k = 0
        if logprob_rows:
            k = min(max(options[i].top_logprobs for i in logprob_rows), V)
            parts.append(_logprob_columns(logits, logprob_index, tokens.index_select(0, logprob_index), k).reshape(-1))
        host = torch.cat(parts).tolist()  # the step's one device-to-host transfer

        chosen: list[int] = []
        for i in range(B):
            if errors[i] is None and not host[B + i]:
                errors[i] = SamplingError(_NOT_CHOSEN)
            chosen.append(-1 if errors[i] is not None else int(host[i]))
        logprobs: list[TokenLogprob | None] = [None] * B
        width = 1 + 2 * k
        for r, i in enumerate(logprob_rows):
            if errors[i] is None:
                values = host[2 * B + r * width : 2 * B + (r + 1) * width]
                top = tuple((int(values[1 + k + j]), values[1 + j]) for j in range(options[i].top_logprobs))
                logprobs[i] = TokenLogprob(chosen[i], values[0], top)
        return SampledStep(chosen, logprobs, errors)

    def _check(
        self, logits: torch.Tensor, slots: Sequence[int], masks: Sequence[torch.Tensor | None]
    ) -> list[SamplingOptions]:
        """The rows' options, after checking that the arguments agree (host only, no sync)."""
        B = len(slots)
        if logits.dim() != 2 or logits.shape[0] != B or logits.shape[1] != self.vocab_size:
            raise ValueError(f"logits must be [{B}, {self.vocab_size}] (rows, vocab), got {list(logits.shape)}")
        if len(masks) != B:
            raise ValueError(f"need one mask (or None) per row: {B} rows, {len(masks)} masks")
        if logits.device != self.device and not (
            self.device.index is None and logits.device.type == self.device.type
        ):
            raise ValueError(f"logits are on {logits.device}, the sampler on {self.device}")
        if not logits.is_floating_point():
            raise ValueError(f"logits must be floating point, got {logits.dtype}")
        if len(set(slots)) != B:
            raise ValueError(f"each row needs its own slot, got {list(slots)}")
        options = []
        for slot in slots:
            option = self._options[slot] if 0 <= slot < self.slots else None
            if option is None:
                raise ValueError(f"slot {slot} holds no admitted request")
            options.append(option)
        return options

    def _penalize(self, x: torch.Tensor, slot_index: torch.Tensor, options: list[SamplingOptions]) -> torch.Tensor:
        """Repetition, then presence/frequency penalties, as `sampling.py` applies them per row.

        Rows whose penalties are off are left bit-for-bit unchanged (x / 1, x * 1, x - 0 * n).
        """
        use_repetition = any(o.repetition_penalty != 1.0 for o in options)
        use_counts = any(o.presence_penalty or o.frequency_penalty for o in options)
        if not (use_repetition or use_counts):
            return x
        params = self._params.index_select(0, slot_index)
        if use_repetition:
            assert self._seen is not None
            penalty = params[:, _REPETITION : _REPETITION + 1]
            # sampling.py divides by a Python float: on CUDA torch computes that as x * fp32(1 / p),
            # with 1 / p in double (BinaryDivTrueKernel.cu), on CPU as a true fp32 division.
            if x.device.type == "cuda":
                shrunk = x * params[:, _INV_REPETITION : _INV_REPETITION + 1]
            else:
                shrunk = x / penalty
            seen = self._seen.index_select(0, slot_index)
            x = torch.where(seen, torch.where(x > 0, shrunk, x * penalty), x)
        if use_counts:
            assert self._counts is not None
            counts = self._counts.index_select(0, slot_index)
            presence = params[:, _PRESENCE : _PRESENCE + 1]
            frequency = params[:, _FREQUENCY : _FREQUENCY + 1]
            x = x - presence * (counts > 0).to(x.dtype) - frequency * counts
        return x

    def _draw(
        self, x: torch.Tensor, slots: torch.Tensor, generators: list[torch.Generator | None], filter_: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Temperature, top-k, top-p and one inverse-CDF draw per sampled row.

        Args:
            x: [S, V] penalized, masked logits of the sampled rows.
            slots: [S] their slots, on the device.
            generators: their generators (None: the default one).
            filter_: some row uses top-k or top-p (then the rows are sorted once).

        Returns:
            The drawn ids [S] and whether each row's distribution was valid [S] (bool).
        """
        params = self._params.index_select(0, slots)
        x = x / params[:, _TEMPERATURE : _TEMPERATURE + 1]
        if filter_:
            ranked, order = torch.sort(x, dim=-1, descending=True)
            kth = ranked.gather(1, params[:, _TOP_K : _TOP_K + 1].long() - 1)  # k = V when off
            ranked = ranked.masked_fill(ranked < kth, float("-inf"))
            probs = torch.softmax(ranked, dim=-1)
            # Drop a token when the mass before it already reaches top_p (inf when off); the first stays.
            drop = probs.cumsum(-1) - probs >= params[:, _TOP_P : _TOP_P + 1]
            drop[:, 0] = False  # the likeliest always stays, even for a top_p that fp32 rounds to 0
            ranked = ranked.masked_fill(drop, float("-inf"))
            # Back to vocabulary order, where every row draws, so a row that filters nothing
            # draws the same token whether or not another row of the batch made this sort.
            x = x.scatter(1, order, ranked)
        probs = torch.softmax(x, dim=-1)
        valid = torch.isfinite(probs).all(dim=-1)
        cdf = probs.double().cumsum(-1)
        total = cdf[:, -1:]
        # u < 1 makes u * total < total exactly in float64, so the first cdf entry above it is a
        # token with mass; the clamp only keeps invalid (NaN) rows in range.
        pick = torch.searchsorted(cdf, self._uniforms(generators)[:, None] * total, right=True)
        return pick[:, 0].clamp(max=x.shape[-1] - 1), valid

    def _uniforms(self, generators: list[torch.Generator | None]) -> torch.Tensor:
        """One uniform float64 in [0, 1) per sampled row: from its own generator when seeded.

        Unseeded rows share one draw of the device's default generator; each seeded row costs
        one small op on its generator, so its numbers never depend on the rest of the batch.
        """
        n = len(generators)
        if any(g is None for g in generators):
            u = torch.rand(n, dtype=torch.float64, device=self.device)
        else:
            u = torch.empty(n, dtype=torch.float64, device=self.device)
        for j, generator in enumerate(generators):
            if generator is not None:
                u[j : j + 1].uniform_(generator=generator)
        return u

    def _record(
        self, slot_index: torch.Tensor, tokens: torch.Tensor, ok: torch.Tensor, options: list[SamplingOptions]
    ) -> None:
        """Mark the chosen tokens as seen and counted, on the device; failed rows change nothing."""
        flat = slot_index * self.vocab_size + tokens.clamp(min=0)
        if self._seen is not None and any(o.repetition_penalty != 1.0 for o in options):
            seen = self._seen.view(-1)
            seen.index_copy_(0, flat, seen.index_select(0, flat) | ok)
        if self._counts is not None and any(o.presence_penalty or o.frequency_penalty for o in options):
            self._counts.view(-1).index_add_(0, flat, ok.to(torch.float32))

    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        """`host` (a fresh CPU tensor) on the device, without making the host wait for the GPU.

        A plain `.to("cuda")` copy synchronizes the stream; a pinned, non-blocking one does not
        (the caching host allocator keeps the pinned block until the copy is done).
        """
        if self.device.type == "cpu":
            return host
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host.to(self.device)


def _mask_problem(mask: object) -> str | None:
    """Why `mask` cannot be a row's mask of allowed ids, or None when it can."""
    if not isinstance(mask, torch.Tensor):
        return f"expected a torch.Tensor, got {type(mask).__name__}"
    if mask.dtype != torch.bool:
        return f"expected dtype torch.bool, got {mask.dtype}"
    if mask.dim() != 1:
        return f"expected a 1-D mask [vocab], got shape {list(mask.shape)}"
    return None


def _logprob_columns(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """[R, 1 + 2k] float64: the chosen token's logprob, then the top-k values and ids.

    As `generation._record_logprobs`: `log_softmax` in fp32 of the raw logits, then float64;
    ids travel as float64 (exact below 2**53) so everything crosses to the host at once.
    """
    logprobs = torch.log_softmax(logits.index_select(0, rows).float(), dim=-1)
    columns = [logprobs.gather(1, tokens.clamp(min=0)[:, None]).double()]
    if k:
        top = torch.topk(logprobs, k, dim=-1)
        columns += [top.values.double(), top.indices.double()]
    return torch.cat(columns, dim=1)
