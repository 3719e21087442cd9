"""Preflight check: decode every image once, before training, and name each problem (file, reason).

An entry is usable when it has a non-empty caption and an image that Pillow fully decodes,
that is not a decompression bomb, and whose short side (after EXIF orientation) reaches the
minimum size. Grayscale, palette, alpha, CMYK and 16-bit/float images are usable: ``to_rgb``
converts them the same way for the check and for training.
"""

from __future__ import annotations

import logging
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from utils.data.images import to_rgb
from utils.data.masks import mask_problem
from utils.data.records import DatasetError, Entry, Example, FolderCount, Listing, Problem, folder_counts

logger = logging.getLogger(__name__)

# Pillow's own refusal threshold (it only warns between 1x and 2x MAX_IMAGE_PIXELS): about 13 400².
PILLOW_PIXEL_LIMIT = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error)


# ----------------------------------------------------------------------------- one image


@dataclass(frozen=True)
class ImageCheck:
    reason: str | None  # None when the image is usable
    mode: str | None = None  # Pillow mode before conversion
    rotated: bool = False  # EXIF orientation changed the image


def _decode_error(error: BaseException) -> str:
    if "truncated" in str(error).lower():
        return "truncated image (the file ends before the image data does)"
    return f"corrupt image ({type(error).__name__}: {error})"


def check_image(path: Path, min_image_size: int = 0, max_image_pixels: int | None = None) -> ImageCheck:
    """Decode ``path`` fully, apply EXIF orientation, convert to RGB; say why it is unusable, if so."""
    limit = min(max_image_pixels or PILLOW_PIXEL_LIMIT, PILLOW_PIXEL_LIMIT)
    if path.stat().st_size == 0:
        return ImageCheck("zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit is checked below
            with Image.open(path) as image:
                width, height = image.size
                if width * height > limit:
                    return ImageCheck(f"decompression bomb ({width}x{height} = {width * height} pixels, "
                                      f"limit {limit})")
                image.load()
                mode = image.mode
                upright = ImageOps.exif_transpose(image)
                rotated = upright.size != image.size or image.getexif().get(0x0112, 1) != 1
                try:
                    to_rgb(upright)
                except ValueError as error:
                    return ImageCheck(f"cannot convert colour mode {mode} to RGB ({error})", mode)
    except Image.DecompressionBombError:
        return ImageCheck(f"decompression bomb (more than Pillow's limit of {PILLOW_PIXEL_LIMIT} pixels)")
    except UnidentifiedImageError:
        return ImageCheck("not an image (Pillow cannot identify the file)")
    except DECODE_ERRORS as error:
        return ImageCheck(_decode_error(error))
    short_side = min(upright.size)
    if short_side < min_image_size:
        return ImageCheck(f"too small ({upright.size[0]}x{upright.size[1]}; the short side is under "
                          f"{min_image_size} pixels)", mode, rotated)
    return ImageCheck(None, mode, rotated)


# ----------------------------------------------------------------------------- the whole dataset


@dataclass
class Report:
    dataset_type: str
    source: str
    total: int
    usable: list[Entry] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    converted: Counter = field(default_factory=Counter)  # source mode -> number of images converted
    rotated: int = 0
    listing_notes: list[str] = field(default_factory=list)  # e.g. kohya 0_name/ folders left out
    masks: dict[Path, Path] = field(default_factory=dict)  # checked with masks: image -> its mask source

    @property
    def examples(self) -> list[Example]:
        return [Example(entry.image_path, entry.caption.strip(), entry.folder, entry.repeats,
                        self.masks.get(entry.image_path)) for entry in self.usable]

    def folders(self) -> list[FolderCount]:
        """Usable images per kohya folder with their repeats; empty when no folder or repeat sets them apart."""
        counts = folder_counts(self.usable)
        if all(count.folder == "." and count.repeats == 1 for count in counts):
            return []
        return counts

    def summary(self) -> str:
        return (f"{len(self.usable)} of {self.total} entries usable, {len(self.problems)} problem(s) "
                f"({self.dataset_type} dataset at {self.source})")

    def notes(self) -> list[str]:
        lines = list(self.listing_notes)
        folders = self.folders()
        if folders:
            lines += [f"folder {count}" for count in folders]
            lines.append(f"images seen per epoch: {sum(c.images_per_epoch for c in folders)} "
                         f"({len(self.usable)} distinct)")
        if self.converted:
            modes = ", ".join(f"{mode} {count}" for mode, count in sorted(self.converted.items()))
            lines.append(f"converted to RGB: {modes}")
        if self.rotated:
            lines.append(f"EXIF orientation applied: {self.rotated}")
        return lines

    def lines(self) -> list[str]:
        return [self.summary(), *map(str, self.problems), *self.notes()]


def _entry_problem(entry: Entry) -> str | None:
    """What makes an entry unusable before its image is decoded."""
    if entry.caption is None:
        return f"image without caption (no {entry.caption_file})" if entry.caption_file else "image without caption"
    if not entry.has_image:
        return "caption without image (file not found)"
    if not isinstance(entry.caption, str):
        return "caption is not a string"
    if not entry.caption.strip():
        return "empty caption"
    return None


def check(listing: Listing, min_image_size: int = 64, max_image_pixels: int | None = None,
          progress: bool = True, masks: bool = False) -> Report:
    """Check every entry of ``listing``; each image is decoded once. ``progress``: show a progress bar.
    ``masks`` (--masked_loss): each image needs a usable loss mask too (utils/data/masks.py)."""
    report = Report(listing.dataset_type, listing.source, len(listing.entries) + len(listing.problems),
                    problems=list(listing.problems), listing_notes=list(listing.notes))
    for entry in tqdm(listing.entries, desc="Checking images", unit="image", disable=not progress):
        reason = _entry_problem(entry)
        if reason is None:
            result = check_image(entry.image_path, min_image_size, max_image_pixels)
            reason = result.reason
            if reason is None and masks:
                report.masks[entry.image_path], reason = mask_problem(entry.image_path)
            if reason is None:
                report.usable.append(entry)
                report.rotated += result.rotated
                if result.mode != "RGB":
                    report.converted[result.mode] += 1
        if reason is not None:
            report.problems.append(Problem(entry.label, reason))
    return report


def log_report(report: Report, policy: str = "skip", title: str = "Dataset check") -> None:
    logger.info("%s: %s", title, report.summary())
    action = "skipped" if policy == "skip" else "not allowed with --bad_image_policy fail"
    for problem in report.problems:
        logger.warning("%s (%s)", problem, action)
    for note in report.notes():
        logger.info("%s: %s", title, note)


def enforce(report: Report, policy: str = "skip") -> None:
    """Raise DatasetError when training must not start: no usable image, or any problem under 'fail'."""
    first = f"; first: {report.problems[0]}" if report.problems else ""
    if not report.usable:
        raise DatasetError(f"{report.source}: no usable images out of {report.total}{first}")
    if report.problems and policy == "fail":
        raise DatasetError(f"{report.source}: {len(report.problems)} problem(s) and --bad_image_policy fail"
                           f"{first}")
