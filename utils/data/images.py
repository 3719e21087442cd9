"""Decoding images as the project sees them: upright (EXIF orientation applied), 8-bit RGB, transparency
laid on white. The preflight check, training, the captioner and the pictures all open images this way."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps

HIGH_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit and float grayscale to 8 bits by scaling; Pillow's own convert clips them to white."""
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
    elif image.mode == "I":
        scale = 1 / 257 if values.size and values.max() > 255 else 1.0  # 'I' often holds 16-bit data
    else:
        scale = 1 / 257
    values = np.nan_to_num(values * scale).clip(0, 255)
    return Image.fromarray(np.round(values).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is laid on ``background``."""
    if image.mode in HIGH_DEPTH_MODES:
        image = _high_depth_to_l(image)
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return image.convert("RGB")


def open_rgb(path: str | Path) -> Image.Image:
    """Decode an image upright (EXIF orientation applied) as 8-bit RGB."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))


def open_all(paths: Iterable[str | os.PathLike]) -> list[Image.Image]:
    """``open_rgb`` of each path, in order."""
    return [open_rgb(path) for path in paths]


def upright_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) as displayed, read from the header without decoding the pixels."""
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that rotate by 90 degrees
            return height, width
        return width, height
