#!/usr/bin/env python
"""Generate the same prompts and seeds with the SDXL base model and with a LoRA, side by side.

Example:
    python inference_sdxl_ghibli.py --lora_model_path output_ghibli/<run>/final_model \\
        --prompt "a quiet village by the sea in ghibli style" --run_base_inference --create_comparison_grid
Without --prompt, the original's 16 prompts are used (or those given with --prompts). Without
--lora_model_path, the newest output_ghibli/*/final_model is used (a run folder given there means its
final_model/). Without --pretrained_model_name_or_path, the base model that LoRA was trained on is used, as
its run records it (else the original's default). Without --run_base_inference, base
images are taken from --base_results_dir (default output_visualization/base_model_results).
Files, numbered from 1: base_prompt{k}_{ts}_{i}.png, lora_prompt{k}_{ts}_{i}.png,
comparison_grid_prompt{k}_{ts}.png, metadata_prompt{k}_{ts}.json.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from utils.compat.inference_api import (create_comparison_grid, load_base_pipeline,  # noqa: F401 (the original's
                                        load_lora_pipeline, save_metadata)  # names, importable here)
from utils.core.cli import run_cli
from utils.inference.flags import (DEFAULT_NEGATIVE, default_lora, parse_inference_args, prompt_seeds,  # noqa: F401
                                   prompt_settings)
from utils.inference.prompts import DEFAULT_PROMPTS  # noqa: F401 (the 16 default prompts, importable from here)

logger = logging.getLogger("inference_sdxl_ghibli")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from utils.inference.generation import run_comparison
    from utils.inference.pipeline import open_pipeline, resolve_lora_source
    from utils.inference.sources import lora_model_folder, with_sources

    # Every path is settled and checked here, before SDXL is loaded or any folder is made.
    lora_path = args.lora_model_path or default_lora(args.run_base_inference, args.use_best_model)
    if lora_path:
        lora_path = lora_model_folder(lora_path, args.use_best_model)
        resolve_lora_source(lora_path, args.allow_pickle)
    args = with_sources(args, lora_path)
    pipe, _ = open_pipeline(args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant,
                            device=args.device, allow_pickle=args.allow_pickle, model_config=args.model_config)
    run_comparison(
        pipe, args.prompts, lora_path, args.lora_scale, prompt_settings(args), args.num_images, args.seed,
        Path(args.output_dir), args.pretrained_model_name_or_path, run_base=args.run_base_inference,
        base_results_dir=Path(args.base_results_dir) if args.base_results_dir else None,
        create_grid=args.create_comparison_grid, allow_pickle=args.allow_pickle, first_seeds=prompt_seeds(args),
    )
    logger.info("Images written to %s", args.output_dir)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags (see utils/inference/flags.py); ``prompts`` holds the prompts to run."""
    return parse_inference_args(argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(run_cli(main))
