"""The exit codes of the three commands (`nvlm-chat`, `nvlm-serve`, `nvlm-engine`): one table.

Every command maps the same failure to the same code, prints one line saying what is wrong
and what to do (a traceback only with `--debug`), and documents this table in its `--help`
(`EXIT_CODES_HELP`) and in the README.

Knows nothing of click, HTTP or LangChain: plain constants and the one lookup from an
exception to its code.
"""

from __future__ import annotations

OK = 0
FAILURE = 1  # an unexpected internal error (please report it, with --debug output)
USAGE = 2  # wrong flags or arguments (click's own code for usage errors)
INPUT = 3  # an input cannot be used: an image, PDF page, file, prompt too long, bad option value
MODEL = 4  # the checkpoint: missing folder or hub id, incomplete or mismatched files
RESOURCES = 5  # it does not fit or cannot run here: placement, memory, device, quantization
NETWORK = 6  # a port already in use, a server that cannot be reached
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
BROKEN_PIPE = 141  # the reader of stdout went away, e.g. `| head` (128 + SIGPIPE), quietly

TABLE: tuple[tuple[int, str], ...] = (
    (OK, "success"),
    (FAILURE, "unexpected internal error (rerun with --debug and report it)"),
    (USAGE, "wrong flags or arguments"),
    (INPUT, "an input cannot be used (image, PDF page, file, prompt, option value)"),
    (MODEL, "checkpoint missing, incomplete or mismatched (folder or Hugging Face id)"),
    (RESOURCES, "does not fit or cannot run here (memory, devices, quantization)"),
    (NETWORK, "port in use or server unreachable"),
    (INTERRUPTED, "interrupted (Ctrl-C)"),
    (BROKEN_PIPE, "output pipe closed by its reader (e.g. | head)"),
)

EXIT_CODES_HELP = "Exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in TABLE) + "."

# The lookup goes by class names along the error's MRO, so it imports nothing: torch,
# huggingface_hub and LangChain errors are recognized without loading those libraries.
_BY_CLASS_NAME: tuple[tuple[frozenset[str], int], ...] = (
    (frozenset({"KeyboardInterrupt"}), INTERRUPTED),
    (frozenset({"BrokenPipeError"}), BROKEN_PIPE),
    (frozenset({"CheckpointError", "HubError", "RepositoryNotFoundError", "RevisionNotFoundError",
                "EntryNotFoundError", "LocalEntryNotFoundError", "GatedRepoError"}), MODEL),
    (frozenset({"PlanError", "DeviceMapError", "QuantizationError", "OutOfMemoryError", "MemoryError",
                "KVCacheFullError"}), RESOURCES),
    (frozenset({"RemoteError", "ConnectionError", "TimeoutError"}), NETWORK),
    (frozenset({"ImageError", "PromptError", "GenerationOptionsError", "SamplingError", "GrammarError",
                "SessionError", "DocumentInputError", "PDFError", "UnsupportedContentError", "UnicodeError",
                "ValueError", "OSError"}), INPUT),
)


def code_for(error: BaseException) -> int:
    """The exit code for an error that ended a command: the table's row for its kind, else FAILURE."""
    names = {cls.__name__ for cls in type(error).__mro__}
    for kinds, code in _BY_CLASS_NAME:
        if names & kinds:
            return code
    if "out of memory" in str(error).lower():  # CUDA's RuntimeError before torch.OutOfMemoryError
        return RESOURCES
    return FAILURE
