#!/usr/bin/env python
"""Generate the same prompts and seeds with the SDXL base model and with a LoRA, side by side.

Example:
    python inference_sdxl_ghibli.py --lora_model_path output_ghibli/<run>/final_model \\
        --prompt "a quiet village by the sea in ghibli style" --run_base_inference --create_comparison_grid
Without --prompt, the original's 16 prompts are used (or those given with --prompts). Without
--lora_model_path, the newest output_ghibli/*/final_model is used. Without --run_base_inference, base
images are taken from --base_results_dir (default output_visualization/base_model_results).
Files, numbered from 1: base_prompt{k}_{ts}_{i}.png, lora_prompt{k}_{ts}_{i}.png,
comparison_grid_prompt{k}_{ts}.png, metadata_prompt{k}_{ts}.json.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from utils.core.cli import run_cli

logger = logging.getLogger("inference_sdxl_ghibli")

DEFAULT_PROMPTS = [  # the original's 16 prompts, verbatim
    'Draw a beautiful couple and their cat in a park in Ghibli style.',
    'A young girl flying on a broomstick over a seaside town, in Ghibli animation style.',
    'A quiet forest with a small cottage and a glowing spirit peeking from behind a tree, Ghibli-style.',
    'A group of children chasing fireflies at dusk in a peaceful countryside setting, Ghibli-inspired.',
    'An old train running through a field of golden wheat under a cloudy sky, in Ghibli art style.',
    'A curious fox wearing a small backpack exploring a mossy ancient ruin, drawn in Ghibli style.',
    'A calm lake reflecting the stars, with a girl sitting on a dock watching the sky, Ghibli-style.',
    'A magical marketplace filled with unusual creatures and lanterns, illustrated in Ghibli animation style.',
    'A flying island in the clouds with waterfalls cascading from its edges, in dreamy Ghibli aesthetic.',
    'A boy riding a deer through a misty bamboo forest, in Studio Ghibli style.',
    'An abandoned greenhouse slowly being taken over by nature, illustrated in warm Ghibli tones.',
    'A cozy kitchen where a grandmother is baking bread with help from tiny forest spirits, Ghibli-inspired.',
    'A mysterious black cat sitting on a rooftop watching over a rainy town, drawn like a Ghibli scene.',
    'A child and a large fluffy creature sitting together under a giant mushroom during the rain, Ghibli-style.',
    'A peaceful mountain village during a lantern festival at night, full of warm lights and soft details, Ghibli aesthetic.',
    'An elderly couple walking their dog in a snowy forest, in Ghibli style.',
]
RUNS_DIR = "output_ghibli"  # where the default LoRA is looked for
DEFAULT_NEGATIVE = "blurry, low quality, distorted, deformed, ugly, bad anatomy"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default="stabilityai/stable-diffusion-xl-base-1.0")
    p.add_argument("--revision", default=None)
    p.add_argument("--variant", default="fp16", help="falls back to the regular weights when the model has none")
    p.add_argument("--lora_model_path", default=None,
                   help="LoRA folder, .safetensors file (diffusers or kohya format) or Hub id "
                        f"(default: the newest {RUNS_DIR}/*/final_model)")
    p.add_argument("--prompt", default=None, help="one prompt (takes precedence over --prompts)")
    p.add_argument("--prompts", nargs="+", default=None, help="several prompts (default: the original's 16)")
    p.add_argument("--negative_prompt", default=DEFAULT_NEGATIVE)
    p.add_argument("--num_inference_steps", type=int, default=30)
    p.add_argument("--guidance_scale", type=float, default=5.0)
    p.add_argument("--num_images", type=int, default=3)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output_dir", default="output_visualization")
    p.add_argument("--lora_scale", type=float, default=1.0)
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--run_base_inference", action="store_true", help="generate base-model images too")
    p.add_argument("--base_results_dir", default="output_visualization/base_model_results",
                   help="saved base images: reused when their metadata shows the same prompt, seeds and "
                        "settings; without --run_base_inference also the original's base_prompt{k}_*.png")
    p.add_argument("--create_comparison_grid", action="store_true")
    p.add_argument("--allow_pickle", action="store_true",
                   help="allow pickle-based weights (.bin/.pt/.ckpt), which can run code when loaded")
    args = p.parse_args(argv)
    args.prompts = [args.prompt] if args.prompt else (args.prompts or DEFAULT_PROMPTS)
    return args


def default_lora(run_base: bool) -> str | None:
    """The newest trained run's final_model, for a call without --lora_model_path."""
    from utils.inference.generation import newest_final_model
    from utils.core.errors import UserError

    found = newest_final_model(Path(RUNS_DIR))
    if found:
        logger.info("No --lora_model_path: using the newest run's LoRA, %s", found)
        return str(found)
    if run_base:
        logger.warning("No --lora_model_path and no %s/*/final_model: base images only", RUNS_DIR)
        return None
    raise UserError(f"no --lora_model_path given and no trained run in {RUNS_DIR}/*/final_model; "
                    "pass --lora_model_path")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from utils.inference.generation import GenerationSettings, pick_device, resolve_lora_source, run_comparison
    from utils.core.sdxl import load_pipeline

    lora_path = args.lora_model_path or default_lora(args.run_base_inference)
    if lora_path:
        resolve_lora_source(lora_path, args.allow_pickle)  # fail on a bad path before loading SDXL
    device = pick_device(args.device)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipe = load_pipeline(args.pretrained_model_name_or_path, args.revision, args.variant, dtype,
                         allow_pickle=args.allow_pickle).to(device)
    settings = GenerationSettings(args.negative_prompt, args.num_inference_steps, args.guidance_scale,
                                  args.height, args.width)
    run_comparison(
        pipe, args.prompts, lora_path, args.lora_scale, settings, args.num_images, args.seed,
        Path(args.output_dir), args.pretrained_model_name_or_path, run_base=args.run_base_inference,
        base_results_dir=Path(args.base_results_dir) if args.base_results_dir else None,
        create_grid=args.create_comparison_grid, allow_pickle=args.allow_pickle,
    )
    logger.info("Images written to %s", args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
