"""Dynamic tiling: one RGB image -> `pixel_values` [tiles, 3, 448, 448] for the vision tower.

This module reproduces, bit for bit, the model card's `dynamic_preprocess` followed by its
torchvision transform (SPEC section 5): choose a grid of 448-px tiles whose aspect ratio is
closest to the image's, resize the whole image to that grid with bicubic resampling, cut
the tiles row-major, append a 448x448 thumbnail of the whole image when there is more than
one tile, and normalize each tile with the ImageNet mean and std.

It is faster than the reference, not different: the grid image is converted to a tensor once
and sliced, the thumbnail is resized in parallel with the grid, and normalization is a lookup
in a 256-entry table holding exactly the float32 values ToTensor + Normalize compute.

It knows nothing about where images come from (`images.py`) or about prompts and tokens
beyond `image_tokens`. torchvision is deliberately not imported: it is only the reference
in the tests and benchmarks.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from nvlm_engine.errors import ImageError, ImageOptionsError
from nvlm_engine.images import ImageSource, load_image, to_rgb

__all__ = [
    "share_tile_budget",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_TILES_LIMIT",
    "TILE_SIZE",
    "TOKENS_PER_TILE",
    "TiledImage",
    "candidate_grids",
    "choose_grid",
    "image_tokens",
    "preprocess_image",
]

TILE_SIZE = 448
TOKENS_PER_TILE = 256  # 1024 patches per tile, pixel-shuffled 2x2 -> 256 (SPEC section 3)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The card's `load_image` allows 12; NVLM-D was trained with at most 6 (config
# `max_dynamic_patch`), so 6 is the default and 12 the hard ceiling.
MAX_TILES_LIMIT = 12

# Below this many source pixels the two resizes take well under a millisecond and a thread
# would cost more than it saves.
_PARALLEL_RESIZE_MIN_PIXELS = 1_000_000


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors with == has no single truth value
class TiledImage:
    """The tiles of one image, ready for the vision tower.

    Attributes:
        pixel_values: [num_tiles, 3, tile, tile] float32, ImageNet-normalized; grid tiles
            row-major (left to right, then top to bottom), then the thumbnail if any.
        grid: (cols, rows) of the grid the image was resized to.
        num_tiles: cols * rows, plus one for the thumbnail when there is one.
    """

    pixel_values: torch.Tensor
    grid: tuple[int, int]
    num_tiles: int

    def __post_init__(self) -> None:
        shape = tuple(self.pixel_values.shape)
        if len(shape) != 4 or shape[0] != self.num_tiles or shape[1] != 3:
            raise ImageError(f"pixel_values must be [num_tiles={self.num_tiles}, 3, H, W]; got {list(shape)}")


def candidate_grids(min_tiles: int = 1, max_tiles: int = 6) -> list[tuple[int, int]]:
    """List the (cols, rows) grids with `min_tiles <= cols * rows <= max_tiles`, in reference order.

    The order decides exact ties in `choose_grid`, so it must be the reference's: a Python
    set of the grids, sorted (stably) by tile count. Within one tile count that leaves the
    set's iteration order, which for tuples of small ints is fixed (int hashes are not
    randomized) and depends on the insertion sequence, reproduced here. For `max_tiles=6`
    this is (1,1),(1,2),(2,1),(3,1),(1,3),(4,1),(1,4),(2,2),(1,5),(5,1),(6,1),(2,3),(1,6),(3,2).

    Args:
        min_tiles: the fewest tiles a grid may have (>= 1).
        max_tiles: the most tiles a grid may have (>= min_tiles).

    Returns:
        The grids as (cols, rows), fewest tiles first.

    Raises:
        ImageOptionsError: the bounds are not 1 <= min_tiles <= max_tiles.
    """
    _check_tile_bounds(min_tiles, max_tiles)
    return list(_candidate_grids(min_tiles, max_tiles))


def choose_grid(
    width: int, height: int, *, min_tiles: int = 1, max_tiles: int = 6, tile_size: int = TILE_SIZE
) -> tuple[int, int]:
    """Pick the (cols, rows) grid whose aspect ratio is closest to the image's.

    On an exact tie the later candidate wins only if the image has more than half the
    pixels of that grid (`width * height > 0.5 * tile_size**2 * cols * rows`): with
    `max_tiles=6` a square image gets 2x2 above 401,408 px (634x634 and up), else 1x1.

    Args:
        width: image width in pixels (>= 1).
        height: image height in pixels (>= 1).
        min_tiles: the fewest tiles allowed.
        max_tiles: the most tiles allowed (the thumbnail is not counted).
        tile_size: the tile side in pixels.

    Returns:
        (cols, rows).

    Raises:
        ImageOptionsError: a size or bound is out of range.
    """
    if width < 1 or height < 1 or tile_size < 1:
        raise ImageOptionsError(
            f"width, height and tile_size must be >= 1; got {width}x{height}, tile_size={tile_size}"
        )
    _check_tile_bounds(min_tiles, max_tiles)
    # Same float expressions, in the same order, as the reference's find_closest_aspect_ratio:
    # the tie rule compares floats for exact equality, so nothing may be rearranged.
    aspect_ratio = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in _candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def share_tile_budget(budget: int, images: int) -> int:
    """Tiles per image when `images` images share a request's tile budget: `budget // n`, at
    least 1 (Megatron's evaluation gave each of n images 6 // n tiles)."""
    return max(1, budget // max(1, images))


def image_tokens(num_tiles: int, tokens_per_tile: int = TOKENS_PER_TILE) -> int:
    """Number of `<|vision_pad|>` tokens an image of `num_tiles` tiles takes in the prompt.

    Args:
        num_tiles: tiles including the thumbnail (`TiledImage.num_tiles`).
        tokens_per_tile: 256 for NVLM-D.

    Returns:
        `num_tiles * tokens_per_tile`.

    Raises:
        ImageOptionsError: a negative argument.
    """
    if num_tiles < 0 or tokens_per_tile < 0:
        raise ImageOptionsError(f"num_tiles and tokens_per_tile must be >= 0; got {num_tiles}, {tokens_per_tile}")
    return num_tiles * tokens_per_tile


def preprocess_image(
    image: ImageSource,
    max_tiles: int = 6,
    *,
    min_tiles: int = 1,
    use_thumbnail: bool = True,
    tile_size: int = TILE_SIZE,
) -> TiledImage:
    """Tile and normalize one image exactly as the model card's `load_image` does.

    Args:
        image: a PIL image (used as given: its mode is normalized with `to_rgb`, but no EXIF
            rotation or pixel limit is applied), or anything `load_image` accepts, which is
            read with `load_image`'s defaults (URL fetching off).
        max_tiles: the most grid tiles, 1..12. NVLM-D was trained with at most 6; more gives
            tile tags the model never saw.
        min_tiles: the fewest grid tiles.
        use_thumbnail: append a 448x448 thumbnail of the whole image when the grid has more
            than one tile (the reference always does).
        tile_size: the tile side; 448 for NVLM-D.

    Returns:
        A `TiledImage` with `pixel_values` [num_tiles, 3, tile_size, tile_size] float32.

    Raises:
        ImageOptionsError: `max_tiles` outside 1..12, `min_tiles` outside 1..max_tiles, or a
            non-positive `tile_size`.
        ImageError: the image cannot be read (see `load_image`).
    """
    if not 1 <= max_tiles <= MAX_TILES_LIMIT:
        raise ImageOptionsError(
            f"max_tiles must be in 1..{MAX_TILES_LIMIT}, got {max_tiles}; NVLM-D was trained with up to 6"
        )
    if not 1 <= min_tiles <= max_tiles or tile_size < 1:
        raise ImageOptionsError(
            f"need 1 <= min_tiles <= max_tiles and tile_size >= 1; got min_tiles={min_tiles}, "
            f"max_tiles={max_tiles}, tile_size={tile_size}"
        )

    # 1. One RGB image (the reference's `.convert('RGB')`).
    rgb = to_rgb(image) if isinstance(image, Image.Image) else load_image(image)
    width, height = rgb.size
    if width < 1 or height < 1:
        raise ImageError(f"the image has no pixels (size {width}x{height})")

    # 2. The grid, and the two resizes of the reference: whole image -> grid, whole image -> thumbnail.
    cols, rows = choose_grid(width, height, min_tiles=min_tiles, max_tiles=max_tiles, tile_size=tile_size)
    grid_tiles = cols * rows
    with_thumbnail = use_thumbnail and grid_tiles > 1
    resized, thumbnail = _resize(rgb, (tile_size * cols, tile_size * rows), tile_size if with_thumbnail else None)

    # 3. Cut the tiles as uint8 (cheap), row-major: tile k = row * cols + col, like the
    #    reference's crop boxes (col * tile, row * tile, ...).
    #    numpy, not torch: its strided uint8 copy is about 3x faster for this transposition.
    num_tiles = grid_tiles + int(with_thumbnail)
    tiles = np.empty((num_tiles, 3, tile_size, tile_size), dtype=np.uint8)
    grid_hwc = np.asarray(resized)  # [rows*tile, cols*tile, 3] uint8, read-only
    tiles[:grid_tiles].reshape(rows, cols, 3, tile_size, tile_size)[...] = grid_hwc.reshape(
        rows, tile_size, cols, tile_size, 3
    ).transpose(0, 2, 4, 1, 3)
    if thumbnail is not None:
        tiles[grid_tiles] = np.asarray(thumbnail).transpose(2, 0, 1)

    # 4. Normalize every byte through the table (one gather per channel, no arithmetic).
    lut = _normalization_lut()
    indices = torch.from_numpy(tiles)
    pixel_values = torch.empty(tiles.shape, dtype=torch.float32)  # [T, 3, tile, tile]
    for channel in range(3):
        pixel_values[:, channel] = torch.take(lut[channel], indices[:, channel].long())
    return TiledImage(pixel_values=pixel_values, grid=(cols, rows), num_tiles=num_tiles)


# --- internals ---------------------------------------------------------------------------


def _check_tile_bounds(min_tiles: int, max_tiles: int) -> None:
    if not 1 <= min_tiles <= max_tiles:
        raise ImageOptionsError(f"need 1 <= min_tiles <= max_tiles; got min_tiles={min_tiles}, max_tiles={max_tiles}")


@functools.lru_cache(maxsize=32)
def _candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    # Insert in the reference's loop order (n, then cols, then rows), duplicates included:
    # the set's final iteration order depends on it whenever two hashes collide.
    grids = set()
    for n in range(min_tiles, max_tiles + 1):
        for cols in range(1, n + 1):
            for rows in range(1, n + 1):
                if min_tiles <= cols * rows <= max_tiles:
                    grids.add((cols, rows))
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def _resize(
    image: Image.Image, grid_size: tuple[int, int], thumbnail_side: int | None
) -> tuple[Image.Image, Image.Image | None]:
    # Explicit BICUBIC equals the reference's `image.resize(size)` default for RGB images.
    bicubic = Image.Resampling.BICUBIC
    if thumbnail_side is None:
        return image.resize(grid_size, bicubic), None
    thumbnail_size = (thumbnail_side, thumbnail_side)
    if image.width * image.height < _PARALLEL_RESIZE_MIN_PIXELS:
        return image.resize(grid_size, bicubic), image.resize(thumbnail_size, bicubic)
    # Pillow releases the GIL while resampling, so the two resizes of a large photo really
    # run side by side; each is the same call as in the reference, so pixels are unchanged.
    with ThreadPoolExecutor(max_workers=1) as pool:
        thumbnail = pool.submit(image.resize, thumbnail_size, bicubic)
        resized = image.resize(grid_size, bicubic)
        return resized, thumbnail.result()


@functools.lru_cache(maxsize=1)
def _normalization_lut() -> torch.Tensor:
    # [3, 256] float32: entry [c, v] is what the reference makes of byte v in channel c,
    # computed with the same float32 operations in the same order: ToTensor's
    # `.to(float32).div(255)`, then Normalize's `.sub(mean).div(std)` with float32 mean/std.
    levels = torch.arange(256, dtype=torch.uint8).to(torch.float32).div(255).view(1, 256)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1)
    return levels.sub(mean).div(std).contiguous()
