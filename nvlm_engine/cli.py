"""`nvlm-engine`: command-line tools of the engine.

`nvlm-engine plan PATH --gpus 2xH200` prints where NVLM-D would go on those GPUs and how much
context fits, from the checkpoint's config and tensor index alone (no weights, no GPU needed).
The only module of `nvlm_engine` that knows click; library errors become `ClickException`s here.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from .checkpoint import INDEX_FILE, check_tensors, files_inside, index_entry, infer_dummy_heads, read_tensor_infos
from .config import NVLMConfig
from .devices import parse_bytes, parse_gpu_spec, resolve_dtype
from .errors import NVLMError
from .placement import (
    DEFAULT_OVERHEAD_BYTES,
    GIB,
    LAYERS,
    DeviceSpec,
    Footprint,
    Plan,
    format_gib,
    plan_placement,
)
from .quantization import SCHEMES, get_scheme


@click.group()
def main() -> None:
    """Tools for running NVIDIA's NVLM-D from its published checkpoint."""


def _gpu_list(ctx: click.Context, param: click.Parameter, value: str) -> list[DeviceSpec]:
    try:
        return parse_gpu_spec(value)
    except NVLMError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from e


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-g", "--gpus", required=True, metavar="SPEC", callback=_gpu_list,
              help="The GPUs: '4x80GB', '2xH200', '80GB,80GB,40GB', '2xA100-80GB'. Sizes as labelled (80GB = 80 GiB).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True,
              help="Compute dtype of the weights (and of the KV cache).")
@click.option("-q", "--quantization", type=click.Choice(["none", *SCHEMES]), default="none", show_default=True,
              help="Format of the decoder layers' linear weights.")
@click.option("-c", "--context-length", type=click.IntRange(min=1), default=None,
              help="Tokens per sequence (prompt + answer) to hold KV cache for. [default: the checkpoint's 32,768]")
@click.option("-b", "--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Sequences decoded together.")
@click.option("--cpu-offload", metavar="SIZE", default=None,
              help="Let decoder layers the GPUs cannot hold go to the CPU, up to SIZE of host memory (slow). "
                   "GB = 10^9 bytes, GiB = 2^30.")
@click.option("--first-device-share", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="The first GPU's weight in the layer split (it also holds the vision tower).")
@click.option("--overhead", metavar="SIZE", default=f"{DEFAULT_OVERHEAD_BYTES // GIB}GiB", show_default=True,
              help="Fixed reserve per device (CUDA context, workspaces, fragmentation).")
def plan(path: Path, gpus: list[DeviceSpec], dtype: str, quantization: str, context_length: int | None, batch_size: int,
         cpu_offload: str | None, first_device_share: float, overhead: str) -> None:
    """Show where NVLM-D goes on GPUS and how much context fits.

    PATH is a checkpoint folder, or a folder with just its config.json and
    model.safetensors.index.json. Exits 1 with the reason and what would fit when it does not fit.
    """
    try:
        devices = list(gpus)
        if cpu_offload:
            devices.append(DeviceSpec("cpu", parse_bytes(cpu_offload), "host memory"))
        footprint = load_footprint(path, dtype=resolve_dtype(dtype, torch.device("cuda")), quantization=quantization)
        context = context_length or footprint.config.llm.max_position_embeddings
        result = plan_placement(footprint, devices, context_length=context, batch_size=batch_size,
                                first_device_share=first_device_share, overhead_bytes=parse_bytes(overhead))
    except NVLMError as e:
        raise click.ClickException(str(e)) from e
    click.echo(format_plan(result, title=path.resolve().name))


def load_footprint(path: Path, *, dtype: torch.dtype, quantization: str | None) -> Footprint:
    """Tensor sizes of the checkpoint in `path`: shard headers when the shards are there, else the index."""
    config = NVLMConfig.from_folder(path)
    scheme = get_scheme(quantization)
    index = path / INDEX_FILE
    names, stored_bytes, shards = None, None, sorted(path.glob("*.safetensors"))
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = data["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise NVLMError(f"{index} is not a valid safetensors index ({e}); re-download it.") from e
        names, stored_bytes = list(weight_map), (data.get("metadata") or {}).get("total_size")
        # The loader's own path rules: relative names inside the folder, no links leading out.
        shards = sorted({index_entry(path, name) for name in weight_map.values()})
        if not all(shard.is_file() for shard in shards):
            shards = []  # a metadata-only folder (or a partial download): names from the index
        shards = files_inside(path, shards)
    if not shards:
        return Footprint.from_config(config, names=names, dtype=dtype, quantization=scheme, stored_bytes=stored_bytes)
    infos = read_tensor_infos(shards)
    config = infer_dummy_heads(config, infos)
    from .model import NVLMModel

    with torch.device("meta"):
        model = NVLMModel(config)
    check_tensors(model, infos)
    stored = sum(path.stat().st_size for path in shards)
    return Footprint.from_model(model, dtype=dtype, quantization=scheme, stored_dtypes={n: i.dtype for n, i in infos.items()},
                                stored_bytes=stored_bytes or stored)


def format_plan(plan: Plan, *, title: str = "NVLM-D") -> str:
    """The plan as a text table: per device its modules, GiB of weights, GiB left for KV cache, context that fits."""
    fp = plan.footprint
    form = fp.quantization.name if fp.quantization else str(fp.dtype).removeprefix("torch.")
    gpus = [d.device for d in plan.devices if not d.device.is_cpu]
    kinds = sorted({(g.label or format_gib(g.memory_bytes), g.memory_bytes) for g in gpus}, key=lambda k: -k[1])
    hardware = ", ".join(f"{sum(1 for g in gpus if g.memory_bytes == m and (g.label or format_gib(m)) == label)} x "
                         f"{label} ({format_gib(m)})" for label, m in kinds)
    parts = fp.part_bytes()
    disk = f"; {format_gib(fp.stored_bytes)} on disk" if fp.stored_bytes else ""
    lines = [
        f"{title}: {hardware or 'CPU'}, {form}, context {plan.context_length:,} tokens x batch {plan.batch_size}",
        f"weights {format_gib(fp.total_bytes)} (vision {parts['vision'] / GIB:.1f}, projector {parts['projector'] / GIB:.1f}, "
        f"LLM {parts['llm'] / GIB:.1f}{disk}); KV cache {fp.kv_bytes_per_token // 1024} KiB per token",
        "",
    ]
    header = ("device", "GPU", "memory", "weights", "reserved", "KV room", "context fits", "modules")
    rows = [header]
    for d in plan.devices:
        rows.append((
            d.device.name, d.device.label or "-", f"{d.device.memory_bytes / GIB:.1f}", f"{d.weight_bytes / GIB:.1f}",
            f"{(d.activation_bytes + d.overhead_bytes) / GIB:.1f}", f"{d.kv_room_bytes / GIB:.1f}",
            f"{d.max_tokens:,}" if d.max_tokens is not None else "-", _modules(d.modules, len(d.layers)),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    right = {2, 3, 4, 5, 6}
    for row in rows:
        cells = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    overhead = plan.devices[0].overhead_bytes
    lines.append(f"(GiB; reserved = {format_gib(overhead)} overhead + activations for prefilling "
                 f"{plan.context_length:,} tokens x {plan.batch_size}; KV room = memory left for the KV cache; "
                 f"context fits = tokens per sequence at batch {plan.batch_size})")
    lines.append("")
    limit = fp.config.llm.max_context_length()
    longest = plan.max_context_tokens or 0
    note = f"{min(longest, limit):,} tokens" + (f" (the model's limit; memory allows {longest:,})" if longest > limit else "")
    lines.append(f"Fits. Longest context at batch {plan.batch_size}: {note}.")
    lines.extend(f"Warning: {w}" for w in plan.warnings)
    return "\n".join(lines)


def _modules(units: tuple[str, ...], layer_count: int) -> str:
    """'vision_model, mlp1, ..., layers 0-25, 79 (27)': short names, layer runs compressed."""
    named = [u.rsplit(".", 1)[-1] for u in units if not u.startswith(LAYERS + ".")]
    layers = [int(u.rsplit(".", 1)[-1]) for u in units if u.startswith(LAYERS + ".")]
    runs: list[tuple[int, int]] = []
    for i in layers:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    parts = [*named, f"layers {text} ({layer_count})"] if layers else named
    return ", ".join(parts)
