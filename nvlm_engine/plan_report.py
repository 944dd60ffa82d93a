"""`nvlm-engine plan`'s words: the plan as a table, why its split differs from the model card's,
why the checkpoint is larger on disk than in memory, the tensor split against the layer split,
and the commands that run what it advises.

Every command printed here runs as is: `nvlm-chat -m MODEL --quantization bnb-8bit
--context-length 10240 --max-batch 1` uses the flag names `nvlm-chat` and `nvlm-serve` share
(`COMMAND_FLAGS`), and a suggestion of more GPUs is a `nvlm-engine plan ... --gpus` command to
check. A `--tensor-parallel` command may carry `--quantization`: every rank quantizes its own shards.
Pure text from a `Plan`, a `TensorParallelPlan` or a `PlanError`: no devices, no weights, no click.
"""

from __future__ import annotations

import math
import re
import shlex
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .placement import LAYERS, DevicePlan, DeviceSpec, Plan, PlanError
from .placement_card import split_difference
from .placement_sizes import GIB, Footprint, format_gib
from .placement_tensor import ALL_REDUCE_LATENCY_S, DecodeEstimate, SplitChoice, TensorParallelPlan

__all__ = ["COMMAND_FLAGS", "Asked", "disk_size_line", "fix_commands", "format_plan", "format_tensor_plan",
           "gpu_kinds", "run_command", "split_note"]

COMMAND_FLAGS = ("-m", "--revision", "--quantization", "--context-length", "--max-batch", "--max-memory", "--gpus",
                 "--cpu-offload", "--dtype", "--device-map", "--tensor-parallel")
"""The flags of `nvlm-chat` / `nvlm-serve` that printed commands may use."""

_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "F8_E4M3": "float8",
                "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}
_STORED_WIDTH = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8, "float8": 1}


@dataclass(frozen=True)
class Asked:
    """What the user asked `plan` for, to be repeated in the commands it prints.

    Attributes:
        model: the checkpoint as given (folder or Hugging Face id).
        revision: the hub revision, if one was given.
        dtype: the compute dtype name.
        quantization: the scheme name, or None.
        context_length: the `--context-length` given, or None for the checkpoint's default.
        batch_size: sequences decoded together.
        cpu_offload: the `--cpu-offload` size given, or None.
        split: "balanced" or "card".
        tensor_parallel: the `--tensor-parallel` ranks asked for (1: the layer split).
    """

    model: str
    revision: str | None = None
    dtype: str = "bfloat16"
    quantization: str | None = None
    context_length: int | None = None
    batch_size: int = 1
    cpu_offload: str | None = None
    split: str = "balanced"
    tensor_parallel: int = 1


def run_command(asked: Asked, **changes: object) -> str:
    """The `nvlm-chat` command that loads the model as `asked`, with `changes` (from_pretrained names) applied."""
    s = {"quantization": asked.quantization, "context_length": asked.context_length,
         "batch_size": asked.batch_size, "dtype": asked.dtype, "tensor_parallel": asked.tensor_parallel, **changes}
    words = ["nvlm-chat", "-m", asked.model]
    if asked.revision:
        words += ["--revision", asked.revision]
    if int(str(s["tensor_parallel"])) > 1:
        words += ["--tensor-parallel", str(s["tensor_parallel"])]
    if s["quantization"]:
        words += ["--quantization", str(s["quantization"])]
    if s["context_length"] is not None:
        words += ["--context-length", str(s["context_length"])]
    if s["batch_size"] != 1 or "batch_size" in changes:
        words += ["--max-batch", str(s["batch_size"])]
    if s["dtype"] != "bfloat16":
        words += ["--dtype", str(s["dtype"])]
    if asked.cpu_offload:
        words += ["--cpu-offload", asked.cpu_offload]
    if asked.split == "card":
        words += ["--device-map", "card"]
    return shlex.join(words)


def fix_commands(error: PlanError, asked: Asked, gpus: Sequence[tuple[str, int]]) -> list[str]:
    """One command per suggestion of `error`, each with what it gives in a trailing `# comment`.

    Args:
        error: the plan's failure, with its `fixes`.
        asked: what was asked.
        gpus: (label, memory bytes) of each GPU asked for, to write "more GPUs" as a `--gpus` spec.
    """
    lines = []
    for fix, text in zip(error.fixes, error.suggestions, strict=True):
        setting = re.match(r"\w+='?[\w.-]+'?:?\s*", text)  # "quantization='fp8'": the flag says it
        note = text[setting.end():] if setting else ""
        if "gpus" in fix:
            more = replace(asked, tensor_parallel=int(str(fix.get("tensor_parallel", asked.tensor_parallel))))
            command = _plan_command(more, _more_gpus(gpus, int(str(fix["gpus"]))))
            note = text
        else:
            command = run_command(asked, **fix)
        lines.append(command + (f"  # {note}" if note else ""))
    return lines


def _plan_command(asked: Asked, gpus: str) -> str:
    words = ["nvlm-engine", "plan", asked.model, "--gpus", gpus]
    if asked.revision:
        words += ["--revision", asked.revision]
    if asked.quantization:
        words += ["--quantization", asked.quantization]
    if asked.context_length is not None:
        words += ["--context-length", str(asked.context_length)]
    if asked.batch_size != 1:
        words += ["--max-batch", str(asked.batch_size)]
    if asked.dtype != "bfloat16":
        words += ["--dtype", asked.dtype]
    if asked.split == "card":
        words += ["--split", "card"]
    if asked.tensor_parallel > 1:
        words += ["--tensor-parallel", str(asked.tensor_parallel)]
    return shlex.join(words)


def _more_gpus(gpus: Sequence[tuple[str, int]], total: int) -> str:
    """A `--gpus` spec: the GPUs asked for plus more of the largest kind, `total` in all."""
    label, _memory = max(gpus, key=lambda g: g[1])
    if len(set(gpus)) == 1:
        return f"{total}x{label}"
    return ",".join([g[0] for g in gpus] + [label] * (total - len(gpus)))


def disk_size_line(fp: Footprint) -> str | None:
    """Why the checkpoint's size on disk and its size once loaded differ, from the stored dtypes.

    With the shard headers the stored dtype of every tensor is known; with only the index, the
    split between 2-byte and 4-byte tensors is inferred from its total size.
    """
    if not fp.stored_bytes:
        return None
    loaded = str(fp.dtype).removeprefix("torch.")
    head = f"On disk {format_gib(fp.stored_bytes)}, loaded {format_gib(fp.total_bytes)}: "
    numel = {name: math.prod(shape) for name, shape in fp.shapes.items()}
    total = sum(numel.values())
    quant = (f"; the decoder's linear weights as {fp.quantization.name}" if fp.quantization else "")
    if fp.stored_dtypes:
        by_dtype: Counter[str] = Counter()
        for name, count in numel.items():
            by_dtype[_DTYPE_NAMES.get(fp.stored_dtypes.get(name, ""), fp.stored_dtypes.get(name, "?"))] += count
        parts = [f"{_params(n)} as {dtype}" for dtype, n in by_dtype.most_common()]
        return (head + f"the shards store {_params(total)} parameters, {', '.join(parts)}; every floating tensor "
                f"is loaded as {loaded}{quant}.")
    extra = fp.stored_bytes - 2 * total
    if 0 < extra <= 2 * total:
        return (head + f"the shards store about {_params(extra // 2)} of the {_params(total)} parameters as float32 "
                f"(4 bytes) and the rest in 2 bytes (inferred from the index's total size); every floating tensor is "
                f"loaded as {loaded}{quant}.")
    if extra == 0:
        return head + f"the shards store all {_params(total)} parameters in 2 bytes; they load as {loaded}{quant}."
    return head + f"{_params(total)} parameters, loaded as {loaded}{quant}."


def split_note(plan: Plan, gpus: Sequence[DeviceSpec], *, card_fits: bool | None) -> str | None:
    """The line comparing a balanced plan's split over `gpus` (all asked, GPU 0 first) with the card's.

    None for a card plan, a single GPU, or a plan with CPU offload (the card has none).
    """
    if plan.split != "balanced" or len(gpus) < 2 or any(d.device.is_cpu for d in plan.devices):
        return None
    held = {d.device.name: len(d.layers) for d in plan.devices}
    return split_difference([held.get(g.name, 0) for g in gpus], [g.memory_bytes for g in gpus],
                            plan.first_device_share, card_fits=card_fits)


def format_plan(plan: Plan, *, title: str = "NVLM-D", split: str | None = None, asked: Asked | None = None,
                choice: SplitChoice | None = None) -> str:
    """The plan as text: the table per device, its split against the card's, on-disk size, the command to run it.

    Args:
        plan: the plan to show.
        title: the checkpoint's name for the first line.
        split: the `split_note` line, if any.
        asked: what was asked, for the "Run it" command; None leaves it out.
        choice: the tensor split weighed against this plan (`placement_tensor.choose_split`), if it was;
            when it is chosen, "Run it" runs it and the layer split is the alternative.
    """
    fp = plan.footprint
    lines = [_header(fp, [d.device for d in plan.devices], plan.context_length, plan.batch_size,
                     ", the model card's split" if plan.split == "card" else "", title), ""]
    lines += _table(plan.devices, plan.context_length, plan.batch_size)
    lines += ["", _fits_line(fp, plan.max_context_tokens, plan.batch_size)]
    if split:
        lines.append(split)
    if (size := disk_size_line(fp)) is not None:
        lines.append(size)
    lines.extend(f"Warning: {w}" for w in plan.warnings)
    if choice is not None:
        lines += _choice_lines(choice)
    if asked is not None:
        if choice is not None and choice.tensor:
            lines.append(f"Run it: {run_command(asked, tensor_parallel=choice.tp)}  # the tensor split, faster; "
                         "nvlm-serve takes the same flags")
            lines.append(f"Or the layer split above: {run_command(asked)}")
        else:
            lines.append(f"Run it: {run_command(asked)}  # nvlm-serve takes the same flags")
    return "\n".join(lines)


def format_tensor_plan(plan: TensorParallelPlan, *, title: str = "NVLM-D", asked: Asked | None = None,
                       estimate: DecodeEstimate | None = None) -> str:
    """A tensor-parallel plan as text: the table per rank, the decode estimates, the command to run it."""
    fp = plan.footprint
    devices = [r.device for r in plan.ranks]
    kv_head = f"{fp.kv_bytes_per_token // plan.tp // 1024} KiB per rank"
    lines = [_header(fp, devices, plan.context_length, plan.batch_size, f", tensor parallel {plan.tp}", title,
                     kv_head), ""]
    lines += _table(plan.ranks, plan.context_length, plan.batch_size, shards=plan.tp)
    lines += ["", _fits_line(fp, plan.max_context_tokens, plan.batch_size)]
    lines.append(f"KV cache room per rank: {', '.join(f'{n:,}' for n in plan.kv_tokens)} tokens (all sequences "
                 "together; every rank caches the same tokens, so the smallest bounds them).")
    if estimate is not None:
        lines.append(_estimate_line(estimate))
    if (size := disk_size_line(fp)) is not None:
        lines.append(size)
    if asked is None:
        return "\n".join(lines)
    lines.append(f"Run it: {run_command(asked)}  # nvlm-serve takes the same flags")
    return "\n".join(lines)


def gpu_kinds(devices: Sequence[DeviceSpec]) -> list[tuple[str, int]]:
    """(label, memory bytes) of each GPU, a label made from the memory where it has none: what `--gpus` specs use."""
    return [(d.label or f"{d.memory_bytes / GIB:g}GiB", d.memory_bytes) for d in devices if not d.is_cpu]


def _choice_lines(choice: SplitChoice) -> list[str]:
    """The tensor split against the layer split: whether it fits, which is chosen and why, both speeds."""
    flag = f"--tensor-parallel {choice.tp}"
    lines = []
    plan = choice.plan
    if plan is not None:
        longest = min(plan.max_context_tokens or 0, plan.footprint.config.llm.max_context_length())
        lines.append(f"Tensor split ({flag}): fits, {format_gib(plan.layer_share_bytes)} of the decoder layers per rank "
                     f"and {format_gib(plan.rank0_extra_bytes)} more on rank 0 (vision tower, projector, embeddings, "
                     f"LM head); longest context at batch {plan.batch_size}: {longest:,} tokens.")
    if choice.estimate is not None:
        lines.append(_estimate_line(choice.estimate))
    if not choice.tensor:
        lines.append(f"Layer split, not {flag}: {choice.reason.rstrip('.')}.")
    return lines


def _estimate_line(estimate: DecodeEstimate) -> str:
    """Both splits' decode bounds at batch 1 (`placement_tensor.DecodeEstimate`)."""
    tensor = (f"tensor split ~{estimate.tensor_tokens_per_s:.0f} tokens/s (with {estimate.all_reduce_s * 1e3:.1f} ms "
              f"of all-reduces at {ALL_REDUCE_LATENCY_S * 1e6:.0f} us each)" if estimate.tensor_tokens_per_s
              else "tensor split not estimated (no NVLink)")
    return (f"Decode at batch 1 with {estimate.cache_tokens:,} tokens cached, bound by {estimate.gpu} memory bandwidth "
            f"({estimate.bandwidth / 1e12:.2f} TB/s): layer split ~{estimate.layer_tokens_per_s:.0f} tokens/s, "
            f"{tensor}.")


def _header(fp: Footprint, devices: Sequence[DeviceSpec], context_length: int, batch_size: int, what: str,
            title: str, kv_share: str = "") -> str:
    """The first two lines: the hardware, the format, the context; the sizes of the parts and of a token's KV."""
    gpus = [d for d in devices if not d.is_cpu]
    kinds = sorted({(g.label or format_gib(g.memory_bytes), g.memory_bytes) for g in gpus}, key=lambda k: -k[1])
    hardware = ", ".join(f"{sum(1 for g in gpus if g.memory_bytes == m and (g.label or format_gib(m)) == label)} x "
                         f"{label} ({format_gib(m)})" for label, m in kinds)
    parts = fp.part_bytes()
    disk = f"; {format_gib(fp.stored_bytes)} on disk" if fp.stored_bytes else ""
    sizes = (f"vision {parts['vision'] / GIB:.1f}, projector {parts['projector'] / GIB:.1f}, "
             f"LLM {parts['llm'] / GIB:.1f}{disk}")
    kv = f"{fp.kv_bytes_per_token // 1024} KiB per token" + (f", {kv_share}" if kv_share else "")
    return (f"{title}: {hardware or 'CPU'}, {_form(fp)}, context {context_length:,} tokens x batch {batch_size}{what}\n"
            f"weights {format_gib(fp.total_bytes)} ({sizes}); KV cache {kv}")


def _fits_line(fp: Footprint, longest: int | None, batch_size: int) -> str:
    limit = fp.config.llm.max_context_length()
    longest = longest or 0
    allows = f" (the model's limit; memory allows {longest:,})" if longest > limit else ""
    return f"Fits. Longest context at batch {batch_size}: {min(longest, limit):,} tokens{allows}."


def _table(devices: Sequence[DevicePlan], context_length: int, batch_size: int, *, shards: int = 1) -> list[str]:
    """One row per device (or rank: `shards` > 1, each holding 1/shards of every layer listed)."""
    header = ("device", "GPU", "memory", "weights", "reserved", "KV room", "context fits", "modules")
    rows = [header]
    for d in devices:
        rows.append((
            d.device.name, d.device.label or "-", f"{d.device.memory_bytes / GIB:.1f}", f"{d.weight_bytes / GIB:.1f}",
            f"{(d.activation_bytes + d.overhead_bytes) / GIB:.1f}", f"{d.kv_room_bytes / GIB:.1f}",
            f"{d.max_tokens:,}" if d.max_tokens is not None else "-", _modules(d.modules, len(d.layers), shards),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    right = {2, 3, 4, 5, 6}
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if i in right else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row[:-1], widths, strict=True))]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    overhead = devices[0].overhead_bytes
    lines.append(f"(GiB; reserved = {format_gib(overhead)} overhead + activations for prefilling "
                 f"{context_length:,} tokens x {batch_size}; KV room = memory left for the KV cache; "
                 f"context fits = tokens per sequence at batch {batch_size})")
    return lines


def _modules(units: tuple[str, ...], layer_count: int, shards: int = 1) -> str:
    """'vision_model, mlp1, ..., layers 0-25, 79 (27)': short names, layer runs compressed ('1/2 of layers ...')."""
    named = [u.rsplit(".", 1)[-1] for u in units if not u.startswith(LAYERS + ".")]
    layers = [int(u.rsplit(".", 1)[-1]) for u in units if u.startswith(LAYERS + ".")]
    runs: list[tuple[int, int]] = []
    for i in layers:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    share = f"1/{shards} of " if shards > 1 else ""
    return ", ".join([*named, f"{share}layers {text} ({layer_count})"] if layers else named)


def _form(fp: Footprint) -> str:
    return fp.quantization.name if fp.quantization else str(fp.dtype).removeprefix("torch.")


def _params(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)

