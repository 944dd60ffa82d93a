"""Peak host memory while loading a sharded checkpoint of 2 GB or more (CPU).

Writes a random NVLM-D of about 2.4 GB (bf16 shards of ~0.5 GB), then, each in a fresh
process, loads it (a) with `NVLMEngine.from_pretrained` and (b) the straightforward way as the
baseline (model built with random init on the CPU, then every shard read with
`safetensors.torch.load_file` and copied in with `load_state_dict`). Reports for each the peak
RSS above the process's baseline (VmHWM - VmRSS before loading), the size of the loaded model,
and the loader's own overhead (peak above baseline minus the model), against the target
"largest shard + 1 GiB". Run: `python bench/bench_load.py [--dtype bfloat16|float32]`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

GIB = 2**30

CHILD = r"""
import json, sys, torch
from pathlib import Path

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

folder, mode, dtype = Path(sys.argv[1]), sys.argv[2], getattr(torch, sys.argv[3])
from nvlm_engine import NVLMEngine
from nvlm_engine.config import NVLMConfig
from nvlm_engine.model import NVLMModel
from safetensors.torch import load_file
import gc; gc.collect()
before = status("VmRSS:")
if mode == "engine":
    model = NVLMEngine.from_pretrained(folder, device_map="cpu", dtype=dtype).model
else:
    model = NVLMModel(NVLMConfig.from_folder(folder)).to(dtype)
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    model.load_state_dict(state, strict=True)
    del state
peak = status("VmHWM:")
size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"before": before, "peak": peak, "model": size}))
"""


def measure(folder: Path, mode: str, dtype: str) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), mode, dtype], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--folder", type=Path, default=None, help="reuse a checkpoint folder written earlier")
    args = parser.parse_args()
    from nvlm_engine.testing import build_tiny_checkpoint, tiny_config

    folder = args.folder or Path(tempfile.mkdtemp(prefix="nvlm-load-"))
    if not (folder / "config.json").is_file():
        shared = Path(__file__).resolve().parents[2] / "shared" / "nvlm-d-72b"
        config = tiny_config(llm_width=2048, llm_layers=12, llm_heads=16, llm_kv_heads=4, vision_width=512, vision_heads=16)
        build_tiny_checkpoint(folder, config=config, num_shards=5, tokenizer_from=shared if shared.is_dir() else None)
    shards = sorted(folder.glob("*.safetensors"))
    total, largest = sum(p.stat().st_size for p in shards), max(p.stat().st_size for p in shards)
    target = largest + GIB
    print(f"checkpoint {folder}: {len(shards)} shards, {total / GIB:.2f} GiB, largest {largest / GIB:.2f} GiB; "
          f"load dtype {args.dtype}; target overhead <= largest shard + 1 GiB = {target / GIB:.2f} GiB")
    for mode in ("baseline", "engine"):
        m = measure(folder, mode, args.dtype)
        above = m["peak"] - m["before"]
        overhead = above - m["model"]
        print(f"{mode:8s}: peak RSS above baseline {above / GIB:.2f} GiB "
              f"({'within' if above <= target else 'over'} largest shard + 1 GiB), model {m['model'] / GIB:.2f} GiB, "
              f"peak minus model {overhead / GIB:.2f} GiB ({'within' if overhead <= target else 'over'} target)")
        # On the CPU the model itself lives in host memory, so the loader's own cost is the peak
        # minus the model; on a GPU the weights leave host memory and the peak itself is the cost.


if __name__ == "__main__":
    main()
