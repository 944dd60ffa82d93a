"""Turn an image source into one upright RGB `PIL.Image.Image`.

This module takes any source (`image_sources.py` reads files, bytes, base64, data URLs and,
when allowed, http(s) URLs; PIL images pass through) and knows how Pillow decodes them and what can go wrong on the way
(decompression bombs, truncated or corrupt data, odd pixel modes, broken EXIF). Every such
failure becomes one of the typed errors in `nvlm_engine.errors`; no raw Pillow exception
leaves this module. It knows nothing about tiles, tensors or the model: see `tiling.py`.

Two deliberate differences from the model card's `Image.open(f).convert('RGB')`:
the EXIF orientation is applied (photos from phones come out upright), and transparent
pixels are composited over white instead of keeping whatever colour the transparent pixels
happen to store. For opaque images without an orientation tag the result is exactly
`Image.open(f).convert('RGB')`.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from nvlm_engine.errors import (
    ImageAspectRatioError,
    ImageDecodeError,
    ImageError,
    ImageOptionsError,
    ImageTooLargeError,
)
from nvlm_engine.fetch import FetchPolicy
from nvlm_engine.image_sources import read_source

__all__ = [
    "DEFAULT_FETCH_TIMEOUT_S",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "MAX_ASPECT_RATIO",
    "ImageSource",
    "load_image",
    "read_source",
    "to_rgb",
]

logger = logging.getLogger(__name__)

# 64 MP: comfortably above any camera photo or A4 scan at 600 dpi (35 MP), well below Pillow's
# own bomb warning (89 MP), and small enough that the decoded RGB image stays under 200 MB.
DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
# Longest side over shortest side, checked from the header with the pixel count. Pillow's cost
# grows with the rows (a row-pointer and per-row work in decode, convert and resize: a 1x4,000,000
# strip of 4 MP peaks ~280 MB above its pixels, 1x64,000,000 needs gigabytes), and the tile grids
# cover at most 1:12, so a 1:100 strip is squashed 8x or more into its grid. Within 100:1 and
# 64 MP an image has at most 80,000 rows, whose per-row overhead is a few MB.
MAX_ASPECT_RATIO = 100
DEFAULT_FETCH_TIMEOUT_S = 10.0

ImageSource = Union[str, os.PathLike[str], bytes, bytearray, memoryview, Image.Image]

_EXIF_ORIENTATION = 0x0112
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_RESAVE_HINT = "re-save it as PNG or JPEG"


def load_image(
    source: ImageSource,
    *,
    allow_url_fetch: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S,
    fetch_policy: FetchPolicy | None = None,
) -> Image.Image:
    """Read an image from any supported source and return it upright, in RGB.

    A `str` source is read as, in this order: an `http://` / `https://` URL; a
    `data:image/...;base64,` URL; a `file://` URL (treated exactly like the local path it
    names; only an empty host or `localhost` is accepted); an existing file path; otherwise
    strict base64 (ASCII whitespace is ignored, any other character outside the base64
    alphabet is an error). An `os.PathLike` is always a path; `bytes`, `bytearray` and
    `memoryview` are the encoded file itself (not base64).

    Animated images give their first frame (a PIL image given directly gives its current
    frame). The EXIF orientation is applied; broken EXIF is ignored. The pixel mode is
    normalized with `to_rgb`.

    Args:
        source: a path, `file://` URL, encoded bytes, base64 text, data URL, http(s) URL or
            PIL image.
        allow_url_fetch: fetch http(s) URLs. Off by default, so that text from an untrusted
            client cannot make the server open connections (SSRF).
        max_pixels: the most pixels (width * height) accepted, checked from the header
            before any pixel data is decoded. Pillow's process-wide `Image.MAX_IMAGE_PIXELS`
            still applies on top; this function never changes it.
        max_bytes: the most encoded bytes accepted from a file, bytes or URL. A URL body is
            read incrementally and at most `max_bytes + 1` bytes are ever read.
        fetch_timeout_s: the socket timeout of a URL fetch, and the deadline of the whole
            download.
        fetch_policy: where a fetched URL and each of its redirects may go (see
            `nvlm_engine.fetch.FetchPolicy`). None is `FetchPolicy()`: http and https, any
            host, public addresses only, at most 3 redirects.

    Returns:
        A fully loaded `PIL.Image.Image` in mode "RGB" (the given object itself when a PIL
        image needs no change).

    Raises:
        ImageSourceError: the source is missing, of an unsupported kind, a URL while
            fetching is off, or the download failed or timed out.
        ImageURLRefusedError: `fetch_policy` refuses the URL or one of its redirects
            (a subclass of ImageSourceError).
        ImageTooLargeError: more than `max_pixels` pixels or `max_bytes` bytes; its subclass
            ImageAspectRatioError for an image beyond `MAX_ASPECT_RATIO`:1 (checked from the header).
        ImageDecodeError: the data is not a readable image (corrupt, truncated, unknown).
        ImageOptionsError: a limit is not positive.
    """
    if max_pixels < 1 or max_bytes < 1 or not fetch_timeout_s > 0:
        raise ImageOptionsError(
            "max_pixels and max_bytes must be >= 1 and fetch_timeout_s > 0; got "
            f"max_pixels={max_pixels}, max_bytes={max_bytes}, fetch_timeout_s={fetch_timeout_s}"
        )
    if isinstance(source, Image.Image):
        return _finish(source, "PIL image", max_pixels)
    data, label = read_source(
        source, allow_url_fetch=allow_url_fetch, max_bytes=max_bytes, fetch_timeout_s=fetch_timeout_s,
        fetch_policy=fetch_policy,
    )
    return _decode(data, label, max_pixels)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an image of any Pillow mode to a loaded RGB image, without saturating.

    - "RGB" (without a transparent colour key) is returned as is, not copied.
    - Alpha ("RGBA", "LA", "PA", premultiplied "RGBa" / "La", or a "transparency" key on
      "P", "L" or "RGB"): composited over white. An image whose alpha is 255 everywhere
      gives exactly `image.convert("RGB")`.
    - 16-bit "I;16*": `round(v / 257)`, mapping 0..65535 onto 0..255.
    - 32-bit "I": kept if all values lie in 0..255 (8-bit data stored wide), else
      `round(v / 257)` if in 0..65535 (16-bit data), else stretched from [min, max].
    - float "F": `v * 255` if all finite values lie in [0, 1], kept if in [0, 255],
      `v / 257` if in [0, 65535], else stretched from [min, max]; NaN becomes 0.
    - everything else ("1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"): `convert("RGB")`.

    Args:
        image: any PIL image, loaded or not.

    Returns:
        An RGB image.

    Raises:
        ImageDecodeError: the pixels cannot be loaded or the mode cannot be converted.
    """
    try:
        if image.mode == "RGB" and "transparency" not in image.info:
            image.load()
            return image
        if image.mode in _WIDE_MODES:
            # Checked before alpha: a colour key on 16-bit data is in 16-bit units, and
            # Pillow's own "I;16" -> "RGBA" path would saturate everything above 255.
            return _wide_to_rgb(image)
        if image.mode in _ALPHA_MODES or "transparency" in image.info:
            return _composite_over_white(image)
        return image.convert("RGB")
    except ImageError:
        raise
    except Exception as e:
        raise ImageDecodeError(
            f"cannot convert a {image.mode} image of size {image.size} to RGB "
            f"({type(e).__name__}: {e}); {_RESAVE_HINT}"
        ) from e


# --- decoding ----------------------------------------------------------------------------


def _decode(data: bytes, label: str, max_pixels: int) -> Image.Image:
    # Pillow reports a possible bomb as a warning below 2x MAX_IMAGE_PIXELS and as an error
    # above; both must become ImageTooLargeError, and its other warnings (corrupt EXIF...)
    # belong in the log, not on stderr. catch_warnings is process-wide state, so a warning
    # raised by another thread meanwhile may end up in this log too: harmless.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            opened = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise ImageTooLargeError(f"{label}: {e}; downscale the image") from e
        except Image.UnidentifiedImageError as e:
            raise ImageDecodeError(
                # The bytes themselves stay out: they may be a fetched page or a local file.
                f"{label} is not an image format Pillow can read; {_RESAVE_HINT}"
            ) from e
        except Exception as e:
            raise ImageDecodeError(
                f"{label} has a corrupt image header ({type(e).__name__}: {e}); {_RESAVE_HINT}"
            ) from e
        for warning in caught:
            if issubclass(warning.category, Image.DecompressionBombWarning):
                raise ImageTooLargeError(f"{label}: {warning.message}; downscale the image")
        # Image.open only read the header: the size check happens before any pixel decoding.
        image = _finish(opened, label, max_pixels)
    for warning in caught:
        logger.debug("%s: Pillow warned: %s", label, warning.message)
    return image


def _finish(image: Image.Image, label: str, max_pixels: int) -> Image.Image:
    _check_pixels(image, label, max_pixels)
    _load_pixels(image, label)
    image = _apply_exif_orientation(image, label)
    return to_rgb(image)


def _check_pixels(image: Image.Image, label: str, max_pixels: int) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"{label} has no pixels (size {width}x{height}); {_RESAVE_HINT}")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{label} is {width}x{height} = {width * height:,} pixels, above max_pixels={max_pixels:,} "
            "(a possible decompression bomb); downscale it, or raise max_pixels if you trust it"
        )
    # A strip is refused from its header too, before its pixels are decoded (see MAX_ASPECT_RATIO).
    long_side, short_side = max(width, height), min(width, height)
    if long_side > MAX_ASPECT_RATIO * short_side:
        raise ImageAspectRatioError(
            f"{label} is {width}x{height}, an aspect ratio of {long_side / short_side:,.0f}:1, beyond the "
            f"{MAX_ASPECT_RATIO}:1 this engine tiles (tile grids cover at most 12:1, and such a strip costs "
            f"memory per row); crop it, or cut it into parts of at most {MAX_ASPECT_RATIO}:1 sent as separate images"
        )


def _load_pixels(image: Image.Image, label: str) -> None:
    try:
        image.load()
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{label}: {e}; downscale the image") from e
    except Exception as e:
        # Pillow's decoders signal bad data with OSError, SyntaxError, ValueError, TypeError,
        # EOFError, struct.error, IndexError... depending on the plugin. Whatever they raise
        # here means the same thing to the caller: these bytes are not a usable image.
        raise ImageDecodeError(
            f"{label} ({image.format or 'unknown'} {image.mode} {image.size[0]}x{image.size[1]}) "
            f"cannot be decoded: {type(e).__name__}: {e}; the file is corrupt or truncated, "
            f"{_RESAVE_HINT}"
        ) from e
    # Some plugins (ICO, ICNS) pick their real size only when loading.
    if image.size[0] <= 0 or image.size[1] <= 0:
        raise ImageDecodeError(f"{label} decoded to an empty image; {_RESAVE_HINT}")


def _apply_exif_orientation(image: Image.Image, label: str) -> Image.Image:
    # Read the tag first: exif_transpose copies the whole image even when there is nothing
    # to do, which costs a few ms on a 12 MP photo.
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        if orientation not in range(2, 9):
            return image
        # exif_transpose also drops the tag from the result, so a second pass is a no-op.
        return ImageOps.exif_transpose(image)
    except Exception as e:  # noqa: BLE001 - metadata must never cost us the pixels
        logger.debug("%s: ignoring unreadable EXIF (%s: %s)", label, type(e).__name__, e)
        return image


# --- pixel modes -------------------------------------------------------------------------


def _composite_over_white(image: Image.Image) -> Image.Image:
    # "La" has no direct path to RGBA in Pillow; "LA" does (it un-premultiplies).
    source = image.convert("LA") if image.mode == "La" else image
    rgba = source if source.mode == "RGBA" else source.convert("RGBA")
    alpha = rgba.getchannel("A")
    if alpha.getextrema() == (255, 255):
        return rgba.convert("RGB")
    # paste with a mask computes dst + (src - dst) * a / 255: white where a == 0, the
    # colour itself where a == 255.
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, (0, 0), alpha)
    return background


def _wide_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image)
    if image.mode.startswith("I;16"):
        eight_bit = _divide_by_257(values)
    elif image.mode == "I":
        lo, hi = int(values.min()), int(values.max())
        if lo >= 0 and hi <= 255:
            eight_bit = values.astype(np.uint8)
        elif lo >= 0 and hi <= 65535:
            eight_bit = _divide_by_257(values)
        else:
            eight_bit = _stretch(values.astype(np.float64), lo, hi)
    else:
        eight_bit = _float_to_uint8(values)
    return Image.fromarray(eight_bit, mode="L").convert("RGB")


def _divide_by_257(values: np.ndarray) -> np.ndarray:
    # 65535 / 257 == 255 exactly, so 0..65535 maps onto the full 0..255 with rounding.
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.uint8)
    lo, hi = float(values[finite].min()), float(values[finite].max())
    if lo >= 0.0 and hi <= 1.0:
        scaled = values * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        scaled = values
    elif lo >= 0.0 and hi <= 65535.0:
        scaled = values / 257.0
    else:
        return _stretch(np.where(finite, values, lo).astype(np.float64), lo, hi)
    return np.clip(np.rint(np.nan_to_num(scaled, nan=0.0)), 0, 255).astype(np.uint8)


def _stretch(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.clip(np.rint((values - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
