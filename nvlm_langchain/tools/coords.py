"""Convert between the model's box coordinates and pixels of the image the caller sees.

NVLM-D writes boxes as integers on a 0..`scale` grid over the whole image (`scale` = 1000,
SPEC section 9), independent of its tiling: 0 is the left (top) edge and `scale` the right
(bottom) edge. Pixel coordinates here are edge coordinates of the displayed image (after
EXIF rotation, which `nvlm_engine.load_image` applies before the model sees the image):
x = 0 is the left edge of the first column, x = W the right edge of the last one, so the box
(x1, y1, x2, y2) covers pixel columns x1 .. x2 - 1.

    x_px = x_model * W / scale,   y_px = y_model * H / scale       (model -> pixels)
    x_model = x_px * scale / W,   y_model = y_px * scale / H       (pixels -> model)

`to_pixel_coords` rounds half up to integers and clamps to [0, W] x [0, H]; `to_model_coords`
keeps floats (so a round trip is exact up to that rounding) unless `integer=True`, which rounds
half up and clamps to [0, scale] as the model itself would write them. An integer model grid
step is W / scale pixels, so with integer model coordinates the round trip is within
max(1, W / (2 * scale)) pixels: within one pixel up to 2000 px at scale 1000.

Pure functions; knows nothing of models, prompts or LangChain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "DEFAULT_SCALE",
    "format_box",
    "quad_to_pixel",
    "to_model_coords",
    "to_pixel_coords",
]

DEFAULT_SCALE = 1000.0

Box = tuple[float, float, float, float]
PixelBox = tuple[int, int, int, int]


def to_pixel_coords(box: Sequence[float], width: int, height: int, *, scale: float = DEFAULT_SCALE) -> PixelBox:
    """Map a model box to integer pixel edges of a `width` x `height` image.

    Args:
        box: (x1, y1, x2, y2) on the model's 0..scale grid; corners in any order, values
            outside the grid allowed (they are clamped).
        width, height: size of the displayed image in pixels.
        scale: the model's grid size.

    Returns:
        (x1, y1, x2, y2) with 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height.
    """
    _check(width, height, scale)
    x1, y1, x2, y2 = _four(box)
    px = [_round(x * width / scale, width) for x in (x1, x2)]
    py = [_round(y * height / scale, height) for y in (y1, y2)]
    return (min(px), min(py), max(px), max(py))


def to_model_coords(
    box: Sequence[float], width: int, height: int, *, scale: float = DEFAULT_SCALE, integer: bool = False
) -> Box:
    """Map a pixel box of a `width` x `height` image to the model's 0..scale grid.

    Args:
        box: (x1, y1, x2, y2) pixel edges; corners in any order, clamped to the image.
        width, height: size of the displayed image in pixels.
        scale: the model's grid size.
        integer: round half up to integers, as the model writes them (for prompts such as
            "Recognize the text in this region"); else exact floats.

    Returns:
        (x1, y1, x2, y2) with x1 <= x2 and y1 <= y2, within [0, scale].
    """
    _check(width, height, scale)
    x1, y1, x2, y2 = _four(box)
    mx = [min(max(x, 0.0), width) * scale / width for x in (x1, x2)]
    my = [min(max(y, 0.0), height) * scale / height for y in (y1, y2)]
    if integer:
        mx = [float(_round(v, scale)) for v in mx]
        my = [float(_round(v, scale)) for v in my]
    return (min(mx), min(my), max(mx), max(my))


def quad_to_pixel(
    points: Sequence[Sequence[float]], width: int, height: int, *, scale: float = DEFAULT_SCALE
) -> tuple[tuple[int, int], ...]:
    """Map quadrilateral corners (or any points) from the model grid to pixels, order kept."""
    _check(width, height, scale)
    return tuple((_round(x * width / scale, width), _round(y * height / scale, height)) for x, y in points)


def format_box(box: Sequence[float]) -> str:
    """Write a model-grid box the way NVLM-D reads and writes it: `<box>(x1,y1),(x2,y2)</box>`."""
    x1, y1, x2, y2 = (int(round(v)) for v in _four(box))
    return f"<box>({x1},{y1}),({x2},{y2})</box>"


def _round(value: float, upper: float) -> int:
    # Half up (not Python's half-to-even), then clamped: 0.5 px -> 1, and values past the
    # edge (a model writing 1003) land on the edge.
    return int(min(max(math.floor(value + 0.5), 0), math.floor(upper)))


def _four(box: Sequence[float]) -> Box:
    if len(box) != 4:
        raise ValueError(f"a box has 4 numbers (x1, y1, x2, y2), got {len(box)}: {list(box)!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"box coordinates must be finite numbers, got {list(box)!r}")
    return (x1, y1, x2, y2)


def _check(width: int, height: int, scale: float) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"image size must be at least 1x1 pixels, got {width}x{height}")
    if not scale > 0:
        raise ValueError(f"the coordinate scale must be positive, got {scale}")
