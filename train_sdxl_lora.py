#!/usr/bin/env python
"""Fine-tune Stable Diffusion XL with LoRA on a captioned image set (e.g. the Ghibli style).

Example:
    python train_sdxl_lora.py --dataset_dir dataset_ghibli --lora_rank 4 --lora_alpha 8
Multi-GPU:
    accelerate launch --num_processes 4 train_sdxl_lora.py ...
"""

from __future__ import annotations

import argparse
import sys

from utils.core.cli import run_cli
from utils.training.flags import parse_training_args

# The original script's helper functions stay importable from it (``from train_sdxl_lora import encode_prompt``);
# they load on first use (``__getattr__`` below), so a training run does not import them.
ORIGINAL_NAMES = ("_pick_caption", "collate_fn", "encode_prompt", "import_model_class_from_model_name_or_path")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.output_config:
        from utils.training.config_file import output_config
        output_config(args)
        return 0
    from utils.training.recipe import train
    train(args)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_training_args(argv, description=__doc__)


def __getattr__(name: str):
    if name in ORIGINAL_NAMES:
        from utils.compat import training_api
        return getattr(training_api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
