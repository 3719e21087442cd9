"""Convert a dataset between layouts: ghibli (images/ + captions.json), kohya (.txt beside each
image) and metadata (metadata.jsonl image folder, as `datasets` imagefolder reads it).

The source layout is detected (or given with --dataset_type; product, metadata.csv and `datasets`
sources are read too). Every image is checked first, as before training; usable images are copied
byte for byte, problems are reported and, with --bad_image_policy fail, stop the conversion. The
output folder appears complete or not at all.

Repeats (kohya's N_name/ folders) travel in the file names: every layout keeps an image's folder in
its name (ghibli: images/10_style/a.png), so kohya -> kohya keeps them and kohya -> ghibli/metadata ->
kohya gets them back. Only the kohya layout gives them meaning: trained as ghibli or metadata, each
image counts once per epoch, and the converter says so. Folders kohya leaves out (0_name/) are not
written. Kohya captions are written as .txt files. Loss masks (masks/ beside images/) are copied to the
ghibli layout; the kohya and metadata layouts cannot hold a masks/ folder, and the converter says so.

    python utils/convert_dataset.py --dataset_dir dataset_ghibli --to kohya --output_dir dataset_kohya
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path, PurePosixPath

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.data import preflight
from utils.core.atomic import replace_dir
from utils.core.cli import Parser, run_cli
from utils.data.listing import add_dataset_arguments, listing_from_args
from utils.data.masks import MASK_FOLDER, mask_file
from utils.data.records import DatasetError, Entry, folder_counts

logger = logging.getLogger(__name__)

TARGETS = ("ghibli", "kohya", "metadata")


def _names(entries: list[Entry], target: str) -> list[str]:
    """Output names (relative, posix) of the entries; kohya needs distinct stems for its .txt files."""
    names = [PurePosixPath(entry.name).as_posix() for entry in entries]
    seen: dict[str, str] = {}
    for name in names:
        key = str(PurePosixPath(name).with_suffix("")) if target == "kohya" else name
        if key in seen:
            raise DatasetError(f"'{seen[key]}' and '{name}' would share the output name '{key}'")
        seen[key] = name
    return names


def write_layout(entries: list[Entry], target: str, folder: Path) -> None:
    """Write ``entries`` (usable ones: image file and caption) in the ``target`` layout under ``folder``; in the
    ghibli layout their loss-mask files too, in ``masks/`` beside the images' folder as the source had them."""
    names = _names(entries, target)
    image_root = folder / "images" if target == "ghibli" else folder
    captions: dict[str, str] = {}
    lines = []
    for entry, name in zip(entries, names):
        destination = image_root / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(entry.image_path, destination)
        mask = mask_file(entry.image_path)
        if mask is not None and target == "ghibli":
            (destination.parent.parent / MASK_FOLDER).mkdir(exist_ok=True)
            shutil.copyfile(mask, destination.parent.parent / MASK_FOLDER / mask.name)
        caption = entry.caption.strip()
        if target == "kohya":
            destination.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        captions[name] = caption
        lines.append(json.dumps({"file_name": name, "text": caption}, ensure_ascii=False))
    if target == "ghibli":
        (folder / "captions.json").write_text(json.dumps(captions, indent=2, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
    elif target == "metadata":
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def repeats_warning(entries: list[Entry], target: str) -> str | None:
    """The line to show when ``target`` cannot hold the repeat counts of ``entries``."""
    repeated = [count for count in folder_counts(entries) if count.repeats != 1]
    if target == "kohya" or not repeated:
        return None
    folders = ", ".join(f"{count.folder}/ x{count.repeats}" for count in repeated)
    return (f"the {target} layout has no repeat counts: training on it sees each image once per epoch "
            f"(repeated folders: {folders}); the folder names stay in the file names, so converting back "
            f"to kohya restores them")


def masks_warning(entries: list[Entry], target: str) -> str | None:
    """The line to show when ``target`` cannot hold the loss-mask files of ``entries`` (alpha channels travel
    with the images)."""
    masked = sum(mask_file(entry.image_path) is not None for entry in entries)
    if target == "ghibli" or not masked:
        return None
    return (f"{masked} loss-mask file(s) in {MASK_FOLDER}/ are not written: the {target} layout keeps its images "
            f"in the dataset folder, where a {MASK_FOLDER}/ folder would be read as images; convert to ghibli, or "
            f"put the masks in the images' alpha channels")


def _check_output(output_dir: Path, dataset_dir: Path, overwrite: bool) -> None:
    output, source = output_dir.resolve(), dataset_dir.resolve()
    if output == source or output.is_relative_to(source) or source.is_relative_to(output):
        raise DatasetError(f"{output_dir}: the output folder must not overlap the dataset folder {dataset_dir}")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise DatasetError(f"{output_dir}: output folder is not empty (use --overwrite to replace it)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python utils/convert_dataset.py --dataset_dir dataset_ghibli --to kohya \\\n"
               "      --output_dir dataset_kohya")
    add_dataset_arguments(parser, default_type="auto")
    parser.add_argument("--to", required=True, choices=TARGETS, help="the layout to write")
    parser.add_argument("--output_dir", required=True, help="the new dataset folder")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    if not args.dataset_name:
        _check_output(output_dir, Path(args.dataset_dir), args.overwrite)
    elif output_dir.exists() and any(output_dir.iterdir()) and not args.overwrite:
        raise DatasetError(f"{output_dir}: output folder is not empty (use --overwrite to replace it)")
    output_dir.resolve().parent.mkdir(parents=True, exist_ok=True)
    # Images of a `datasets` source are only needed until they are copied out.
    with tempfile.TemporaryDirectory(prefix=".convert_cache.", dir=output_dir.resolve().parent) as scratch:
        listing = listing_from_args(args, cache_dir=args.dataset_cache_dir or scratch)
        report = preflight.check(listing, args.min_image_size, args.max_image_pixels)
        preflight.log_report(report, args.bad_image_policy)
        preflight.enforce(report, args.bad_image_policy)
        for warning in (repeats_warning(report.usable, args.to), masks_warning(report.usable, args.to)):
            if warning:
                logger.warning("%s", warning)
        replace_dir(output_dir, lambda folder: write_layout(report.usable, args.to, folder))
    print(f"{len(report.usable)} images written to {output_dir} in the {args.to} layout "
          f"({len(report.problems)} problem(s) skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
