"""Build a tiny CLIP model with its processor, offline and in a second, for the demo and the tests.

It uses the real transformers classes (CLIPModel, CLIPTokenizer, CLIPImageProcessor,
CLIPProcessor) and is saved with ``save_pretrained``, so the metric code loads it exactly
as it loads ``openai/clip-vit-large-patch14``. The weights are random: the numbers it
gives are deterministic and differ between images, but they say nothing about style. The tests use
it where speed matters; the demo's metrics use the CLIP trained on procedural scenes in both looks
(``models/tiny_scenes/clip``, see utils/pretrain_demo_model.py).

    python utils/make_tiny_clip.py --output_dir tiny_clip
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.core.cli import Parser
from utils.tiny.clip import save_tiny_clip

__all__ = ["save_tiny_clip", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = Parser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python utils/make_tiny_clip.py --output_dir tiny_clip")
    parser.add_argument("--output_dir", default="tiny_clip", help="where to save the tiny CLIP")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    save_tiny_clip(args.output_dir, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
