"""Build a tiny SDXL pipeline and a synthetic style dataset, offline and in seconds.

The pipeline uses the real diffusers/transformers classes with the SDXL topology
(two CLIP text encoders, the second with a projection, ``text_time`` added
conditioning, a VAE with the 8x downscale, an Euler scheduler) so every code path
that loads, trains and runs SDXL can be exercised without downloading weights.

    python utils/make_tiny_sdxl.py --model_dir tiny_sdxl --dataset_dir tiny_dataset
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.core.cli import Parser
from utils.tiny.sdxl import make_synthetic_dataset, save_tiny_sdxl

def main(argv: list[str] | None = None) -> None:
    parser = Parser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python utils/make_tiny_sdxl.py --model_dir tiny_sdxl --dataset_dir tiny_dataset")
    parser.add_argument("--model_dir", default="tiny_sdxl", help="where to save the tiny pipeline")
    parser.add_argument("--dataset_dir", default=None, help="also write a synthetic dataset here")
    parser.add_argument("--num_images", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    save_tiny_sdxl(args.model_dir, args.seed)
    if args.dataset_dir:
        make_synthetic_dataset(args.dataset_dir, args.num_images, args.seed)


if __name__ == "__main__":
    sys.exit(main())
