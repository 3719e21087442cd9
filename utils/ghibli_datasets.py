"""Dataset layouts: turn a dataset folder into a list of (image file, caption) examples.

Layouts of the original:
  ghibli   dataset_dir/images/* + dataset_dir/captions.json  {"file name": "caption"}
  product  dataset_dir/products/, styled/, captions.json      {"id": {"product": file, "prompt": text}}
           (training uses the styled image and its prompt)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class DatasetError(ValueError):
    """A dataset problem found before training starts; the message names the file and the reason."""


@dataclass(frozen=True)
class Example:
    image_path: Path
    caption: str


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


def load_ghibli(dataset_dir: Path) -> list[Example]:
    captions_file = dataset_dir / "captions.json"
    images_dir = dataset_dir / "images"
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir}: images folder not found")
    examples = []
    for name, caption in _read_json(captions_file).items():
        if not isinstance(caption, str):
            raise DatasetError(f"{captions_file}: caption of '{name}' is not a string")
        examples.append(Example(_inside(images_dir, name, captions_file), caption.strip()))
    return examples


def load_product(dataset_dir: Path) -> list[Example]:
    captions_file = dataset_dir / "captions.json"
    styled_dir = dataset_dir / "styled"
    if not styled_dir.is_dir():
        raise DatasetError(f"{styled_dir}: styled images folder not found")
    examples = []
    for key, entry in _read_json(captions_file).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise DatasetError(f"{captions_file}: entry '{key}' needs a 'prompt' string")
        name = entry.get("styled") or entry.get("product") or key
        examples.append(Example(_inside(styled_dir, str(name), captions_file), entry["prompt"].strip()))
    return examples


LOADERS = {"ghibli": load_ghibli, "product": load_product}


def load_examples(dataset_type: str, dataset_dir: str | Path) -> list[Example]:
    """Read a dataset's examples and check that each named image exists; raise DatasetError if not."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise DatasetError(f"{dataset_dir}: dataset directory not found")
    if dataset_type not in LOADERS:
        raise DatasetError(f"unknown dataset type '{dataset_type}' (choose from {', '.join(LOADERS)})")
    examples = LOADERS[dataset_type](dataset_dir)
    missing = [example.image_path for example in examples if not example.image_path.is_file()]
    if missing:
        shown = ", ".join(str(path) for path in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DatasetError(f"{dataset_dir}: captions name {len(missing)} missing image(s): {shown}{more}")
    if not examples:
        raise DatasetError(f"{dataset_dir}: the dataset has no examples")
    return examples
