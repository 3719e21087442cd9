"""The records of a dataset listing: examples, entries, problems, folder counts, and the helpers
every layout shares (reading a captions file, finding images, naming them in reports)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.core.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CACHE_FOLDER = ".dataset_cache"


class DatasetError(UserError, ValueError):
    """A dataset problem found before training starts; the message names the file and the reason."""


@dataclass(frozen=True)
class Example:
    image_path: Path
    caption: str
    folder: str = "."  # the kohya folder it came from ("." for the other layouts)
    repeats: int = 1  # times the image is seen per epoch (kohya's N_name/ folders)
    mask_path: Path | None = None  # --masked_loss: the mask file, or the image itself for its alpha channel
    is_reg: bool = False  # a regularisation image (--reg_data_dir), its loss weighted by --prior_loss_weight


@dataclass(frozen=True)
class Entry:
    """One image/caption pair as the layout names it; either half may be missing."""

    name: str  # the image's name inside the layout's image folder (what a converter writes)
    label: str  # how reports name it: a path relative to the dataset folder, or a row of a dataset
    image_path: Path | None
    caption: Any  # a str when the layout has one; None for an image without a caption
    product_path: Path | None = None  # product layout: the product image beside the styled one
    folder: str = "."  # kohya: the top-level folder under the dataset folder ("." for the other layouts)
    repeats: int = 1  # kohya: N of an N_name/ folder
    caption_file: str | None = None  # kohya: the caption file looked for (named when it is missing)

    @property
    def has_image(self) -> bool:
        """Whether the image file is there (a caption may name a file that is not)."""
        return self.image_path is not None and self.image_path.is_file()


@dataclass(frozen=True)
class Problem:
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


@dataclass
class Listing:
    dataset_type: str
    source: str
    entries: list[Entry] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)  # found while listing (bad names, bad rows)
    notes: list[str] = field(default_factory=list)  # facts worth a line in the report (folders left out)


@dataclass(frozen=True)
class FolderCount:
    """Images of one kohya folder and how often each is seen per epoch."""

    folder: str
    images: int
    repeats: int

    @property
    def images_per_epoch(self) -> int:
        return self.images * self.repeats

    def as_dict(self) -> dict:
        return {"folder": self.folder, "images": self.images, "repeats": self.repeats,
                "images_per_epoch": self.images_per_epoch}

    def __str__(self) -> str:
        return (f"{self.folder}/: {self.images} image(s) x {self.repeats} repeat(s) = {self.images_per_epoch} "
                f"seen per epoch")


def folder_counts(items: list) -> list[FolderCount]:
    """Per folder (in name order): image count and repeats of Entries or Examples."""
    counts: dict[str, list[int]] = {}
    for item in items:
        counts.setdefault(item.folder, [0, item.repeats])[0] += 1
    return [FolderCount(folder, images, repeats) for folder, (images, repeats) in sorted(counts.items())]


def kohya_repeats(folder_name: str) -> int | None:
    """The repeat count kohya reads from a folder name: the whole number before the first underscore
    (``10_ghibli`` -> 10, ``3_a_b`` -> 3); None when the name has none (``style``, ``v2_style``)."""
    head = folder_name.split("_", 1)[0]
    return int(head) if head.isascii() and head.isdigit() else None


def normal_caption_extension(extension: str) -> str:
    """``.txt`` as given, ``txt`` with its dot added; an empty extension is refused."""
    extension = extension.strip()
    if extension in ("", "."):
        raise DatasetError("--caption_extension is empty (use .txt or .caption)")
    return extension if extension.startswith(".") else "." + extension


def read_captions_json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path}: captions file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object mapping names to captions")
    return data


def inside(folder: Path, name: str, source: Path) -> Path:
    """Resolve ``name`` under ``folder``, refusing names that escape it (``../``, absolute paths)."""
    path = (folder / name).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise DatasetError(f"{source}: '{name}' points outside {folder}")
    return path


def is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` by suffix, sorted, skipping hidden files and folders (caches)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not is_hidden(p, folder))


def label_of(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def named_entries(listing: Listing, names: dict[str, Any], image_root: Path, label_root: Path,
                   source_file: Path) -> None:
    """Entries for a {name: caption} mapping whose names live under ``image_root``; the images
    under it that no name mentions become entries without a caption."""
    named: set[Path] = set()
    for name, caption in names.items():
        try:
            path = inside(image_root, name, source_file)
        except DatasetError:
            listing.problems.append(Problem(name, f"named in {source_file.name} but points outside "
                                                  f"{label_of(image_root, label_root) or '.'}/"))
            continue
        named.add(path)
        listing.entries.append(Entry(name, label_of(path, label_root), path, caption))
    for path in image_files(image_root):
        if path.resolve() not in named:
            name = path.relative_to(image_root).as_posix()
            listing.entries.append(Entry(name, label_of(path, label_root), path, None))


def pick_caption_column(columns: list[str], wanted: str | None, source: str) -> str:
    if wanted:
        if wanted not in columns:
            raise DatasetError(f"{source}: no caption column '{wanted}' (columns: {', '.join(columns)})")
        return wanted
    for candidate in ("text", "caption"):
        if candidate in columns:
            return candidate
    raise DatasetError(f"{source}: no 'text' or 'caption' column; name one with --caption_column "
                       f"(columns: {', '.join(columns)})")

