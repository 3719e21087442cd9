"""Aspect-ratio buckets and the image transform that feeds SDXL (PIL/numpy only).

SDXL was trained on many aspect ratios. Each image goes to the bucket (width,
height; sides multiples of 64; area about resolution²) whose aspect ratio is
closest to its own, is resized to cover it and cropped to it. The square bucket
is always exactly resolution × resolution (any multiple of 8), so square images train at the size asked for. The SDXL
micro-conditioning records the source image's size and the crop.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class Prepared:
    pixels: torch.Tensor  # (3, H, W) in [-1, 1]
    original_size: tuple[int, int]  # (height, width) of the source image
    crop_top_left: tuple[int, int]  # (top, left) in the resized image
    target_size: tuple[int, int]  # (height, width) of the bucket
    resized_width: int  # width of the image after resizing, before cropping

    def flipped(self) -> "Prepared":
        """The horizontal mirror; the crop's left edge is then measured from the other side."""
        left = self.resized_width - self.crop_top_left[1] - self.target_size[1]
        return Prepared(self.pixels.flip(-1), self.original_size, (self.crop_top_left[0], left),
                        self.target_size, self.resized_width)


def make_buckets(resolution: int, step: int = 64, max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """(width, height) pairs with sides multiples of ``step`` and area at most resolution², plus the
    square (resolution, resolution) itself."""
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    width = step
    while width <= resolution * max_aspect:
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_aspect:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log space) to the image's; larger area wins ties."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def prepare_image(
    image: Image.Image,
    target: tuple[int, int],
    center_crop: bool = True,
    rng: random.Random | None = None,
) -> Prepared:
    """Resize ``image`` to cover ``target`` (width, height), crop to it, scale pixels to [-1, 1]."""
    target_width, target_height = target
    width, height = image.size
    scale = max(target_width / width, target_height / height)
    resized_width = max(target_width, round(width * scale))
    resized_height = max(target_height, round(height * scale))
    image = image.resize((resized_width, resized_height), Image.Resampling.LANCZOS)
    spare_x, spare_y = resized_width - target_width, resized_height - target_height
    if center_crop or rng is None:
        left, top = spare_x // 2, spare_y // 2
    else:
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    image = image.crop((left, top, left + target_width, top + target_height))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return Prepared(pixels, (height, width), (top, left), (target_height, target_width), resized_width)
