"""Write a dataset of procedural scenes (utils/tiny/scenes.py draws them) in the ghibli layout.

    python -m utils.scenes --output_dir dataset_ghibli --num_images 24      (a Ghibli-like dataset)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.core.cli import Parser
from utils.tiny.scenes import STYLES, write_style_dataset


def main(argv: list[str] | None = None) -> int:
    parser = Parser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m utils.scenes --output_dir dataset_ghibli --num_images 24")
    parser.add_argument("--output_dir", default="dataset_ghibli")
    parser.add_argument("--num_images", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--style", choices=STYLES, default="ghibli")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    write_style_dataset(args.output_dir, args.num_images, args.seed, args.size, args.style)
    return 0


if __name__ == "__main__":
    sys.exit(main())
