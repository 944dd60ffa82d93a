"""Box conversion between the model's 0..1000 grid and pixels, round trips, EXIF orientation."""

from __future__ import annotations

import io
import math
import random
from pathlib import Path

import pytest
from PIL import Image

from nvlm_langchain.tools import LocateTool, OCRTool, quad_to_pixel, to_model_coords, to_pixel_coords
from nvlm_langchain.tools.coords import format_box

SIZES = [
    (1, 1),
    (3, 7),
    (7, 3),
    (449, 449),
    (641, 479),
    (1224, 1585),
    (1999, 2001),
    (3000, 4000),
    (4000, 3000),
    (4093, 17),
]


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_pixel_model_pixel_round_trip_is_within_one_pixel(width: int, height: int) -> None:
    rng = random.Random(width * 10007 + height)
    for _ in range(200):
        xs = sorted(rng.randint(0, width) for _ in range(2))
        ys = sorted(rng.randint(0, height) for _ in range(2))
        box = (xs[0], ys[0], xs[1], ys[1])
        model = to_model_coords(box, width, height)
        assert all(0 <= v <= 1000 for v in model)
        back = to_pixel_coords(model, width, height)
        assert all(abs(a - b) <= 1 for a, b in zip(box, back, strict=True)), (box, model, back)


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_integer_model_coords_round_trip_within_half_a_grid_step(width: int, height: int) -> None:
    # The model writes integers: one grid step is W / 1000 px, so the round trip is within
    # half a step plus the final rounding, which is one pixel for images up to 2000 px.
    rng = random.Random(width + height)
    bound_x = max(1.0, width / 2000 + 0.5)
    bound_y = max(1.0, height / 2000 + 0.5)
    for _ in range(200):
        box = (rng.randint(0, width), rng.randint(0, height), rng.randint(0, width), rng.randint(0, height))
        model = to_model_coords(box, width, height, integer=True)
        assert all(v == int(v) for v in model)
        back = to_pixel_coords(model, width, height)
        expected = (min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3]))
        bounds = (bound_x, bound_y, bound_x, bound_y)
        assert all(abs(a - b) <= bx for a, b, bx in zip(expected, back, bounds, strict=True)), (box, model, back)


def test_model_to_pixel_formula_rounding_and_clamping() -> None:
    # x_px = floor(x * W / 1000 + 0.5), clamped to [0, W]; corners reordered.
    assert to_pixel_coords((0, 0, 1000, 1000), 641, 479) == (0, 0, 641, 479)
    assert to_pixel_coords((500, 500, 1000, 1000), 641, 479) == (321, 240, 641, 479)  # 320.5 -> 321, 239.5 -> 240
    assert to_pixel_coords((612, 840, 702, 866), 1275, 1650) == (780, 1386, 895, 1429)
    assert to_pixel_coords((-20, 990, 1003, 1200), 100, 100) == (0, 99, 100, 100)
    assert to_pixel_coords((700, 800, 100, 200), 1000, 1000) == (100, 200, 700, 800)
    assert to_pixel_coords((50, 50, 100, 100), 200, 400, scale=100) == (100, 200, 200, 400)  # other grids
    assert quad_to_pixel([(0, 0), (1000, 0), (1000, 1000), (0, 1000)], 640, 480) == (
        (0, 0),
        (640, 0),
        (640, 480),
        (0, 480),
    )
    assert format_box((12.4, 0, 999.6, 1000)) == "<box>(12,0),(1000,1000)</box>"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: to_pixel_coords((1, 2, 3), 10, 10), "4 numbers"),
        (lambda: to_pixel_coords((1, 2, 3, float("nan")), 10, 10), "finite"),
        (lambda: to_pixel_coords((1, 2, 3, 4), 0, 10), "at least 1x1"),
        (lambda: to_model_coords((1, 2, 3, 4), 10, 10, scale=0), "positive"),
    ],
)
def test_conversion_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def _exif_rotated_jpeg(path: Path) -> tuple[int, int, tuple[int, int, int, int]]:
    """Save a JPEG whose stored pixels are rotated, with EXIF orientation 6 (rotate 90 CW to view).

    The displayed image is 300 wide, 500 tall, with a black square at displayed (40..100, 350..450).
    """
    displayed = Image.new("RGB", (300, 500), "white")
    square = (40, 350, 100, 450)
    displayed.paste((0, 0, 0), square)
    stored = displayed.transpose(Image.Transpose.ROTATE_90)  # viewer rotates it back 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return 300, 500, square


def test_exif_rotated_input_keeps_boxes_in_displayed_orientation(tmp_path: Path, recording) -> None:
    width, height, square = _exif_rotated_jpeg(tmp_path / "phone.jpg")
    assert Image.open(tmp_path / "phone.jpg").size == (500, 300)  # stored sideways
    # The answer a correct model gives for the square, on the 0..1000 grid of the displayed image.
    model_box = to_model_coords(square, width, height, integer=True)
    answer = f"<ref>square</ref>{format_box(model_box)}"
    llm = recording([answer])
    result = (
        LocateTool(llm=llm, root_dir=tmp_path)
        .invoke(
            {
                "type": "tool_call",
                "id": "1",
                "name": "locate_in_document",
                "args": {"image": str(tmp_path / "phone.jpg"), "query": "square", "target": "object"},
            }
        )
        .artifact
    )

    sent = llm.sent_images()[0]
    assert sent.size == (width, height)  # the model saw the upright image
    assert sent.getpixel((70, 400))[0] < 60 and sent.getpixel((70, 100))[0] > 200
    page = result.pages[0]
    assert (page.page.width, page.page.height) == (width, height)
    (located,) = page.boxes
    assert all(abs(a - b) <= 1 for a, b in zip(located.box, square, strict=True)), located.box


def test_region_prompt_uses_integer_model_coords(recording, chart_png: Path) -> None:
    llm = recording(["120"])
    OCRTool(llm=llm, root_dir=chart_png.parent).invoke({"image": str(chart_png), "region": [132, 207, 230, 525]})
    (call,) = llm.calls
    text = call[-1].content[1]["text"]
    # 800x600 chart: 132 px -> 165, 207 px -> 345, 230 -> 287.5 -> 288, 525 -> 875
    assert text == "Recognize the text in this region: <box>(165,345),(288,875)</box>."


def test_pixel_box_of_a_model_box_on_a_4000x3000_image() -> None:
    # One model unit is 4 px wide and 3 px tall there.
    assert to_pixel_coords((750, 666, 850, 767), 4000, 3000) == (3000, 1998, 3400, 2301)
    model = to_model_coords((3000, 2000, 3400, 2300), 4000, 3000, integer=True)
    assert model == (750.0, 667.0, 850.0, 767.0)
    back = to_pixel_coords(model, 4000, 3000)
    assert max(abs(a - b) for a, b in zip(back, (3000, 2000, 3400, 2300), strict=True)) <= math.ceil(4000 / 2000)


def test_png_sent_to_model_is_lossless(tmp_path: Path, recording) -> None:
    image = Image.effect_noise((97, 61), 80).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    (tmp_path / "noise.png").write_bytes(buffer.getvalue())
    llm = recording(["x"])
    OCRTool(llm=llm, root_dir=tmp_path).invoke({"image": str(tmp_path / "noise.png")})
    assert llm.sent_images()[0].convert("RGB").tobytes() == image.tobytes()
