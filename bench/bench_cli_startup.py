"""`--help` start-up time of the three commands: median of several runs, against bare Python.

    python bench/bench_cli_startup.py            # 7 runs each
    python bench/bench_cli_startup.py --runs 15

Each run is a fresh process (`nvlm-chat --help`, `nvlm-serve --help`, `nvlm-engine --help`,
`nvlm-engine plan --help`), timed from spawn to exit; `python -c pass` is the floor every
command pays. The target is under 0.5 s: heavy libraries (torch, transformers, LangChain,
FastAPI) are imported only once a command runs. A second table lists which heavy modules a
`--help` imported (it should be none).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
COMMANDS: list[list[str]] = [
    [sys.executable, "-c", "pass"],
    [str(BIN / "nvlm-chat"), "--help"],
    [str(BIN / "nvlm-serve"), "--help"],
    [str(BIN / "nvlm-engine"), "--help"],
    [str(BIN / "nvlm-engine"), "plan", "--help"],
]
HEAVY = ("torch", "transformers", "langchain_core", "fastapi", "uvicorn", "numpy", "PIL")
TARGET_S = 0.5


def time_once(command: list[str]) -> float:
    """Seconds from spawn to exit of one run (output discarded); raises if the command fails."""
    started = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def heavy_imports(module: str, args: list[str]) -> list[str]:
    """The heavy modules loaded after running `module:main` with `args` in-process."""
    probe = (f"import sys\nfrom click.testing import CliRunner\nfrom {module} import main\n"
             f"CliRunner().invoke(main, {args!r})\n"
             f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return [m for m in result.stdout.strip().split(",") if m]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per command (after one warm-up run)")
    runs = parser.parse_args().runs
    print(f"{'command':32} {'median s':>9} {'min s':>7} {'max s':>7}  (runs: {runs}, target < {TARGET_S} s)")
    medians = {}
    for command in COMMANDS:
        time_once(command)  # warm the file cache
        samples = [time_once(command) for _ in range(runs)]
        name = " ".join([Path(command[0]).name, *command[1:]])
        medians[name] = statistics.median(samples)
        print(f"{name:32} {medians[name]:9.3f} {min(samples):7.3f} {max(samples):7.3f}")
    print()
    for module, args in (("nvlm_langchain.cli", ["--help"]), ("nvlm_server.cli", ["--help"]),
                         ("nvlm_engine.cli", ["--help"]), ("nvlm_engine.cli", ["plan", "--help"])):
        print(f"{module} {' '.join(args)}: heavy imports: {', '.join(heavy_imports(module, args)) or 'none'}")
    slow = [name for name, median in medians.items() if median >= TARGET_S]
    print(f"\n{'all under' if not slow else 'over'} {TARGET_S} s" + (f": {', '.join(slow)}" if slow else ""))


if __name__ == "__main__":
    main()
