"""Inputs for the LangChain tests: ChatNVLM options for the CPU, and images and PDFs made in memory."""

from __future__ import annotations

import base64
import io

import torch
from PIL import Image

CHAT_PARAMS = {"device_map": "cpu", "dtype": "float32"}
"""Engine options every test ChatNVLM uses, so that they all share one loaded engine."""


def random_image(width: int = 640, height: int = 480, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy())


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pdf_bytes(*pages: Image.Image) -> bytes:
    """A PDF with one image per page, written by Pillow (no PDF library needed to make one)."""
    buffer = io.BytesIO()
    first, *rest = [page.convert("RGB") for page in pages]
    first.save(buffer, format="PDF", save_all=True, append_images=rest, resolution=72.0)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
