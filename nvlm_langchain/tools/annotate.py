"""Draw located boxes onto a copy of a page image, for people checking what a tool found."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from .base import LocatedBox

__all__ = ["draw_boxes"]

_COLOURS = ((230, 25, 75), (0, 130, 200), (60, 180, 75), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def draw_boxes(image: Image.Image, boxes: Sequence[LocatedBox], *, labels: bool = True) -> Image.Image:
    """A copy of `image` with each box (or quadrilateral) outlined and labelled.

    Args:
        image: the page image the boxes' pixel coordinates refer to.
        boxes: located boxes, in pixels of `image`.
        labels: write each box's label above it.

    Returns:
        A new RGB image of the same size.
    """
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    # Lines and text scale with the page so they stay visible on a 4000 px scan.
    width = max(2, round(min(out.size) / 300))
    font = ImageFont.load_default(size=max(12, round(min(out.size) / 50)))
    for i, located in enumerate(boxes):
        colour = _COLOURS[i % len(_COLOURS)]
        x1, y1, x2, y2 = located.box
        if located.quad:
            draw.polygon([tuple(p) for p in located.quad], outline=colour, width=width)
        else:
            # Pixel edges -> the inclusive last pixel that PIL's rectangle expects.
            draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=colour, width=width)
        if labels and located.label:
            text = located.label if len(located.label) <= 40 else located.label[:39] + "\u2026"
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            ty = y1 - (bottom - top) - 2 * width if y1 - (bottom - top) - 2 * width >= 0 else y2 + width
            draw.rectangle((x1, ty, x1 + right - left + 2 * width, ty + bottom - top + 2 * width), fill=colour)
            draw.text((x1 + width - left, ty + width - top), text, fill=(255, 255, 255), font=font)
    return out
