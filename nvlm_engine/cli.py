"""`nvlm-engine`: command-line tools of the engine.

`nvlm-engine plan MODEL --gpus 2xH200` prints where NVLM-D would go on those GPUs and how much
context fits, from the checkpoint's config and tensor index alone (no weights, no GPU needed),
how its split compares with the model card's, why the checkpoint is larger on disk than loaded,
whether the tensor split (`--tensor-parallel N`) fits and decodes faster, and a `nvlm-chat`
command that runs the faster; when it does not fit, the commands that would. `--tensor-parallel N`
plans the tensor split alone, rank by rank. MODEL is
a folder or a Hugging Face id (its config.json and index from the cache; `--download` fetches
those two files). Exit codes are the shared table (`exit_codes.py`): a plan that does not fit
exits 5, a missing or bad checkpoint 4, bad flags 2.

The only module of `nvlm_engine` that knows click besides `cli_options`. Heavy modules (torch,
the planner) are imported when a command runs, so `--help` and `--version` answer at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .cli_options import CONTEXT_SETTINGS, QUANTIZATIONS, QuietCommand, version_option
from .exit_codes import EXIT_CODES_HELP, FAILURE, RESOURCES, USAGE, code_for

if TYPE_CHECKING:
    import torch

    from .placement import DeviceSpec, Footprint, PlanError
    from .plan_report import Asked

DEFAULT_OVERHEAD = "2GiB"  # placement_sizes.DEFAULT_OVERHEAD_BYTES (kept equal by a test; that module imports torch)


@click.group(context_settings=CONTEXT_SETTINGS, epilog=EXIT_CODES_HELP)
@version_option()
def main() -> None:
    """Tools for running NVIDIA's NVLM-D from its published checkpoint."""


def _gpu_list(ctx: click.Context, param: click.Parameter, value: str) -> list[DeviceSpec]:
    from .devices import parse_gpu_spec
    from .errors import NVLMError

    try:
        return parse_gpu_spec(value)
    except NVLMError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from e


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from .devices import parse_bytes
    from .errors import NVLMError

    if value is not None:
        try:
            if parse_bytes(value) <= 0:
                raise click.BadParameter(f"{value!r} is not a positive size like '70GiB'", ctx=ctx, param=param)
        except NVLMError as e:
            raise click.BadParameter(str(e), ctx=ctx, param=param) from e
    return value


@main.command(cls=QuietCommand)
@click.argument("model")
@click.option("-g", "--gpus", required=True, metavar="SPEC", callback=_gpu_list,
              help="The GPUs: '4x80GB', '2xH200', '80GB,80GB,40GB', '2xA100-80GB'. Sizes as labelled (80GB = 80 GiB); "
                   "a named GPU also gives its compute capability (FP8 needs 8.9+: not A100).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True,
              help="Compute dtype of the weights (and of the KV cache).")
@click.option("-q", "--quantization", type=click.Choice(["none", *QUANTIZATIONS]), default="none", show_default=True,
              help="Format of the decoder layers' linear weights.")
@click.option("-c", "--context-length", type=click.IntRange(min=1), default=None, metavar="N",
              help="Tokens per sequence (prompt + answer) to hold KV cache for. [default: the checkpoint's 32,768]")
@click.option("-b", "--max-batch", "--batch-size", "batch_size", type=click.IntRange(min=1), default=1,
              show_default=True, metavar="N", help="Sequences decoded together.")
@click.option("--cpu-offload", metavar="SIZE", default=None, callback=_size,
              help="Let decoder layers the GPUs cannot hold go to the CPU, up to SIZE of host memory (slow). "
                   "GB = 10^9 bytes, GiB = 2^30.")
@click.option("--split", type=click.Choice(["balanced", "card"]), default="balanced", show_default=True,
              help="'balanced': layers shared by memory, each GPU within its capacity; 'card': exactly the model "
                   "card's split_model() (GPU 0 counted as half a GPU, shares rounded up, the last layer on GPU 0).")
@click.option("-t", "--tensor-parallel", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="Plan the tensor split: every decoder layer over N equal GPUs, one rank each (N = the GPU "
                   "count: 2, 4 or 8 for NVLM-D-72B). 1: the layer split, with the tensor split weighed beside it.")
@click.option("--first-device-share", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="The first GPU's weight in the balanced split (it also holds the vision tower).")
@click.option("--overhead", metavar="SIZE", default=DEFAULT_OVERHEAD, show_default=True, callback=_size,
              help="Fixed reserve per device (CUDA context, workspaces, fragmentation).")
@click.option("--revision", metavar="REV", default=None, help="Branch, tag or commit of a Hugging Face id.")
@click.option("--download", is_flag=True,
              help="Fetch a Hugging Face id's config.json and tensor index if the cache lacks them (a few hundred KB).")
@click.option("--debug", is_flag=True, help="Show a traceback on unexpected errors.")
def plan(model: str, gpus: list[DeviceSpec], dtype: str, quantization: str, context_length: int | None,
         batch_size: int, cpu_offload: str | None, split: str, tensor_parallel: int, first_device_share: float,
         overhead: str, revision: str | None, download: bool, debug: bool) -> None:
    """Show where NVLM-D goes on GPUS and how much context fits.

    MODEL is a checkpoint folder (or one with just its config.json and model.safetensors.index.json),
    or a Hugging Face id such as nvidia/NVLM-D-72B found in the local cache. Prints the plan, how
    its split differs from the model card's, whether the tensor split is faster, and the nvlm-chat
    command that runs the faster; when it does not fit, the reason and commands that would fit (exit 5).
    """
    ctx = click.get_current_context()
    if tensor_parallel > 1:
        given = [flag for flag, on in (("--cpu-offload", cpu_offload), ("--split", split != "balanced"),
                                       ("--first-device-share", first_device_share != 0.5)) if on]
        if given:
            raise click.UsageError(f"{', '.join(given)} belong(s) to the layer split; drop it, or --tensor-parallel.")
    if split == "card" and cpu_offload:
        raise click.UsageError("--split card places layers on GPUs only (the card has no CPU offload); drop "
                               "--cpu-offload, or use --split balanced.")
    if split == "card" and ctx.get_parameter_source("first_device_share") is not click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--first-device-share applies to --split balanced; the card always counts GPU 0 as 0.5.")
    try:
        click.echo(_plan(model, gpus, dtype=dtype, quantization=None if quantization == "none" else quantization,
                         context_length=context_length, batch_size=batch_size, cpu_offload=cpu_offload, split=split,
                         tensor_parallel=tensor_parallel, first_device_share=first_device_share, overhead=overhead,
                         revision=revision, download=download))
    except (click.ClickException, click.exceptions.Exit, KeyboardInterrupt, BrokenPipeError):
        raise
    except Exception as e:
        if debug:
            raise
        raise _failure(e) from e


def _plan(model: str, gpus: list[DeviceSpec], *, dtype: str, quantization: str | None, context_length: int | None,
          batch_size: int, cpu_offload: str | None, split: str, tensor_parallel: int, first_device_share: float,
          overhead: str, revision: str | None, download: bool) -> str:
    """The `plan` command's output; library errors propagate (`_failure` words them)."""
    import torch

    from .devices import parse_bytes, resolve_dtype
    from .hub import PLAN_FILES, display_name, resolve_checkpoint
    from .placement import DeviceSpec, PlanError, plan_placement
    from .placement_tensor import choose_split
    from .plan_report import Asked, format_plan, split_note

    folder = resolve_checkpoint(model, revision=revision, download=download, files=PLAN_FILES)
    footprint = load_footprint(folder, dtype=resolve_dtype(dtype, torch.device("cuda")), quantization=quantization)
    limit = footprint.config.llm.max_context_length()
    if context_length is not None and context_length > limit:
        raise click.BadParameter(f"{context_length:,} is beyond NVLM-D's {limit:,} tokens (RoPE x3 with dynamic "
                                 "scaling)", param_hint="'--context-length'")
    devices = list(gpus)
    if cpu_offload:
        devices.append(DeviceSpec("cpu", parse_bytes(cpu_offload), "host memory"))
    settings: dict[str, Any] = {"context_length": context_length or footprint.config.llm.max_position_embeddings,
                                "batch_size": batch_size, "overhead_bytes": parse_bytes(overhead)}
    asked = Asked(model=model, revision=revision, dtype=dtype, quantization=quantization,
                  context_length=context_length, batch_size=batch_size, cpu_offload=cpu_offload, split=split,
                  tensor_parallel=tensor_parallel)
    title = display_name(model, folder)
    if tensor_parallel > 1:
        return _tensor_plan(footprint, gpus, asked, title, settings)
    try:
        result = plan_placement(footprint, devices, first_device_share=first_device_share, split=split, **settings)
    except PlanError as e:
        raise _does_not_fit(e, asked, gpus) from e
    choice = None
    if split == "balanced" and len(gpus) > 1 and not cpu_offload:
        choice = choose_split(footprint, gpus, **settings)
    card_fits = None
    if split == "balanced" and len(gpus) > 1 and not cpu_offload:
        try:
            plan_placement(footprint, devices, split="card", suggest=False, **settings)
            card_fits = True
        except PlanError:
            card_fits = False
    return format_plan(result, title=title, split=split_note(result, gpus, card_fits=card_fits), asked=asked,
                       choice=choice)


def _tensor_plan(footprint: Footprint, gpus: list[DeviceSpec], asked: Asked, title: str,
                 settings: dict[str, Any]) -> str:
    """`plan --tensor-parallel N`: the per-rank table, or why N cannot be used (exit 2) or does not fit (exit 5)."""
    from .errors import TensorParallelOptionsError
    from .placement import PlanError
    from .placement_tensor import estimate_decode, plan_tensor_parallel
    from .plan_report import format_tensor_plan

    try:
        result = plan_tensor_parallel(footprint, gpus, tp=asked.tensor_parallel, **settings)
    except TensorParallelOptionsError as e:
        raise click.BadParameter(str(e), param_hint="'-t' / '--tensor-parallel'") from e
    except PlanError as e:
        raise _does_not_fit(e, asked, gpus) from e
    estimate = estimate_decode(footprint, gpus[0].label, tp=result.tp, cache_tokens=result.context_length)
    return format_tensor_plan(result, title=title, asked=asked, estimate=estimate)


def _does_not_fit(error: PlanError, asked: Asked, gpus: list[DeviceSpec]) -> click.ClickException:
    """A plan's `PlanError` as exit 5, with its suggestions as commands that run as is."""
    from .plan_report import fix_commands, gpu_kinds

    commands = fix_commands(error, asked, gpu_kinds(gpus))
    message = error.problem if commands else str(error)
    if commands:
        message += "\nWhat would fit (each command runs as is):\n" + "\n".join(f"  {c}" for c in commands)
    return _Failure(message, RESOURCES)


class _Failure(click.ClickException):
    """A one-line (or few-line) failure with its exit code from the shared table."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _failure(error: Exception) -> click.ClickException:
    """A library error as a click error with the shared exit code; anything else is an internal error."""
    from .errors import NVLMError

    if isinstance(error, NVLMError):
        return _Failure(str(error), code_for(error))
    code = code_for(error)
    if code in (FAILURE, USAGE):
        return _Failure(f"internal error: {type(error).__name__}: {error} (rerun with --debug and report it)", FAILURE)
    return _Failure(f"{type(error).__name__}: {error}", code)


def load_footprint(path: Path, *, dtype: torch.dtype, quantization: str | None) -> Footprint:
    """Tensor sizes of the checkpoint in `path`: shard headers when the shards are there, else the index."""
    import torch

    from .checkpoint import INDEX_FILE, check_tensors, files_inside, index_entry, infer_dummy_heads, read_tensor_infos
    from .config import NVLMConfig
    from .errors import CheckpointError
    from .placement import Footprint
    from .quantization import get_scheme

    config = NVLMConfig.from_folder(path)
    scheme = get_scheme(quantization)
    index = path / INDEX_FILE
    names, stored_bytes, shards = None, None, sorted(path.glob("*.safetensors"))
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = data["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e}); re-download it.") from e
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
    stored_dtypes = {n: i.dtype for n, i in infos.items()}
    return Footprint.from_model(model, dtype=dtype, quantization=scheme, stored_dtypes=stored_dtypes,
                                stored_bytes=stored_bytes or stored)



if __name__ == "__main__":
    main()
