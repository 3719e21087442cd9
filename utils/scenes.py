"""Procedural landscape scenes in two looks, with captions: the demo model's data.

A scene is a small random description (time of day, ground, lake, houses, trees, clouds). The same
description is drawn either in a plain **photo** look (natural colours, shaded gradients, film grain,
no outlines) or in a **Ghibli-like** look (a warm pastel palette, flat cel shading, dark outlines, big
soft clouds). Its caption names what is in the picture, in the words a prompt would use:

    photo:  "a photo of a small house by a lake under the sun, with trees"
    ghibli: "The image is a Ghibli-style illustration of a small house by a lake under the sun, ..."

The photo scenes pretrain the demo's base model (utils/pretrain_demo_model.py); the Ghibli-like ones
are the demo's LoRA training set, written in the original's layout (``images/`` + ``captions.json``);
both, with their captions, train the demo's tiny CLIP.

    python -m utils.scenes --output_dir dataset_ghibli --num_images 24      (a Ghibli-like dataset)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.tiny.scenes import STYLES, write_style_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
