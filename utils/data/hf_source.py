"""`datasets` sources: a Hub dataset, local .parquet/.arrow files or a save_to_disk folder, listed into
entries whose images are written once to a cache folder."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

from utils.core.atomic import write_bytes
from utils.data.records import (CACHE_FOLDER, IMAGE_SUFFIXES, DatasetError, Entry, Listing, Problem, is_hidden, pick_caption_column)

HF_FILE_SUFFIXES = (".parquet", ".arrow")


def local_hf_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.suffix in HF_FILE_SUFFIXES and not is_hidden(p, path))


def is_saved_dataset(path: Path) -> bool:
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
        if is_saved_dataset(path):
            return _only_split(datasets.load_from_disk(str(path)), source)
        if path.exists():
            files = local_hf_files(path)
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
    caption_column = pick_caption_column(columns, caption_column, source)
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

