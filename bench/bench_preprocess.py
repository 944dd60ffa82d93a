"""Benchmark: the model card's image preprocessing versus `preprocess_image(load_image(path))`.

Makes a 12-megapixel JPEG (4000x3000 gradient plus noise, quality 90, no EXIF) in a temporary
folder, checks that both pipelines give identical tensors, then reports the best of N timings.
The baseline is written here from SPEC section 5 (open -> convert RGB -> dynamic_preprocess with
max 6 -> torchvision transform per tile -> stack); torchvision is needed for it.

    .venv/bin/python bench/bench_preprocess.py [--repeats 5] [--width 4000 --height 3000]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from card_baseline import card_tiles  # noqa: E402

from nvlm_engine.images import load_image  # noqa: E402
from nvlm_engine.tiling import preprocess_image  # noqa: E402

logger = logging.getLogger("bench_preprocess")

# --- the model card's pipeline (SPEC section 5), shared with bench_engine.py ---------------


def card_load_image(path: Path, max_num: int = 6, size: int = 448) -> torch.Tensor:
    return card_tiles(Image.open(path), max_num=max_num, size=size)


# --- harness -----------------------------------------------------------------------------------


def make_photo(path: Path, width: int, height: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    base = np.stack([200 * x + 0 * y, 200 * y + 0 * x, 100 * (x + y)], axis=-1) + 20
    noisy = base + rng.normal(0.0, 12.0, base.shape).astype(np.float32)
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB").save(path, "JPEG", quality=90)


def best_of(repeats: int, fn: Callable[[], object]) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per pipeline; the best counts")
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--max-tiles", type=int, default=6)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "photo.jpg"
        make_photo(path, args.width, args.height)
        logger.info(
            "image: %dx%d JPEG q90, %.1f MB; torch threads %d; repeats %d",
            args.width, args.height, path.stat().st_size / 1e6, torch.get_num_threads(), args.repeats,
        )  # fmt: skip

        reference = card_load_image(path, args.max_tiles)  # also warms both code paths up
        ours = preprocess_image(load_image(path), max_tiles=args.max_tiles)
        if not torch.equal(reference, ours.pixel_values):
            logger.error("MISMATCH: pixel_values differ from the model card's pipeline")
            return 1
        logger.info("identical: torch.equal over %s, grid %s", tuple(reference.shape), ours.grid)

        def decode_only() -> Image.Image:
            with Image.open(path) as image:
                image.load()
                return image

        t_decode, _ = best_of(args.repeats, decode_only)
        t_card, _ = best_of(args.repeats, lambda: card_load_image(path, args.max_tiles))
        t_ours, _ = best_of(args.repeats, lambda: preprocess_image(load_image(path), max_tiles=args.max_tiles))

    logger.info("JPEG decode alone (floor for both): %8.1f ms", t_decode * 1e3)
    logger.info("model card pipeline:                %8.1f ms", t_card * 1e3)
    logger.info("preprocess_image(load_image(path)): %8.1f ms", t_ours * 1e3)
    logger.info("speed-up (baseline / ours):         %8.2fx", t_card / t_ours)
    return 0


if __name__ == "__main__":
    sys.exit(main())
