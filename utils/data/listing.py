"""Which layout a dataset has, listing it, the dataset flags, and the examples training uses."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from utils.data import preflight
from utils.data.hf_source import is_saved_dataset, list_hf, local_hf_files
from utils.data.layouts import list_ghibli, list_kohya, list_metadata, list_product
from utils.data.records import CACHE_FOLDER, DatasetError, Example, Listing, Problem, image_files, is_hidden

DATASET_TYPES = ("ghibli", "product", "kohya", "metadata", "hf")


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
    if is_saved_dataset(dataset_dir) or local_hf_files(dataset_dir):
        return "hf"
    if image_files(dataset_dir) or any(not is_hidden(p, dataset_dir) for p in dataset_dir.rglob("*.txt")):
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

    Images without a caption are left out. Training uses
    ``load_training_examples``, which also decodes every image and applies the policy flag.
    """
    listing = list_dataset(dataset_type, dataset_dir, caption_extension=caption_extension)
    problems = list(listing.problems)
    examples = []
    for entry in listing.entries:
        if entry.caption is None:
            continue
        if not entry.has_image:
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


def listing_from_args(args: argparse.Namespace, cache_dir: str | os.PathLike | None = None) -> Listing:
    """List the dataset the flags of ``add_dataset_arguments`` name; ``cache_dir`` (else --dataset_cache_dir,
    else a .dataset_cache beside the source) is where images of a `datasets` source are written."""
    return list_dataset(args.dataset_type, args.dataset_dir, dataset_name=args.dataset_name,
                        image_column=args.image_column, caption_column=args.caption_column,
                        cache_dir=cache_dir or args.dataset_cache_dir, config_name=args.dataset_config_name,
                        caption_extension=args.caption_extension)


def load_training_examples(args: argparse.Namespace, report_here: bool = True, masks: bool = False,
                           cache_dir: str | os.PathLike | None = None) -> tuple[list[Example], str]:
    """List the dataset, decode-check every image, log the report; return the usable examples and the
    dataset type actually read (auto detection, or hf implied by --dataset_name), which the run name and
    config record.

    ``report_here``: log the report and show progress (the main process of a launch); the other
    processes check silently, so a run reports once. ``masks``: with each image's loss mask (--masked_loss);
    ``cache_dir``: see ``listing_from_args``. Raises DatasetError when no image is usable, or on any problem
    with --bad_image_policy fail.
    """
    listing = listing_from_args(args, cache_dir)
    return checked_examples(listing, args, report_here, masks=masks), listing.dataset_type


def checked_examples(listing: Listing, args: argparse.Namespace, report_here: bool, masks: bool = False,
                     title: str = "Dataset check") -> list[Example]:
    """The usable examples of ``listing`` after the preflight check (with loss masks when ``masks``), the
    report logged under ``title`` when ``report_here``; DatasetError when training must not start."""
    report = preflight.check(listing, args.min_image_size, args.max_image_pixels, progress=report_here, masks=masks)
    policy = args.bad_image_policy
    if report_here:
        preflight.log_report(report, policy, title)
    preflight.enforce(report, policy)
    return report.examples
