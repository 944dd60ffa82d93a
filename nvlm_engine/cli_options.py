"""Click pieces the command lines share: `-h`, `--version`, placement options, quiet exits.

`nvlm-chat` and `nvlm-serve` (and `nvlm-engine` when it wants them) declare their placement and
memory flags here, once, with the names the Python API uses:

    --quantization {bnb-8bit,bnb-4bit,fp8}   from_pretrained(quantization=...)
    --context-length N                       context_length
    --max-batch N                            batch_size (the plan) and the scheduler's batch
    --max-memory DEVICE=SIZE (repeatable)    max_memory, e.g. 0=70GiB cpu=200GiB
    --gpus 0,1                               only these GPUs (device_map=["cuda:0", "cuda:1"])
    --cpu-offload SIZE                       layers the GPUs cannot hold go to the CPU, up to SIZE
    --download / --revision REV              fetch a Hugging Face id that is not cached; pin a revision
    --compile                                decoding=DecodeSettings(compile=True): compiled decode steps

`QuietCommand` ends a command the same way everywhere: Ctrl-C at any moment exits 130 and
a closed stdout (`| head`) exits 141, both without a traceback; other errors map to the one
exit-code table (`exit_codes.py`), shown at the end of every `--help`.

Light on purpose (click and the exit-code table only): `--help` and `--version` must not pay
for torch. Sizes are checked with the engine's own parser, imported when a value is given.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from .exit_codes import BROKEN_PIPE, EXIT_CODES_HELP, INTERRUPTED

__all__ = [
    "CONTEXT_SETTINGS",
    "QUANTIZATIONS",
    "Placement",
    "QuietCommand",
    "placement_from_options",
    "placement_options",
    "version_option",
]

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
QUANTIZATIONS = ("bnb-8bit", "bnb-4bit", "fp8")
"""The schemes of `nvlm_engine.quantization.SCHEMES` (kept equal by a test; that module imports torch)."""
PLACEMENT_PARAMS = ("quantization", "context_length", "max_batch", "max_memory", "gpus", "cpu_offload", "download",
                    "revision", "tensor_parallel", "compile")


def version_option() -> Callable[[F], F]:
    """`--version`: the command's name and the installed package's version."""
    return click.version_option(package_name="nvlm-langchain", message="%(prog)s %(version)s")


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        _check_size(value, ctx, param)
    return value


def _check_size(value: str, ctx: click.Context | None, param: click.Parameter | None) -> None:
    from .devices import parse_bytes  # imports torch: only once a value is given
    from .errors import NVLMError

    try:
        if parse_bytes(value) <= 0:
            raise click.BadParameter(f"{value!r} is not a positive size like '70GiB'", ctx, param)
    except NVLMError as e:
        raise click.BadParameter(str(e), ctx, param) from e


def _max_memory(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> dict[str | int, str] | None:
    budgets: dict[str | int, str] = {}
    for item in values:
        device, sep, size = item.partition("=")
        device = device.strip().lower()
        if not sep or not device or not size.strip():
            raise click.BadParameter(f"{item!r} is not DEVICE=SIZE (e.g. 0=70GiB, cuda:1=80GiB, cpu=200GiB)",
                                     ctx, param)
        if device.isdigit():
            key: str | int = int(device)
        elif device == "cpu" or (device.startswith("cuda:") and device[5:].isdigit()):
            key = device
        else:
            raise click.BadParameter(f"device {device!r} in {item!r} is not a GPU index, cuda:N or cpu", ctx, param)
        _check_size(size.strip(), ctx, param)
        budgets[key] = size.strip()
    return budgets or None


def _gpu_indices(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    indices: list[int] = []
    for part in (p.strip().lower().removeprefix("cuda:") for p in value.split(",")):
        if not part.isdigit():
            raise click.BadParameter(f"{value!r} is not a list of GPU indices like 0,1", ctx, param)
        if int(part) in indices:
            raise click.BadParameter(f"GPU {part} is listed twice in {value!r}", ctx, param)
        indices.append(int(part))
    return tuple(indices)


def placement_options(*, batch_aliases: Sequence[str] = (), batch_default_help: str = "plan for 1") -> Callable[[F], F]:
    """The placement and memory flags, with the Python API's names; see the module docstring.

    Args:
        batch_aliases: older spellings of --max-batch a command keeps accepting.
        batch_default_help: what the command does when --max-batch is not given.
    """
    options = [
        click.option("--quantization", type=click.Choice(QUANTIZATIONS), default=None,
                     help="Store the decoder layers' linear weights as 8-bit or 4-bit (bitsandbytes) or FP8 "
                          "(compute capability 8.9+). [default: none]"),
        click.option("--context-length", type=click.IntRange(min=1), default=None, metavar="N",
                     help="Longest prompt + answer in tokens; memory for its KV cache is reserved on each GPU. "
                          "[default: the checkpoint's 32,768]"),
        click.option("--max-batch", *batch_aliases, "max_batch", type=click.IntRange(min=1), default=None,
                     metavar="N", help=f"Sequences decoded together; memory is reserved for N. [default: "
                                       f"{batch_default_help}]"),
        click.option("--max-memory", multiple=True, callback=_max_memory, metavar="DEVICE=SIZE",
                     help="Memory budget of a device instead of its free memory, repeatable: 0=70GiB, cpu=200GiB "
                          "(GB = 10^9 bytes, GiB = 2^30)."),
        click.option("--gpus", callback=_gpu_indices, metavar="LIST",
                     help="Use only these GPUs, in this order: 0,1. [default: every visible GPU]"),
        click.option("--cpu-offload", callback=_size, metavar="SIZE",
                     help="Let layers the GPUs cannot hold go to the CPU, up to SIZE of host memory (slow)."),
        click.option("--tensor-parallel", type=click.IntRange(min=1), default=1, metavar="N",
                     help="Split every decoder layer over N processes, one per GPU (cuda:0..N-1), or N CPU "
                          "processes with --device-map cpu; N divides the heads (1, 2, 4 or 8 for NVLM-D-72B). "
                          "Choose it on N equal GPUs joined by NVLink. [default: 1, layers split over the GPUs]"),
        click.option("--compile", is_flag=True,
                     help="Run decode steps through torch.compile, as CUDA graphs on a GPU; the first "
                          "requests pay the compile time, about a minute. [default: eager]"),
        click.option("--download", is_flag=True,
                     help="Download a Hugging Face model id that is not in the local cache yet (safetensors, "
                          "configs and tokenizer files only)."),
        click.option("--revision", metavar="REV", default=None,
                     help="Branch, tag or commit of a Hugging Face model id. [default: main]"),
    ]

    def decorate(function: F) -> F:
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


@dataclass(frozen=True)
class Placement:
    """The placement flags as given; `arguments()` turns them into `from_pretrained` keyword arguments."""

    quantization: str | None = None
    context_length: int | None = None
    max_batch: int | None = None
    max_memory: Mapping[str | int, str] | None = None
    gpus: tuple[int, ...] | None = None
    cpu_offload: str | None = None
    download: bool = False
    revision: str | None = None
    tensor_parallel: int = 1
    compile: bool = False

    def arguments(self, device_map: str | list[str]) -> dict[str, Any]:
        """device_map, max_memory, context_length, batch_size, quantization, download, revision
        (and tensor_parallel when above 1, decoding=DecodeSettings(compile=True) with --compile).

        Raises:
            click.UsageError: --gpus together with a --device-map that also names devices, or
                --cpu-offload together with a different --max-memory cpu=SIZE.
        """
        max_memory = dict(self.max_memory or {})
        if self.gpus is not None:
            if device_map != "auto":
                raise click.UsageError(f"--gpus and --device-map {_text(device_map)} both choose devices; use one")
            device_map = [f"cuda:{i}" for i in self.gpus]
        if self.cpu_offload is not None:
            if max_memory.get("cpu", self.cpu_offload) != self.cpu_offload:
                raise click.UsageError(f"--cpu-offload {self.cpu_offload} and --max-memory cpu={max_memory['cpu']} "
                                       "disagree; give the CPU budget once")
            max_memory["cpu"] = self.cpu_offload
            device_map = _with_cpu(device_map, max_memory)
        arguments = {"device_map": device_map, "max_memory": max_memory or None,
                     "context_length": self.context_length, "batch_size": self.max_batch,
                     "quantization": self.quantization, "download": self.download, "revision": self.revision}
        if self.tensor_parallel > 1:  # only when asked: keeps the call the same for every other engine
            arguments["tensor_parallel"] = self.tensor_parallel
        if self.compile:
            from .cores import DecodeSettings  # imports torch: only with --compile

            arguments["decoding"] = DecodeSettings(compile=True)
        return arguments


def placement_from_options(params: Mapping[str, Any]) -> Placement:
    """The `Placement` from a command's keyword arguments (the `placement_options` ones)."""
    return Placement(**{name: params[name] for name in PLACEMENT_PARAMS})


def _with_cpu(device_map: str | list[str], max_memory: Mapping[str | int, str]) -> str | list[str]:
    """The device map with the CPU as the last, offload, device."""
    if isinstance(device_map, list):
        return device_map if "cpu" in device_map else [*device_map, "cpu"]
    if device_map == "cpu":
        return device_map
    if device_map != "auto":
        return [device_map, "cpu"]
    if any(key != "cpu" for key in max_memory):
        return device_map  # "auto" over the GPUs max_memory lists, its "cpu" entry allowing offload
    import torch

    count = torch.cuda.device_count()
    return [*(f"cuda:{i}" for i in range(count)), "cpu"] if count else device_map


def _text(device_map: str | list[str]) -> str:
    return device_map if isinstance(device_map, str) else ",".join(device_map)


class QuietCommand(click.Command):
    """A click command that ends quietly: Ctrl-C exits 130 and a closed stdout 141, no traceback.

    The exit-code table is appended to its help. In a real process (not under click's
    CliRunner) those two exits leave at once with `os._exit`, after flushing stderr: worker
    threads still running torch would otherwise abort the interpreter's shutdown
    ("terminate called without an active exception").
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("context_settings", CONTEXT_SETTINGS)
        kwargs["epilog"] = "\n\n".join(filter(None, [kwargs.get("epilog"), EXIT_CODES_HELP]))
        super().__init__(*args, **kwargs)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The epilog's paragraphs as written (the exit-code table on its own lines)."""
        if self.epilog:
            formatter.write_paragraph()
            for paragraph in self.epilog.split("\n\n"):
                with formatter.indentation():
                    formatter.write_text(paragraph)
                formatter.write_paragraph()

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except KeyboardInterrupt:
            _leave(INTERRUPTED)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            _leave(INTERRUPTED, newline=True)
        except BrokenPipeError:
            _leave(BROKEN_PIPE, silence_stdout=True)


def _leave(code: int, *, newline: bool = False, silence_stdout: bool = False) -> None:
    """Exit with `code` without a traceback (or click's "Aborted!")."""
    real_process = sys.stdout is sys.__stdout__ and sys.stderr is sys.__stderr__
    if silence_stdout and real_process:
        try:  # the interpreter's last flush of stdout would report the broken pipe again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
    if newline:
        try:
            sys.stderr.write("\n")
        except (OSError, ValueError):
            pass
    if real_process:
        for stream in (sys.stderr,):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    raise click.exceptions.Exit(code)
