"""load_image / to_rgb: every source kind, every pixel mode, and every way an image can be bad."""

from __future__ import annotations

import base64
import http.server
import io
import logging
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from shared_paths import TESTDATA_IMAGES

from nvlm_engine import images as images_module
from nvlm_engine.errors import (
    ImageDecodeError,
    ImageError,
    ImageOptionsError,
    ImageSourceError,
    ImageTooLargeError,
    NVLMError,
)
from nvlm_engine.fetch import FetchPolicy
from nvlm_engine.images import load_image, to_rgb
from nvlm_engine.tiling import TiledImage, choose_grid, preprocess_image

LOOPBACK = FetchPolicy(allow_private_addresses=True)  # the test servers below listen on 127.0.0.1


# --- helpers -----------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def two_colour_image(width: int = 40, height: int = 20) -> Image.Image:
    """Left half red, right half blue: orientation is visible in the result."""
    image = Image.new("RGB", (width, height), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, width // 2, height))
    return image


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims `width` x `height` and which holds no pixel data at all."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


# --- every source kind ---------------------------------------------------------------------


@pytest.fixture
def sample() -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8), "RGB")


@pytest.fixture
def sample_png(tmp_path: Path, sample: Image.Image) -> Path:
    path = tmp_path / "sample image.png"
    sample.save(path)
    return path


def test_path_str_and_pathlib(sample: Image.Image, sample_png: Path) -> None:
    for source in (sample_png, str(sample_png)):
        image = load_image(source)
        assert image.mode == "RGB"
        assert np.array_equal(pixels(image), pixels(sample))


def test_bytes_bytearray_memoryview(sample: Image.Image) -> None:
    data = encode(sample)
    for source in (data, bytearray(data), memoryview(data)):
        assert np.array_equal(pixels(load_image(source)), pixels(sample))


def test_base64_plain_and_mime_wrapped(sample: Image.Image) -> None:
    text = base64.b64encode(encode(sample)).decode()
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    for source in (text, wrapped):
        assert np.array_equal(pixels(load_image(source)), pixels(sample))


def test_data_url(sample: Image.Image) -> None:
    url = "data:image/png;base64," + base64.b64encode(encode(sample)).decode()
    assert np.array_equal(pixels(load_image(url)), pixels(sample))


def test_pil_image(sample: Image.Image) -> None:
    assert np.array_equal(pixels(load_image(sample)), pixels(sample))
    assert np.array_equal(pixels(load_image(sample.convert("L"))), pixels(sample.convert("L").convert("RGB")))


def test_file_url_is_a_local_path(sample: Image.Image, sample_png: Path) -> None:
    url = sample_png.as_uri()  # percent-encodes the space in the name
    assert "%20" in url
    assert np.array_equal(pixels(load_image(url)), pixels(sample))
    with pytest.raises(ImageSourceError, match="only local files"):
        load_image("file://otherhost/tmp/x.png")


def test_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_photo.jpg"
    for source in (missing, str(missing)):
        with pytest.raises(ImageSourceError, match="no_such_photo.jpg"):
            load_image(source)


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(ImageSourceError, match="not a regular file"):
        load_image(tmp_path)


def test_text_that_is_neither_file_nor_base64() -> None:
    with pytest.raises(ImageSourceError, match="neither an existing file nor base64"):
        load_image("holiday/photo.jpg")


def test_valid_base64_that_is_no_image_says_so() -> None:
    with pytest.raises(ImageDecodeError, match="not an existing file"):
        load_image("/data/images")  # valid base64 alphabet, but neither a file nor an image


def test_unsupported_source_types_and_schemes() -> None:
    with pytest.raises(ImageSourceError, match="cannot read an image from a int"):
        load_image(42)  # type: ignore[arg-type]
    with pytest.raises(ImageSourceError, match="unsupported URL scheme"):
        load_image("ftp://example.com/a.png")


def test_http_url_refused_by_default() -> None:
    # Port 9 (discard) on localhost: if a connection were attempted it would fail differently.
    with pytest.raises(ImageSourceError, match="allow_url_fetch=True"):
        load_image("http://127.0.0.1:9/cat.png")
    with pytest.raises(ImageSourceError, match="allow_url_fetch=True"):
        load_image("HTTPS://example.com/cat.png")


def test_byte_limit_on_bytes_and_files(sample: Image.Image, sample_png: Path) -> None:
    data = encode(sample)
    with pytest.raises(ImageTooLargeError, match="max_bytes"):
        load_image(data, max_bytes=len(data) - 1)
    with pytest.raises(ImageTooLargeError, match="max_bytes"):
        load_image(sample_png, max_bytes=100)
    assert load_image(data, max_bytes=len(data)).size == sample.size


def test_bad_limits_are_refused(sample: Image.Image) -> None:
    with pytest.raises(ImageOptionsError):
        load_image(sample, max_pixels=0)
    with pytest.raises(ImageOptionsError):
        load_image(sample, fetch_timeout_s=0)


# --- http(s) fetching from a local server ----------------------------------------------------


@dataclass
class Route:
    body: bytes
    content_type: str = "image/png"
    status: int = 200
    with_length: bool = True  # False: no Content-Length, the body ends when the connection closes
    drip_s: float = 0.0  # > 0: send one byte per drip_s seconds


@dataclass
class LocalServer:
    base: str
    routes: dict[str, Route] = field(default_factory=dict)
    hits: list[str] = field(default_factory=list)


@pytest.fixture
def http_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalServer]:
    """An http.server on 127.0.0.1, port chosen by the OS, serving `routes` from a thread."""
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    state = LocalServer(base="")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            state.hits.append(self.path)
            route = state.routes.get(self.path, Route(b"nope", "text/plain", status=404))
            self.send_response(route.status)
            self.send_header("Content-Type", route.content_type)
            if route.with_length:
                self.send_header("Content-Length", str(len(route.body)))
            self.end_headers()
            try:
                if route.drip_s > 0:
                    for byte in route.body:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(route.drip_s)
                else:
                    self.wfile.write(route.body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client stopped reading: that is the limit under test at work

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def test_http_fetch_when_allowed(http_server: LocalServer, sample: Image.Image) -> None:
    http_server.routes["/img.png"] = Route(encode(sample))
    image = load_image(f"{http_server.base}/img.png", allow_url_fetch=True, fetch_policy=LOOPBACK)
    assert np.array_equal(pixels(image), pixels(sample))
    assert http_server.hits == ["/img.png"]


def test_http_refused_by_default_makes_no_request(http_server: LocalServer, sample: Image.Image) -> None:
    http_server.routes["/img.png"] = Route(encode(sample))
    with pytest.raises(ImageSourceError, match="URL fetching is off"):
        load_image(f"{http_server.base}/img.png")
    assert http_server.hits == []


def test_http_too_large_by_content_length(http_server: LocalServer) -> None:
    http_server.routes["/big"] = Route(b"\0" * 200_000)
    with pytest.raises(ImageTooLargeError, match="max_bytes=1000"):
        load_image(f"{http_server.base}/big", allow_url_fetch=True, fetch_policy=LOOPBACK, max_bytes=1000)


def test_http_too_large_without_content_length(http_server: LocalServer) -> None:
    http_server.routes["/stream"] = Route(b"\0" * 2_000_000, with_length=False)
    with pytest.raises(ImageTooLargeError, match="max_bytes=5000"):
        load_image(f"{http_server.base}/stream", allow_url_fetch=True, fetch_policy=LOOPBACK, max_bytes=5000)


def test_http_non_image_content(http_server: LocalServer) -> None:
    http_server.routes["/page"] = Route(b"<html><body>not an image</body></html>", "text/html")
    with pytest.raises(ImageDecodeError) as caught:
        load_image(f"{http_server.base}/page", allow_url_fetch=True, fetch_policy=LOOPBACK)
    message = str(caught.value)  # names the URL, never echoes the response (its bytes or its content type)
    assert "/page" in message and "text/html" not in message and "<html" not in message


def test_http_error_status(http_server: LocalServer) -> None:
    with pytest.raises(ImageSourceError, match="HTTP 404"):
        load_image(f"{http_server.base}/missing.png", allow_url_fetch=True, fetch_policy=LOOPBACK)


def test_http_slow_drip_hits_the_overall_deadline(http_server: LocalServer) -> None:
    # Each byte arrives well within the socket timeout; only the whole-download deadline stops it.
    http_server.routes["/drip"] = Route(b"\0" * 100, with_length=False, drip_s=0.05)
    start = time.monotonic()
    with pytest.raises(ImageSourceError, match="longer than 0.5 s"):
        load_image(f"{http_server.base}/drip", allow_url_fetch=True, fetch_policy=LOOPBACK, fetch_timeout_s=0.5)
    assert time.monotonic() - start < 3.0


def test_http_timeout_does_not_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    # A listening socket that never accepts: the kernel completes the handshake, nobody answers.
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        start = time.monotonic()
        with pytest.raises(ImageSourceError, match="fetch_timeout_s"):
            load_image(f"http://127.0.0.1:{silent.getsockname()[1]}/x.png", allow_url_fetch=True, fetch_policy=LOOPBACK, fetch_timeout_s=0.5)
        assert time.monotonic() - start < 5.0
    finally:
        silent.close()


# --- orientation and EXIF ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_rotated_image_comes_out_upright(fmt: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encode(two_colour_image(40, 20), fmt, exif=exif.tobytes())
    image = load_image(data)
    assert image.size == (20, 40)
    top, bottom = image.getpixel((10, 5)), image.getpixel((10, 34))
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60
    # Loading the result again must not rotate it a second time.
    assert load_image(image).size == (20, 40)


def test_preprocess_uses_the_upright_size() -> None:
    exif = Image.Exif()
    exif[0x0112] = 8
    data = encode(two_colour_image(1800, 600), "JPEG", exif=exif.tobytes())
    assert preprocess_image(data).grid == (1, 3)  # 600x1800 upright


def test_broken_exif_does_not_fail_the_image() -> None:
    data = encode(two_colour_image(), "JPEG", exif=b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\xff\x00")
    image = load_image(data)
    assert image.size == (40, 20)


def test_failing_exif_transpose_falls_back_to_no_rotation(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(two_colour_image(), "JPEG", exif=exif.tobytes())

    def broken(image: Image.Image) -> Image.Image:
        raise SyntaxError("not a TIFF IFD")

    monkeypatch.setattr(images_module.ImageOps, "exif_transpose", broken)
    with caplog.at_level(logging.DEBUG, logger="nvlm_engine.images"):
        image = load_image(data)
    assert image.size == (40, 20)
    assert "unreadable EXIF" in caplog.text


# --- pixel modes -------------------------------------------------------------------------


def test_transparent_pixels_become_white() -> None:
    rgba = Image.new("RGBA", (20, 10), (0, 0, 255, 255))
    rgba.paste((255, 0, 0, 0), (0, 0, 10, 10))  # transparent red
    image = load_image(encode(rgba))
    assert image.getpixel((2, 2)) == (255, 255, 255)
    assert image.getpixel((15, 5)) == (0, 0, 255)


def test_partial_alpha_blends_over_white() -> None:
    rng = np.random.default_rng(2)
    rgba = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    image = to_rgb(Image.fromarray(rgba, "RGBA"))
    colour, alpha = rgba[..., :3].astype(np.int64), rgba[..., 3:].astype(np.int64)
    expected = (colour * alpha + 255 * (255 - alpha) + 127) // 255
    assert np.abs(pixels(image).astype(np.int64) - expected).max() <= 1


def test_opaque_rgba_equals_convert_rgb() -> None:
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (30, 40, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    source = Image.fromarray(rgba, "RGBA")
    assert np.array_equal(pixels(to_rgb(source)), pixels(source.convert("RGB")))
    assert np.array_equal(pixels(load_image(encode(source))), pixels(source.convert("RGB")))


@pytest.mark.parametrize("mode", ["LA", "La", "PA", "RGBa"])
def test_other_alpha_modes_become_white_where_transparent(mode: str) -> None:
    base = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    base.paste((200, 200, 200, 255), (4, 0, 8, 8))
    if mode == "PA":
        image = Image.merge("PA", (base.convert("RGB").convert("P").getchannel(0), base.getchannel("A")))
    elif mode == "La":
        image = Image.merge("La", (Image.new("L", (8, 8), 0), base.getchannel("A")))
    else:
        image = base.convert(mode)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((1, 1)) == (255, 255, 255)


def test_palette_with_transparency_gif() -> None:
    image = Image.new("P", (10, 10), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(0, (0, 0, 5, 10))
    loaded = load_image(encode(image, "GIF", transparency=0))
    assert loaded.getpixel((1, 1)) == (255, 255, 255)
    assert loaded.getpixel((8, 8)) == (255, 0, 0)


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_image_is_scaled_not_saturated(mode: str) -> None:
    ramp = np.linspace(0, 65535, 256 * 4).round().astype(np.uint16).reshape(4, 256)
    # Built from raw bytes: Pillow's own I;16 -> I;16B convert clips to 255.
    image = Image.frombytes(mode, (256, 4), ramp.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    assert image.mode == mode
    rgb = pixels(to_rgb(image))[..., 0]
    assert rgb.min() == 0 and rgb.max() == 255
    assert 100 < np.median(rgb) < 160  # Pillow's own convert would saturate nearly all to 255
    assert np.array_equal(rgb, ((ramp.astype(np.int64) + 128) // 257).astype(np.uint8))


def test_16_bit_tiff_and_png_files() -> None:
    ramp = (np.arange(64 * 64, dtype=np.uint32) * 16).astype(np.uint16).reshape(64, 64)
    for fmt in ("PNG", "TIFF"):
        image = load_image(encode(Image.fromarray(ramp), fmt))
        values = pixels(image)[..., 0]
        assert values.max() == round(ramp.max() / 257) and values.min() == 0, fmt


def test_32_bit_integer_and_float_modes() -> None:
    eight_bit = np.arange(256, dtype=np.int32).reshape(16, 16)
    assert np.array_equal(pixels(to_rgb(Image.fromarray(eight_bit, "I")))[..., 0], eight_bit)
    sixteen = (eight_bit * 257).astype(np.int32)
    assert np.array_equal(pixels(to_rgb(Image.fromarray(sixteen, "I")))[..., 0], eight_bit)
    signed = (eight_bit - 128) * 100_000
    stretched = pixels(to_rgb(Image.fromarray(signed.astype(np.int32), "I")))[..., 0]
    assert stretched.min() == 0 and stretched.max() == 255
    unit = (eight_bit / 255).astype(np.float32)
    assert np.array_equal(pixels(to_rgb(Image.fromarray(unit, "F")))[..., 0], eight_bit)
    with_nan = unit.copy()
    with_nan[0, 0] = np.nan
    assert pixels(to_rgb(Image.fromarray(with_nan, "F")))[0, 0, 0] == 0


@pytest.mark.parametrize("mode", ["CMYK", "YCbCr", "LAB", "HSV", "1", "L", "P", "RGBX"])
def test_other_modes_convert_like_pillow(mode: str) -> None:
    rng = np.random.default_rng(4)
    image = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), "RGB").convert(mode)
    assert np.array_equal(pixels(to_rgb(image)), pixels(image.convert("RGB")))


def test_cmyk_jpeg() -> None:
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    image = load_image(encode(cmyk, "JPEG", quality=95))
    red, green, blue = image.getpixel((16, 16))
    assert red > 230 and green < 30 and blue < 30


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert load_image(data).getpixel((8, 8)) == (255, 0, 0)


def test_every_pillow_mode_ends_up_rgb() -> None:
    for mode in Image.MODES:
        image = Image.new(mode, (5, 3))
        rgb = to_rgb(image)
        assert (rgb.mode, rgb.size) == ("RGB", (5, 3)), mode


def test_rgb_image_is_returned_as_is() -> None:
    image = Image.new("RGB", (4, 4), (1, 2, 3))
    assert to_rgb(image) is image


# --- bad data ----------------------------------------------------------------------------


def test_header_claiming_huge_size_is_refused_fast() -> None:
    start = time.monotonic()
    with pytest.raises(ImageTooLargeError, match="pixels"):
        load_image(png_header_only(100_000, 100_000))
    # Below Pillow's thresholds, above ours.
    with pytest.raises(ImageTooLargeError, match="max_pixels=1,000,000"):
        load_image(png_header_only(2000, 1000), max_pixels=1_000_000)
    assert time.monotonic() - start < 2.0


def test_bomb_warning_becomes_an_error_and_does_not_leak(recwarn: pytest.WarningsRecorder) -> None:
    limit_before = Image.MAX_IMAGE_PIXELS
    # 100 MP: above Pillow's warning threshold (89 MP), below its error threshold (179 MP).
    with pytest.raises(ImageTooLargeError, match="exceeds limit"):
        load_image(png_header_only(10_000, 10_000), max_pixels=500_000_000)
    assert Image.MAX_IMAGE_PIXELS == limit_before
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_data_url_with_bad_base64() -> None:
    with pytest.raises(ImageDecodeError, match="valid base64"):
        load_image("data:image/png;base64,@@@@")


def test_max_pixels_applies_to_pil_input() -> None:
    with pytest.raises(ImageTooLargeError):
        load_image(Image.new("RGB", (100, 100)), max_pixels=9_999)


def test_truncated_jpeg() -> None:
    rng = np.random.default_rng(5)
    data = encode(Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(ImageDecodeError, match="re-save it as PNG or JPEG") as info:
        load_image(data[: len(data) // 2])
    assert info.value.__cause__ is not None
    assert f"bytes ({len(data) // 2} bytes)" in str(info.value)


@pytest.mark.parametrize("data", [b"", b"\x00", np.random.default_rng(6).bytes(5000), b"GIF89a" + b"\xff" * 10])
def test_random_or_empty_bytes(data: bytes) -> None:
    with pytest.raises(ImageDecodeError):
        load_image(data)


def test_errors_share_the_package_base_class() -> None:
    for error in (ImageDecodeError, ImageTooLargeError, ImageSourceError, ImageOptionsError):
        assert issubclass(error, ImageError) and issubclass(error, NVLMError)


# --- the shared test corpus ----------------------------------------------------------------


CORPUS = sorted(TESTDATA_IMAGES.iterdir()) if TESTDATA_IMAGES.is_dir() else []
# Pinned outcomes for files whose behaviour was checked by hand; every other file only has
# to decode correctly or be refused with an ImageError.
EXPECTED_OK = {"hopper.jpg", "hopper.png", "exif_imagemagick_orientation.png", "flower.webp", "16_bit_noise.tif"}
EXPECTED_REFUSED = {
    "decompression_bomb.gif": ImageTooLargeError,
    "bmp_b_shortfile.bmp": ImageDecodeError,
    "apng_syntax_num_frames_zero.png": ImageDecodeError,
    "crash-2020-10-test.tif": ImageDecodeError,
}

corpus = pytest.mark.skipif(not CORPUS, reason=f"shared test images not found at {TESTDATA_IMAGES}")


def upright_size(path: Path) -> tuple[int, int] | None:
    """The size Pillow reports after EXIF transposition, or None if Pillow cannot open it."""
    try:
        with Image.open(path) as image:
            try:
                return ImageOps.exif_transpose(image).size
            except Exception:  # noqa: BLE001 - broken EXIF: the stored size stands
                return image.size
    except Exception:  # noqa: BLE001
        return None


@corpus
@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_every_corpus_file_tiles_or_is_refused(path: Path) -> None:
    try:
        result = preprocess_image(path)
    except ImageError as e:
        assert path.name not in EXPECTED_OK, f"{path.name} should decode: {e}"
        expected = EXPECTED_REFUSED.get(path.name)
        assert expected is None or isinstance(e, expected), (path.name, type(e))
        assert str(e)
        return
    assert path.name not in EXPECTED_REFUSED, f"{path.name} should be refused"
    assert isinstance(result, TiledImage)
    size = upright_size(path)
    assert size is not None
    cols, rows = choose_grid(*size)
    expected_tiles = cols * rows + (cols * rows > 1)
    assert result.grid == (cols, rows)
    assert tuple(result.pixel_values.shape) == (expected_tiles, 3, 448, 448)
    assert torch.isfinite(result.pixel_values).all()


@corpus
def test_corpus_pins_are_present() -> None:
    names = {p.name for p in CORPUS}
    assert {"hopper.jpg", "hopper.png", "decompression_bomb.gif"} <= names


@corpus
def test_corpus_hopper_decodes_like_pillow() -> None:
    for name in ("hopper.jpg", "hopper.png"):
        with Image.open(TESTDATA_IMAGES / name) as expected:
            assert np.array_equal(pixels(load_image(TESTDATA_IMAGES / name)), pixels(expected.convert("RGB")))


@corpus
def test_corpus_exif_orientation_png_is_transposed() -> None:
    path = TESTDATA_IMAGES / "exif_imagemagick_orientation.png"
    if not path.exists():
        pytest.skip("exif_imagemagick_orientation.png not in the corpus")
    with Image.open(path) as raw:
        expected = ImageOps.exif_transpose(raw).convert("RGB")
        assert raw.getexif().get(0x0112) not in (None, 1)
    assert np.array_equal(pixels(load_image(path)), pixels(expected))


@corpus
def test_corpus_bomb_is_refused_fast() -> None:
    start = time.monotonic()
    with pytest.raises(ImageTooLargeError):
        load_image(TESTDATA_IMAGES / "decompression_bomb.gif")
    assert time.monotonic() - start < 1.0
