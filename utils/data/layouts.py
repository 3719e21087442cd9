"""The folder layouts: ghibli, product, kohya and metadata, each listed into entries without decoding images."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from utils.data.records import (DatasetError, Entry, Listing, Problem, image_files, inside, is_hidden, kohya_repeats, label_of, named_entries, normal_caption_extension, pick_caption_column, read_captions_json)


def list_ghibli(dataset_dir: Path) -> Listing:
    captions_file = dataset_dir / "captions.json"
    images_dir = dataset_dir / "images"
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir}: images folder not found (another layout? try --dataset_type auto)")
    listing = Listing("ghibli", str(dataset_dir))
    named_entries(listing, read_captions_json(captions_file), images_dir, dataset_dir, captions_file)
    return listing


def list_product(dataset_dir: Path) -> Listing:
    """The original's product layout: entry ``id`` trains on ``styled/{id}.png`` with its prompt;
    its ``products/{product}`` image must exist too (pairs without one are left out)."""
    captions_file = dataset_dir / "captions.json"
    styled_dir, products_dir = dataset_dir / "styled", dataset_dir / "products"
    for folder, what in ((styled_dir, "styled images"), (products_dir, "product images")):
        if not folder.is_dir():
            raise DatasetError(f"{folder}: {what} folder not found (the product layout is captions.json, "
                               f"products/ and styled/)")
    listing = Listing("product", str(dataset_dir))
    named: set[Path] = set()
    for key, entry in read_captions_json(captions_file).items():
        styled_name = f"{key}.png"
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) \
                or not isinstance(entry.get("product"), str):
            listing.problems.append(Problem(key, f"entry in {captions_file.name} needs 'product' and 'prompt' "
                                                 f"strings"))
            continue
        try:
            styled = inside(styled_dir, styled_name, captions_file)
            product = inside(products_dir, entry["product"], captions_file)
        except DatasetError as error:
            listing.problems.append(Problem(key, str(error)))
            continue
        named.add(styled)
        label = label_of(styled, dataset_dir)
        if styled.is_file() and not product.is_file():
            listing.problems.append(Problem(label, f"product image {label_of(product, dataset_dir)} not found"))
            continue
        listing.entries.append(Entry(styled_name, label, styled, entry["prompt"], product))
    for path in image_files(styled_dir):
        if path.resolve() not in named:
            listing.entries.append(Entry(path.relative_to(styled_dir).as_posix(), label_of(path, dataset_dir), path,
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
    wanted = label_of(path.with_suffix(extension), dataset_dir)
    for other in (".txt", ".caption"):
        if other != extension and path.with_suffix(other).is_file():
            return f"{wanted}; {label_of(path.with_suffix(other), dataset_dir)} exists: use --caption_extension {other}"
    return wanted


def list_kohya(dataset_dir: Path, caption_extension: str = ".txt") -> Listing:
    extension = normal_caption_extension(caption_extension)
    listing = Listing("kohya", str(dataset_dir))
    images = image_files(dataset_dir)
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
                listing.problems.append(Problem(label_of(text_file, dataset_dir), "caption file is not UTF-8 text"))
                continue
        else:
            caption_file = _missing_caption_hint(path, extension, dataset_dir)
        name = path.relative_to(dataset_dir).as_posix()
        listing.entries.append(Entry(name, name, path, caption, folder=folder, repeats=repeats,
                                     caption_file=caption_file))
    for folder, count in sorted(left_out.items()):
        listing.notes.append(f"{folder}/: repeat count 0, its {count} image(s) left out (as kohya does)")
    for text_file in sorted(dataset_dir.rglob(f"*{extension}")):
        if text_file.is_file() and not is_hidden(text_file, dataset_dir) and text_file.with_suffix("") not in stems:
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
    column = pick_caption_column(columns, caption_column, str(metadata)) if rows else "text"
    listing = Listing("metadata", str(dataset_dir))
    names: dict[str, Any] = {}
    for number, row in rows:
        if row is None or not isinstance(row.get("file_name"), str):
            listing.problems.append(Problem(f"{metadata.name} line {number}",
                                            "not an object with a 'file_name' string"))
            continue
        names[row["file_name"]] = row.get(column)
    named_entries(listing, names, dataset_dir, dataset_dir, metadata)
    return listing

