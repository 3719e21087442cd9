"""Loss masks (--masked_loss): where a training image's mask comes from, how it is read, and what makes one
unusable. A mask is 8-bit grey at the image's size: white trains, black is left out of the loss.

The mask of ``.../images/name.png`` is a file of the same stem in ``.../masks/`` (any image suffix; its
grey level), else the image's own alpha channel. The file wins when both exist, as in kohya sd-scripts,
whose conditioning images take precedence over alpha masks.
"""

from __future__ import annotations

import glob
import math
from pathlib import Path

from PIL import Image, ImageOps

from utils.data.images import ALPHA_MODES, to_rgb, upright_size
from utils.data.records import IMAGE_SUFFIXES, label_of

MASK_FOLDER = "masks"
ASPECT_TOLERANCE = 0.01  # relative difference of width/height ratios still taken as the same shape


def mask_file(image_path: Path) -> Path | None:
    """The file of the same stem in the ``masks/`` folder beside the image's folder, if there is one."""
    folder = image_path.parent.parent / MASK_FOLDER
    if not folder.is_dir():
        return None
    found = sorted(p for p in folder.glob(glob.escape(image_path.stem) + ".*")
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return found[0] if found else None


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)


def mask_source(image_path: Path) -> Path | None:
    """The mask file, else the image itself when it has an alpha channel, else None (no mask)."""
    found = mask_file(image_path)
    if found is not None:
        return found
    with Image.open(image_path) as image:
        return image_path if has_alpha(image) else None


def open_mask(source: Path, image_path: Path) -> Image.Image:
    """The mask as 8-bit grey ("L"), upright, at the image's upright size: the alpha channel when ``source``
    is the image itself, else the grey level of the mask file (resized when it has another resolution)."""
    with Image.open(source) as image:
        image.load()
        upright = ImageOps.exif_transpose(image)
        if source == image_path:
            mask = upright.convert("RGBA").getchannel("A")
        else:
            mask = to_rgb(upright).convert("L")
    size = upright_size(image_path)
    return mask if mask.size == size else mask.resize(size, Image.Resampling.BILINEAR)


def mask_problem(image_path: Path) -> tuple[Path | None, str | None]:
    """(mask source, None) for a usable mask, else (source or None, why it is unusable)."""
    try:
        source = mask_source(image_path)
    except OSError as error:
        return None, f"cannot read the image for its mask ({error})"
    if source is None:
        return None, (f"no mask: the image has no alpha channel and there is no "
                      f"{MASK_FOLDER}/{image_path.stem}.* file beside its folder")
    what = "alpha channel" if source == image_path else f"mask {label_of(source, image_path.parent.parent)}"
    try:
        with Image.open(source) as image:
            width, height = ImageOps.exif_transpose(image).size
        mask = open_mask(source, image_path)
    except (OSError, SyntaxError, ValueError) as error:
        return source, f"{what} cannot be read ({type(error).__name__}: {error})"
    image_width, image_height = upright_size(image_path)
    if abs(math.log((width / height) / (image_width / image_height))) > ASPECT_TOLERANCE:
        return source, (f"{what} is {width}x{height}, the image {image_width}x{image_height}: another aspect "
                        f"ratio")
    if mask.getextrema()[1] == 0:
        return source, f"{what} is empty (all zero): nothing of the image would train"
    return source, None
