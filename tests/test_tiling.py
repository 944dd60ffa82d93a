"""Tiling: grid choice as a table (SPEC section 5) and pixel values bit-identical to the model card.

The reference pipeline below is written from SPEC section 5 (the model card's
`dynamic_preprocess` + torchvision transform); torchvision is a test-only dependency.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from nvlm_engine.errors import ImageError, ImageOptionsError
from nvlm_engine.tiling import (
    TiledImage,
    candidate_grids,
    choose_grid,
    image_tokens,
    preprocess_image,
)

T = pytest.importorskip("torchvision.transforms", reason="torchvision is the reference for pixel identity")
InterpolationMode = pytest.importorskip("torchvision.transforms.functional").InterpolationMode

SPEC_ORDER_MAX6 = [
    (1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4),
    (2, 2), (1, 5), (5, 1), (6, 1), (2, 3), (1, 6), (3, 2),
]  # fmt: skip


# --- the reference, from SPEC section 5 --------------------------------------------------


def reference_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """Candidate grids the way the model card builds them: a set, sorted by tile count."""
    ratios = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(ratios, key=lambda r: r[0] * r[1])


def reference_grid(width: int, height: int, min_num: int = 1, max_num: int = 6, size: int = 448) -> tuple[int, int]:
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for ratio in reference_grids(min_num, max_num):
        diff = abs(aspect - ratio[0] / ratio[1])
        if diff < best_diff:
            best, best_diff = ratio, diff
        elif diff == best_diff and width * height > 0.5 * size * size * ratio[0] * ratio[1]:
            best = ratio
    return best


def reference_pixel_values(image: Image.Image, max_num: int = 6, min_num: int = 1, size: int = 448) -> torch.Tensor:
    image = image.convert("RGB")
    cols, rows = reference_grid(*image.size, min_num=min_num, max_num=max_num, size=size)
    resized = image.resize((size * cols, size * rows))  # Pillow's default: bicubic for RGB
    tiles = []
    for i in range(cols * rows):
        col, row = i % cols, i // cols
        tiles.append(resized.crop((col * size, row * size, (col + 1) * size, (row + 1) * size)))
    if len(tiles) != 1:
        tiles.append(image.resize((size, size)))
    transform = T.Compose(
        [
            T.Resize((size, size), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        ]
    )
    return torch.stack([transform(tile) for tile in tiles])


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def gradient_image(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float64)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float64)[:, None]
    rgb = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1)
    return Image.fromarray(rgb.round().astype(np.uint8), "RGB")


# --- grid choice -------------------------------------------------------------------------


def test_candidate_order_for_max6_is_the_spec_list() -> None:
    assert candidate_grids(1, 6) == SPEC_ORDER_MAX6


@pytest.mark.parametrize("min_tiles,max_tiles", [(1, 1), (1, 6), (1, 12), (2, 6), (3, 9), (1, 40)])
def test_candidate_order_matches_reference_construction(min_tiles: int, max_tiles: int) -> None:
    grids = candidate_grids(min_tiles, max_tiles)
    assert grids == reference_grids(min_tiles, max_tiles)
    assert all(min_tiles <= c * r <= max_tiles for c, r in grids)
    assert [c * r for c, r in grids] == sorted(c * r for c, r in grids)


@pytest.mark.parametrize(
    "size,grid,tiles,tokens",
    [
        ((448, 448), (1, 1), 1, 256),
        ((500, 500), (1, 1), 1, 256),
        ((640, 640), (2, 2), 5, 1280),
        ((800, 600), (3, 2), 7, 1792),
        ((1024, 768), (3, 2), 7, 1792),
        ((1920, 1080), (2, 1), 3, 768),
        ((600, 1800), (1, 3), 4, 1024),
        ((3000, 400), (6, 1), 7, 1792),
    ],
)
def test_spec_table(size: tuple[int, int], grid: tuple[int, int], tiles: int, tokens: int) -> None:
    assert choose_grid(*size) == grid
    result = preprocess_image(gradient_image(*size))
    assert result.grid == grid
    assert result.num_tiles == tiles
    assert tuple(result.pixel_values.shape) == (tiles, 3, 448, 448)
    assert result.pixel_values.dtype == torch.float32
    assert image_tokens(result.num_tiles) == tokens


def test_square_tie_boundary_is_401408_pixels() -> None:
    # 1x1 and 2x2 tie exactly on a square; 2x2 wins only above 0.5 * 448^2 * 4 = 401,408 px.
    boundary = 0.5 * 448 * 448 * 4
    assert boundary == 401_408
    side = math.isqrt(401_408)  # 633: 633^2 = 400,689 <= boundary < 634^2 = 401,956
    assert side * side <= boundary < (side + 1) ** 2
    assert choose_grid(side, side) == (1, 1)
    assert choose_grid(side + 1, side + 1) == (2, 2)
    assert (choose_grid(633, 633), choose_grid(634, 634)) == ((1, 1), (2, 2))


def test_tie_between_different_ratios_uses_the_area_rule() -> None:
    # 1x1 (ratio 1) and 2x1 (ratio 2) tie at W/H = 1.5, but 3x2 matches 1.5 exactly; with
    # max 2 only the tie remains: 2x1 needs area > 0.5 * 448^2 * 2 = 200,704 (e.g. 549x366 = 200,934).
    assert choose_grid(549, 366, max_tiles=2) == (2, 1)
    assert choose_grid(300, 200, max_tiles=2) == (1, 1)
    assert choose_grid(549, 366, max_tiles=2) == reference_grid(549, 366, max_num=2)


def test_one_tile_image_has_no_thumbnail() -> None:
    result = preprocess_image(noise_image(300, 280))
    assert (result.grid, result.num_tiles) == ((1, 1), 1)
    single = preprocess_image(noise_image(2000, 1000), max_tiles=1)
    assert (single.grid, single.num_tiles, single.pixel_values.shape[0]) == ((1, 1), 1, 1)


def test_use_thumbnail_false_drops_the_thumbnail() -> None:
    result = preprocess_image(noise_image(900, 450), use_thumbnail=False)
    assert (result.grid, result.num_tiles) == ((2, 1), 2)
    assert torch.equal(result.pixel_values, reference_pixel_values(noise_image(900, 450))[:2])


@pytest.mark.parametrize(
    "size,grid", [((20000, 20), (6, 1)), ((20, 20000), (1, 6)), ((1, 1), (1, 1)), ((1, 5000), (1, 6))]
)
def test_extreme_aspect_ratios(size: tuple[int, int], grid: tuple[int, int]) -> None:
    assert choose_grid(*size) == grid == reference_grid(*size)
    result = preprocess_image(gradient_image(*size))
    cols, rows = grid
    assert result.grid == grid
    assert result.num_tiles == cols * rows + (cols * rows > 1)
    assert torch.isfinite(result.pixel_values).all()


WIDTHS = (1, 7, 100, 300, 448, 449, 633, 634, 900, 1344, 2000, 5000)
SWEEP = [(w, h) for w in WIDTHS for h in (1, 13, 224, 448, 640, 896, 3000)]


@pytest.mark.parametrize("max_tiles", [1, 2, 6, 12])
def test_grid_matches_reference_rule(max_tiles: int) -> None:
    for width, height in SWEEP:
        expected = reference_grid(width, height, max_num=max_tiles)
        assert choose_grid(width, height, max_tiles=max_tiles) == expected, (width, height)
    if max_tiles == 1:
        assert {choose_grid(w, h, max_tiles=1) for w, h in SWEEP} == {(1, 1)}
    if max_tiles == 12:
        assert choose_grid(1344, 896, max_tiles=12) == (3, 2)
        assert choose_grid(4000, 1000, max_tiles=12) == (4, 1)
        assert choose_grid(1800, 448, max_tiles=12) == (4, 1)


def test_min_tiles_is_honoured() -> None:
    assert choose_grid(448, 448, min_tiles=2) == reference_grid(448, 448, min_num=2)
    assert choose_grid(448, 448, min_tiles=2) != (1, 1)
    image = noise_image(500, 500, seed=3)
    result = preprocess_image(image, min_tiles=2)
    assert torch.equal(result.pixel_values, reference_pixel_values(image, min_num=2))


@pytest.mark.parametrize("max_tiles", [0, -1, 13, 100])
def test_max_tiles_out_of_range_is_refused(max_tiles: int) -> None:
    with pytest.raises(ImageOptionsError, match="max_tiles must be in 1..12"):
        preprocess_image(noise_image(10, 10), max_tiles=max_tiles)


def test_bad_options_are_refused() -> None:
    with pytest.raises(ImageOptionsError):
        preprocess_image(noise_image(10, 10), min_tiles=7, max_tiles=6)
    with pytest.raises(ImageOptionsError):
        choose_grid(0, 10)
    with pytest.raises(ImageOptionsError):
        candidate_grids(0, 6)
    with pytest.raises(ImageOptionsError):
        image_tokens(-1)
    assert issubclass(ImageOptionsError, ImageError)


def test_tiled_image_checks_its_shape() -> None:
    with pytest.raises(ImageError, match="num_tiles=2"):
        TiledImage(pixel_values=torch.zeros(3, 3, 448, 448), grid=(2, 1), num_tiles=2)


def test_image_tokens() -> None:
    assert image_tokens(1) == 256
    assert image_tokens(7) == 1792
    assert image_tokens(3, tokens_per_tile=10) == 30


# --- pixel identity with the model card ----------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [(448, 448), (500, 375), (640, 640), (1920, 1080), (333, 1000), (3000, 400), (1600, 1200), (20000, 20)],
)
def test_pixel_values_bit_identical_to_reference(size: tuple[int, int]) -> None:
    image = gradient_image(*size)
    ours = preprocess_image(image)
    reference = reference_pixel_values(image)
    assert ours.pixel_values.shape == reference.shape
    assert torch.equal(ours.pixel_values, reference)


@pytest.mark.parametrize("max_tiles", [1, 6, 12])
def test_random_noise_bit_identical_to_reference(max_tiles: int) -> None:
    # 1600x1200 is above the size where the thumbnail is resized on a second thread.
    image = noise_image(1600, 1200, seed=max_tiles)
    pixels = np.asarray(image)
    # Every byte value occurs in every channel, so every entry of the lookup table is checked.
    assert all(len(np.unique(pixels[..., c])) == 256 for c in range(3))
    ours = preprocess_image(image, max_tiles=max_tiles)
    assert torch.equal(ours.pixel_values, reference_pixel_values(image, max_num=max_tiles))


def test_every_byte_value_normalizes_like_totensor_normalize() -> None:
    # A one-tile 448x448 image goes through no resize at all: the table alone is compared.
    levels = np.arange(448 * 448 * 3, dtype=np.int64).reshape(448, 448, 3) % 256
    levels[..., 1] = levels[..., 1][::-1]
    image = Image.fromarray(levels.astype(np.uint8), "RGB")
    assert torch.equal(preprocess_image(image).pixel_values, reference_pixel_values(image))


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1"])
def test_opaque_non_rgb_pil_images_match_reference(mode: str) -> None:
    image = noise_image(700, 500, seed=5).convert(mode)
    ours = preprocess_image(image)
    assert torch.equal(ours.pixel_values, reference_pixel_values(image))


def test_tiles_are_row_major_crops_of_the_resized_image() -> None:
    # Each 448x448 tile of a 3x2 grid is a flat colour: tile k must be colour k.
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    image = Image.new("RGB", (1344, 896))
    for k, colour in enumerate(colours):
        col, row = k % 3, k // 3
        image.paste(colour, (col * 448, row * 448, (col + 1) * 448, (row + 1) * 448))
    result = preprocess_image(image)
    assert result.grid == (3, 2)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(3, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(3, 1)
    for k, colour in enumerate(colours):
        centre = result.pixel_values[k, :, 200:248, 200:248].reshape(3, -1)
        recovered = (centre * std + mean) * 255
        assert torch.allclose(recovered, torch.tensor(colour, dtype=torch.float32).view(3, 1), atol=0.01), k


def test_preprocess_reads_paths_and_does_not_mutate_pil_input(tmp_path) -> None:
    image = noise_image(800, 600, seed=9)
    before = np.asarray(image).copy()
    path = tmp_path / "noise.png"
    image.save(path)
    from_path = preprocess_image(path)
    from_str = preprocess_image(str(path))
    from_pil = preprocess_image(image)
    assert isinstance(from_path, TiledImage)
    assert torch.equal(from_path.pixel_values, from_pil.pixel_values)
    assert torch.equal(from_str.pixel_values, from_pil.pixel_values)
    assert np.array_equal(np.asarray(image), before)


def test_same_input_same_output() -> None:
    image = noise_image(1000, 700, seed=11)
    first, second = preprocess_image(image), preprocess_image(image)
    assert first.pixel_values.data_ptr() != second.pixel_values.data_ptr()
    assert torch.equal(first.pixel_values, second.pixel_values)
