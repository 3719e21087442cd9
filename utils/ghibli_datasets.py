"""Dataset layouts: turn a dataset folder (or a `datasets` source) into captioned image entries.

Layouts:
  ghibli    dataset_dir/images/* + dataset_dir/captions.json  {"file name": "caption"}   (the original)
  product   dataset_dir/captions.json {"id": {"product": file, "prompt": text}}, the product image at
            products/{product} and the styled image at styled/{id}.png (the original's layout;
            training uses the styled image and its prompt, as the original did)
  kohya     images anywhere under dataset_dir, each with a same-name caption file beside it
            (--caption_extension, .txt by default; kohya's .caption too). A top-level folder named
            N_name/ repeats each of its images N times per epoch, as kohya sd-scripts does
            (N is the whole number before the first underscore); 0_name/ is left out, as kohya
            leaves it out; other folders, and images directly in dataset_dir, count once
  metadata  an image folder with metadata.jsonl or metadata.csv: a file_name column and a
            caption column (text or caption), as the `datasets` imagefolder loader reads it
  hf        a Hub dataset name, or a local .parquet/.arrow file, a folder of them, or a
            save_to_disk folder, read with `datasets`; images are written once to a cache folder
  auto      any of the above, told apart by the files present

Listing a dataset only reads captions and file names; utils/data/preflight.py then decodes every
image and decides which entries are usable. ``load_training_examples`` does both for training.
``GhibliDataset`` and ``ProductImageDataset`` are the original's torch Datasets, built on the listing.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from utils.core.atomic import write_bytes

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DATASET_TYPES = ("ghibli", "product", "kohya", "metadata", "hf")
CACHE_FOLDER = ".dataset_cache"
HF_FILE_SUFFIXES = (".parquet", ".arrow")


class DatasetError(ValueError):
    """A dataset problem found before training starts; the message names the file and the reason."""


@dataclass(frozen=True)
class Example:
    image_path: Path
    caption: str
    folder: str = "."  # the kohya folder it came from ("." for the other layouts)
    repeats: int = 1  # times the image is seen per epoch (kohya's N_name/ folders)


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


# ----------------------------------------------------------------------------- helpers


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path}: captions file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object mapping names to captions")
    return data


def _inside(folder: Path, name: str, source: Path) -> Path:
    """Resolve ``name`` under ``folder``, refusing names that escape it (``../``, absolute paths)."""
    path = (folder / name).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise DatasetError(f"{source}: '{name}' points outside {folder}")
    return path


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` by suffix, sorted, skipping hidden files and folders (caches)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not _is_hidden(p, folder))


def _label(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _named_entries(listing: Listing, names: dict[str, Any], image_root: Path, label_root: Path,
                   source_file: Path) -> None:
    """Entries for a {name: caption} mapping whose names live under ``image_root``; the images
    under it that no name mentions become entries without a caption."""
    named: set[Path] = set()
    for name, caption in names.items():
        try:
            path = _inside(image_root, name, source_file)
        except DatasetError:
            listing.problems.append(Problem(name, f"named in {source_file.name} but points outside "
                                                  f"{_label(image_root, label_root) or '.'}/"))
            continue
        named.add(path)
        listing.entries.append(Entry(name, _label(path, label_root), path, caption))
    for path in _image_files(image_root):
        if path.resolve() not in named:
            name = path.relative_to(image_root).as_posix()
            listing.entries.append(Entry(name, _label(path, label_root), path, None))


def _pick_caption_column(columns: list[str], wanted: str | None, source: str) -> str:
    if wanted:
        if wanted not in columns:
            raise DatasetError(f"{source}: no caption column '{wanted}' (columns: {', '.join(columns)})")
        return wanted
    for candidate in ("text", "caption"):
        if candidate in columns:
            return candidate
    raise DatasetError(f"{source}: no 'text' or 'caption' column; name one with --caption_column "
                       f"(columns: {', '.join(columns)})")


# ----------------------------------------------------------------------------- folder layouts


def list_ghibli(dataset_dir: Path) -> Listing:
    captions_file = dataset_dir / "captions.json"
    images_dir = dataset_dir / "images"
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir}: images folder not found (another layout? try --dataset_type auto)")
    listing = Listing("ghibli", str(dataset_dir))
    _named_entries(listing, _read_json(captions_file), images_dir, dataset_dir, captions_file)
    return listing


def list_product(dataset_dir: Path) -> Listing:
    """The original's product layout: entry ``id`` trains on ``styled/{id}.png`` with its prompt;
    its ``products/{product}`` image must exist too (the original skipped pairs without one)."""
    captions_file = dataset_dir / "captions.json"
    styled_dir, products_dir = dataset_dir / "styled", dataset_dir / "products"
    for folder, what in ((styled_dir, "styled images"), (products_dir, "product images")):
        if not folder.is_dir():
            raise DatasetError(f"{folder}: {what} folder not found (the product layout is captions.json, "
                               f"products/ and styled/)")
    listing = Listing("product", str(dataset_dir))
    named: set[Path] = set()
    for key, entry in _read_json(captions_file).items():
        styled_name = f"{key}.png"
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) \
                or not isinstance(entry.get("product"), str):
            listing.problems.append(Problem(key, f"entry in {captions_file.name} needs 'product' and 'prompt' "
                                                 f"strings"))
            continue
        try:
            styled = _inside(styled_dir, styled_name, captions_file)
            product = _inside(products_dir, entry["product"], captions_file)
        except DatasetError as error:
            listing.problems.append(Problem(key, str(error)))
            continue
        named.add(styled)
        label = _label(styled, dataset_dir)
        if styled.is_file() and not product.is_file():
            listing.problems.append(Problem(label, f"product image {_label(product, dataset_dir)} not found"))
            continue
        listing.entries.append(Entry(styled_name, label, styled, entry["prompt"], product))
    for path in _image_files(styled_dir):
        if path.resolve() not in named:
            listing.entries.append(Entry(path.relative_to(styled_dir).as_posix(), _label(path, dataset_dir), path,
                                         None))
    return listing


def _kohya_folder(path: Path, dataset_dir: Path) -> tuple[str, int | None]:
    """(top-level folder, its repeat count) of an image; images directly in the dataset folder: ('.', 1)."""
    parts = path.relative_to(dataset_dir).parts
    if len(parts) == 1:
        return ".", 1
    repeats = kohya_repeats(parts[0])
    return parts[0], 1 if repeats is None else repeats


def _missing_caption_hint(path: Path, extension: str, dataset_dir: Path) -> str:
    """The caption file that was looked for, and the other kohya extension when that one is there."""
    wanted = _label(path.with_suffix(extension), dataset_dir)
    for other in (".txt", ".caption"):
        if other != extension and path.with_suffix(other).is_file():
            return f"{wanted}; {_label(path.with_suffix(other), dataset_dir)} exists: use --caption_extension {other}"
    return wanted


def list_kohya(dataset_dir: Path, caption_extension: str = ".txt") -> Listing:
    extension = normal_caption_extension(caption_extension)
    listing = Listing("kohya", str(dataset_dir))
    images = _image_files(dataset_dir)
    stems = {path.with_suffix("") for path in images}
    left_out: dict[str, int] = {}
    for path in images:
        folder, repeats = _kohya_folder(path, dataset_dir)
        if repeats == 0:
            left_out[folder] = left_out.get(folder, 0) + 1
            continue
        text_file = path.with_suffix(extension)
        caption, caption_file = None, None
        if text_file.is_file():
            try:
                caption = text_file.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                listing.problems.append(Problem(_label(text_file, dataset_dir), "caption file is not UTF-8 text"))
                continue
        else:
            caption_file = _missing_caption_hint(path, extension, dataset_dir)
        name = path.relative_to(dataset_dir).as_posix()
        listing.entries.append(Entry(name, name, path, caption, folder=folder, repeats=repeats,
                                     caption_file=caption_file))
    for folder, count in sorted(left_out.items()):
        listing.notes.append(f"{folder}/: repeat count 0, its {count} image(s) left out (as kohya does)")
    for text_file in sorted(dataset_dir.rglob(f"*{extension}")):
        if text_file.is_file() and not _is_hidden(text_file, dataset_dir) and text_file.with_suffix("") not in stems:
            listing.problems.append(Problem(text_file.relative_to(dataset_dir).as_posix(),
                                            "caption without image (no image file of the same name)"))
    return listing


def _metadata_rows(path: Path) -> list[tuple[int, dict | None]]:
    """(line number, row) pairs; a row is None where the line is not a JSON object."""
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            return [(index + 2, row) for index, row in enumerate(csv.DictReader(handle))]
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            rows.append((number, row if isinstance(row, dict) else None))
    return rows


def list_metadata(dataset_dir: Path, caption_column: str | None = None) -> Listing:
    files = [dataset_dir / name for name in ("metadata.jsonl", "metadata.csv") if (dataset_dir / name).is_file()]
    if not files:
        raise DatasetError(f"{dataset_dir}: no metadata.jsonl or metadata.csv")
    if len(files) > 1:
        raise DatasetError(f"{dataset_dir}: both metadata.jsonl and metadata.csv are present; keep one")
    metadata = files[0]
    try:
        rows = _metadata_rows(metadata)
    except (UnicodeDecodeError, csv.Error) as error:
        raise DatasetError(f"{metadata}: cannot be read ({error})") from error
    columns = sorted({key for _, row in rows if row for key in row})
    column = _pick_caption_column(columns, caption_column, str(metadata)) if rows else "text"
    listing = Listing("metadata", str(dataset_dir))
    names: dict[str, Any] = {}
    for number, row in rows:
        if row is None or not isinstance(row.get("file_name"), str):
            listing.problems.append(Problem(f"{metadata.name} line {number}",
                                            "not an object with a 'file_name' string"))
            continue
        names[row["file_name"]] = row.get(column)
    _named_entries(listing, names, dataset_dir, dataset_dir, metadata)
    return listing


# ----------------------------------------------------------------------------- `datasets` sources


def _local_hf_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.suffix in HF_FILE_SUFFIXES and not _is_hidden(p, path))


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _only_split(data: Any, source: str):
    """A Dataset out of a DatasetDict: the 'train' split, or the only one."""
    if not hasattr(data, "keys"):
        return data
    if "train" in data:
        return data["train"]
    if len(data) == 1:
        return next(iter(data.values()))
    raise DatasetError(f"{source}: no 'train' split among {', '.join(data)}")


def _open_hf(source: str, config_name: str | None, cache_dir: Path):
    import datasets

    path = Path(source)
    try:
        if _is_saved_dataset(path):
            return _only_split(datasets.load_from_disk(str(path)), source)
        if path.exists():
            files = _local_hf_files(path)
            if not files:
                raise DatasetError(f"{source}: no .parquet or .arrow files")
            if files[0].suffix == ".arrow":
                return datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files])
            return datasets.Dataset.from_parquet([str(f) for f in files], cache_dir=str(cache_dir / "hf"))
        return _only_split(datasets.load_dataset(source, config_name), source)
    except DatasetError:
        raise
    except Exception as error:  # datasets raises many kinds (FileNotFoundError, ConnectionError, ArrowInvalid...)
        raise DatasetError(f"{source}: cannot be loaded with datasets ({type(error).__name__}: {error})") from error


def _guess_suffix(data: bytes, name: str | None) -> str:
    suffix = Path(name).suffix.lower() if name else ""
    if suffix in IMAGE_SUFFIXES:
        return suffix
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as image:
            return "." + (image.format or "img").lower()
    except (UnidentifiedImageError, OSError, ValueError):
        return ".img"


def store_bytes(data: bytes, cache_dir: Path, name: str | None = None) -> Path:
    """Write image bytes once under ``cache_dir``, named by their SHA-256 (atomic; reused if present)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / (hashlib.sha256(data).hexdigest() + _guess_suffix(data, name))
    if not path.is_file():
        write_bytes(path, data)
    return path


def _row_image(value: Any, cache_dir: Path, local_root: Path | None) -> Path | str:
    """The image file of one row, or the reason there is none."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        return store_bytes(value["bytes"], cache_dir, value.get("path"))
    name = value.get("path") if isinstance(value, dict) else value
    if not isinstance(name, str) or not name:
        return "no image in this row"
    path = Path(name)
    if not path.is_absolute() and local_root is not None:
        path = local_root / path
    return path if path.is_file() else f"image file {name} not found"


def list_hf(source: str, image_column: str = "image", caption_column: str | None = None,
            cache_dir: Path = Path(CACHE_FOLDER), config_name: str | None = None) -> Listing:
    import datasets
    from tqdm.auto import tqdm

    data = _open_hf(source, config_name, cache_dir)
    columns = list(data.column_names)
    if image_column not in columns:
        raise DatasetError(f"{source}: no image column '{image_column}' (columns: {', '.join(columns)})")
    caption_column = _pick_caption_column(columns, caption_column, source)
    if isinstance(data.features[image_column], datasets.Image):
        data = data.cast_column(image_column, datasets.Image(decode=False))
    local = Path(source)
    local_root = (local if local.is_dir() else local.parent) if local.exists() else None
    listing = Listing("hf", source)
    rows = data.select_columns([image_column, caption_column])
    for index, row in enumerate(tqdm(rows, desc="Reading dataset rows", unit="row")):
        label = f"{source}[row {index}]"
        image = _row_image(row[image_column], cache_dir / "images", local_root)
        if isinstance(image, str):
            listing.problems.append(Problem(label, image))
            continue
        listing.entries.append(Entry(image.name, label, image, row[caption_column]))
    return listing


# ----------------------------------------------------------------------------- detection and dispatch


def detect_type(dataset_dir: Path) -> str:
    """Tell the layout of a dataset folder from the files in it."""
    if not dataset_dir.is_dir():
        raise DatasetError(f"{dataset_dir}: dataset directory not found")
    captions = dataset_dir / "captions.json"
    if captions.is_file():
        if (dataset_dir / "styled").is_dir():
            return "product"
        if (dataset_dir / "images").is_dir():
            return "ghibli"
    if (dataset_dir / "metadata.jsonl").is_file() or (dataset_dir / "metadata.csv").is_file():
        return "metadata"
    if _is_saved_dataset(dataset_dir) or _local_hf_files(dataset_dir):
        return "hf"
    if _image_files(dataset_dir) or any(not _is_hidden(p, dataset_dir) for p in dataset_dir.rglob("*.txt")):
        return "kohya"
    raise DatasetError(f"{dataset_dir}: cannot tell the dataset layout (no captions.json with images/ or "
                       f"styled/, no metadata.jsonl/csv, no parquet/arrow files, no images)")


def resolve_type(dataset_type: str, dataset_dir: Path, dataset_name: str | None) -> str:
    if dataset_name:
        if dataset_type not in ("auto", "ghibli", "hf"):  # ghibli is the default, so it yields to a name
            raise DatasetError(f"--dataset_name reads a `datasets` source; it does not go with "
                               f"--dataset_type {dataset_type}")
        return "hf"
    if dataset_type == "auto":
        return detect_type(dataset_dir)
    if dataset_type not in DATASET_TYPES:
        raise DatasetError(f"unknown dataset type '{dataset_type}' (choose from {', '.join(DATASET_TYPES)}, auto)")
    if not dataset_dir.is_dir():
        raise DatasetError(f"{dataset_dir}: dataset directory not found")
    return dataset_type


def list_dataset(dataset_type: str, dataset_dir: str | os.PathLike, *, dataset_name: str | None = None,
                 image_column: str = "image", caption_column: str | None = None,
                 cache_dir: str | os.PathLike | None = None, config_name: str | None = None,
                 caption_extension: str = ".txt") -> Listing:
    """List a dataset's entries without decoding images; ``dataset_type`` may be 'auto'."""
    dataset_dir = Path(dataset_dir)
    kind = resolve_type(dataset_type, dataset_dir, dataset_name)
    if kind == "hf":
        source = dataset_name or str(dataset_dir)
        local = Path(source)
        default_cache = (local if local.is_dir() else local.parent) if local.exists() else Path(".")
        cache = Path(cache_dir) if cache_dir else default_cache / CACHE_FOLDER
        return list_hf(source, image_column, caption_column, cache, config_name)
    if kind == "metadata":
        return list_metadata(dataset_dir, caption_column)
    if kind == "kohya":
        return list_kohya(dataset_dir, caption_extension)
    return {"ghibli": list_ghibli, "product": list_product}[kind](dataset_dir)


def load_examples(dataset_type: str, dataset_dir: str | Path, caption_extension: str = ".txt") -> list[Example]:
    """Strict listing without decoding: every captioned name must be a file inside the dataset.

    Images without a caption are left out, as in the original. Training uses
    ``load_training_examples``, which also decodes every image and applies the policy flag.
    """
    listing = list_dataset(dataset_type, dataset_dir, caption_extension=caption_extension)
    problems = list(listing.problems)
    examples = []
    for entry in listing.entries:
        if entry.caption is None:
            continue
        if entry.image_path is None or not entry.image_path.is_file():
            problems.append(Problem(entry.label, "caption without image (file not found)"))
        elif not isinstance(entry.caption, str):
            problems.append(Problem(entry.label, "caption is not a string"))
        else:
            examples.append(Example(entry.image_path, entry.caption.strip(), entry.folder, entry.repeats))
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise DatasetError(f"{dataset_dir}: {'; '.join(map(str, problems[:3]))}{more}")
    if not examples:
        raise DatasetError(f"{dataset_dir}: the dataset has no examples")
    return examples


# ----------------------------------------------------------------------------- command-line flags


def add_dataset_arguments(parser: argparse.ArgumentParser | Any, default_type: str = "ghibli",
                          default_policy: str = "skip") -> None:
    """The dataset flags shared by training, the preflight check and the converter."""
    parser.add_argument("--dataset_type", default=default_type, choices=[*DATASET_TYPES, "auto"],
                        help="ghibli: images/ + captions.json; product: captions.json + products/ + styled/{id}.png; "
                             "kohya: images with same-name caption files (N_name/ folders repeat their images N "
                             "times per epoch); metadata: metadata.jsonl/csv image folder; hf: a "
                             "`datasets` source; auto: tell from the files (default: %(default)s)")
    parser.add_argument("--dataset_dir", default="dataset_ghibli")
    parser.add_argument("--dataset_name", default=None,
                        help="a Hub dataset id or a local .parquet/.arrow file or folder (read with `datasets`; "
                             "implies --dataset_type hf)")
    parser.add_argument("--dataset_config_name", default=None, help="the Hub dataset's configuration")
    parser.add_argument("--image_column", default="image", help="image column of a `datasets` source")
    parser.add_argument("--caption_extension", default=".txt",
                        help="extension of the caption file beside each image in the kohya layout (.txt, or "
                             "kohya's .caption; default: %(default)s)")
    parser.add_argument("--caption_column", default=None,
                        help="caption column of a `datasets` source or metadata file (default: text, else caption)")
    parser.add_argument("--bad_image_policy", default=default_policy, choices=["skip", "fail"],
                        help="what a problem found by the preflight check does: skip the file with a "
                             "warning, or stop (default: %(default)s)")
    parser.add_argument("--min_image_size", type=int, default=64,
                        help="images whose short side is smaller are reported (pixels; default: %(default)s)")
    parser.add_argument("--max_image_pixels", type=int, default=None,
                        help="images with more pixels are reported as decompression bombs "
                             "(default: twice Pillow's MAX_IMAGE_PIXELS, about 179 million)")
    parser.add_argument("--dataset_cache_dir", default=None,
                        help="where images of a `datasets` source are written once (default: "
                             "{output_dir}/.dataset_cache when training)")


def listing_from_args(args: argparse.Namespace) -> Listing:
    cache_dir = getattr(args, "dataset_cache_dir", None)
    if not cache_dir and getattr(args, "output_dir", None):
        cache_dir = Path(args.output_dir) / CACHE_FOLDER
    return list_dataset(args.dataset_type, args.dataset_dir, dataset_name=getattr(args, "dataset_name", None),
                        image_column=getattr(args, "image_column", "image"),
                        caption_column=getattr(args, "caption_column", None), cache_dir=cache_dir,
                        config_name=getattr(args, "dataset_config_name", None),
                        caption_extension=getattr(args, "caption_extension", ".txt"))


def load_training_examples(args: argparse.Namespace, report_here: bool = True) -> list[Example]:
    """List the dataset, decode-check every image, log the report and return the usable examples.

    ``report_here``: log the report and show progress (the main process of a launch); the other
    processes check silently, so a run reports once.

    ``args.dataset_type`` is replaced by the type actually read (auto detection, or hf implied by
    --dataset_name), so the run name and config record it. Raises DatasetError when no image is
    usable, or on any problem with --bad_image_policy fail.
    """
    from utils.data import preflight  # preflight builds on this module's classes

    listing = listing_from_args(args)
    args.dataset_type = listing.dataset_type
    report = preflight.check(listing, getattr(args, "min_image_size", 64), getattr(args, "max_image_pixels", None),
                             progress=report_here)
    policy = getattr(args, "bad_image_policy", "skip")
    if report_here:
        preflight.log_report(report, policy)
    preflight.enforce(report, policy)
    return report.examples


# ----------------------------------------------------------------------------- the original's torch Datasets


def _captioned_entries(listing: Listing) -> list[Entry]:
    """Entries with a caption and an existing image; the others are logged and left out (as the original did)."""
    for problem in listing.problems:
        logger.warning("%s: %s (left out)", listing.source, problem)
    kept = []
    for entry in listing.entries:
        if entry.caption is None:
            continue
        if entry.image_path is None or not entry.image_path.is_file():
            logger.warning("%s: %s: image not found (left out)", listing.source, entry.label)
            continue
        kept.append(entry)
    if not kept:
        raise DatasetError(f"{listing.source}: no images with captions found ({listing.dataset_type} layout)")
    return kept


class _ListedDataset:
    """Shared part of the original's Datasets: entries from today's listing, images opened as RGB."""

    def __init__(self, listing: Listing, transform=None):
        self.dataset_dir = Path(listing.source)
        self.transform = transform
        self.entries = _captioned_entries(listing)
        logger.info("Loaded %d %s examples from %s", len(self.entries), listing.dataset_type, listing.source)

    def __len__(self) -> int:
        return len(self.entries)

    def _image(self, path: Path):
        from utils.data.preflight import open_rgb  # preflight builds on this module's classes
        image = open_rgb(path)
        return self.transform(image) if self.transform else image


class GhibliDataset(_ListedDataset, Dataset):
    """The original's Ghibli dataset: ``images/*`` + ``captions.json``; items ``{"image", "text"}``.

    ``image`` is an RGB PIL image, or ``transform(image)`` when a transform is given.
    """

    def __init__(self, dataset_dir, transform=None):
        super().__init__(list_ghibli(Path(dataset_dir)), transform)

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        return {"image": self._image(entry.image_path), "text": entry.caption}


class ProductImageDataset(_ListedDataset, Dataset):
    """The original's product dataset: items ``{"image", "product_image", "text"}``, where ``image`` is
    ``styled/{id}.png`` (the training target) and ``product_image`` is ``products/{product}``."""

    def __init__(self, dataset_dir, transform=None):
        super().__init__(list_product(Path(dataset_dir)), transform)

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        return {"image": self._image(entry.image_path), "product_image": self._image(entry.product_path),
                "text": entry.caption}
