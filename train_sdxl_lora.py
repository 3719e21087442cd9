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
from utils.training.original_api import (_pick_caption, collate_fn, encode_prompt,  # noqa: F401 (the original's
                                         import_model_class_from_model_name_or_path)  # names, importable here)


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


if __name__ == "__main__":
    sys.exit(run_cli(main))
