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

The original's torch Datasets, ``GhibliDataset`` and ``ProductImageDataset``, built on today's listing;
importable from utils/ghibli_datasets.py, the original's import path. The layouts live in utils/data:
records.py (entries, problems), layouts.py (the folder layouts), hf_source.py (`datasets` sources),
listing.py (detection, the dataset flags, ``load_training_examples``); utils/data/preflight.py decodes every
image and decides which entries are usable.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch.utils.data import Dataset

from utils.data.images import open_rgb
from utils.data.layouts import list_ghibli, list_product
from utils.data.records import DatasetError, Entry, Listing, read_captions_json

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the original's torch Datasets


def _captioned_entries(listing: Listing) -> list[Entry]:
    """Entries with a caption and an existing image; the others are logged and left out (as the original did)."""
    for problem in listing.problems:
        logger.warning("%s: %s (left out)", listing.source, problem)
    kept = []
    for entry in listing.entries:
        if entry.caption is None:
            continue
        if not entry.has_image:
            logger.warning("%s: %s: image not found (left out)", listing.source, entry.label)
            continue
        kept.append(entry)
    if not kept:
        raise DatasetError(f"{listing.source}: no images with captions found ({listing.dataset_type} layout)")
    return kept


class _ListedDataset:
    """Shared part of the original's Datasets: entries from today's listing, images opened as RGB.

    The original's attributes are kept: ``captions`` (captions.json as loaded) and ``items`` (one dict per
    usable entry, in the original's keys, from the subclass's ``_original_items``).
    """

    def __init__(self, listing: Listing, transform=None):
        self.dataset_dir = Path(listing.source)
        self.transform = transform
        self.entries = _captioned_entries(listing)
        self.captions = read_captions_json(self.dataset_dir / "captions.json")
        self.items = self._original_items()
        logger.info("Loaded %d %s examples from %s", len(self.entries), listing.dataset_type, listing.source)

    def _original_items(self) -> list[dict]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.entries)

    def _image(self, path: Path):
        image = open_rgb(path)
        return self.transform(image) if self.transform else image


class GhibliDataset(_ListedDataset, Dataset):
    """The original's Ghibli dataset: ``images/*`` + ``captions.json``; items ``{"image", "text"}``.

    ``image`` is an RGB PIL image, or ``transform(image)`` when a transform is given.
    """

    def __init__(self, dataset_dir, transform=None):
        self.images_dir = Path(dataset_dir) / "images"
        super().__init__(list_ghibli(Path(dataset_dir)), transform)

    def _original_items(self) -> list[dict]:
        """``image_id`` is the caption's position in captions.json."""
        position = {name: index for index, name in enumerate(self.captions)}
        return [{"image_id": position[entry.name], "image_path": str(self.images_dir / entry.name),
                 "caption": entry.caption} for entry in self.entries]

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        return {"image": self._image(entry.image_path), "text": entry.caption}


class ProductImageDataset(_ListedDataset, Dataset):
    """The original's product dataset: items ``{"image", "product_image", "text"}``, where ``image`` is
    ``styled/{id}.png`` (the training target) and ``product_image`` is ``products/{product}``."""

    def __init__(self, dataset_dir, transform=None):
        self.products_dir = Path(dataset_dir) / "products"
        self.styled_dir = Path(dataset_dir) / "styled"
        super().__init__(list_product(Path(dataset_dir)), transform)

    def _original_items(self) -> list[dict]:
        """``image_id`` is the key in captions.json, the styled image's name without ``.png``."""
        items = []
        for entry in self.entries:
            image_id = entry.name.removesuffix(".png")
            items.append({"image_id": image_id,
                          "product_image": str(self.products_dir / self.captions[image_id]["product"]),
                          "styled_image": str(self.styled_dir / entry.name), "prompt": entry.caption})
        return items

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        return {"image": self._image(entry.image_path), "product_image": self._image(entry.product_path),
                "text": entry.caption}
