"""Check a dataset before training: decode every image and print each problem by file and reason.

    python utils/check_dataset.py --dataset_dir dataset_ghibli
    python utils/check_dataset.py --dataset_dir my_photos --dataset_type kohya --min_image_size 256

Exit status 0 when training would start with these flags, 1 when it would not. The check is
strict by default (--bad_image_policy fail: any problem gives 1); with --bad_image_policy skip
it answers whether training would start after skipping the bad files. 2: the dataset could not be
read at all (the one-line error says why).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.data import preflight
from utils.core.cli import Parser, run_cli
from utils.data.listing import add_dataset_arguments, listing_from_args
from utils.data.records import DatasetError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python utils/check_dataset.py --dataset_dir dataset_ghibli")
    add_dataset_arguments(parser, default_type="auto", default_policy="fail")
    parser.add_argument("--masked_loss", action="store_true",
                        help="check each image's loss mask too, as training with --masked_loss does")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = preflight.check(listing_from_args(args), args.min_image_size, args.max_image_pixels,
                             masks=args.masked_loss)
    print("\n".join(report.lines()))
    try:
        preflight.enforce(report, args.bad_image_policy)
    except DatasetError as error:
        print(f"training would not start: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
