#!/usr/bin/env python
"""Generate the same prompts and seeds with the SDXL base model and with a LoRA, side by side.

Example:
    python inference_sdxl_ghibli.py --lora_model_path output_ghibli/<run>/final_model \\
        --prompt "a quiet village by the sea in ghibli style" --run_base_inference --create_comparison_grid
Without --prompt, the 16 default prompts are used (or those given with --prompts).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.cli import run_cli

DEFAULT_PROMPTS = [
    "a peaceful village on a green hillside under a blue sky, ghibli style",
    "a girl walking through a sunlit forest path, ghibli style",
    "a small red-roofed house by a quiet lake at sunset, ghibli style",
    "a cat sleeping on a window sill in the afternoon light, ghibli style",
    "a flying castle among white clouds, ghibli style",
    "a train crossing a flooded field under a summer sky, ghibli style",
    "a busy old town street with lanterns at night, ghibli style",
    "a boy riding a bicycle down a country road, ghibli style",
    "a giant tree in a meadow full of flowers, ghibli style",
    "a seaside town with white houses and a harbor, ghibli style",
    "a bakery with bread in the window on a rainy morning, ghibli style",
    "a bathhouse glowing warmly in the evening, ghibli style",
    "a field of tall grass swaying in the wind, ghibli style",
    "a mountain valley with a river and a wooden bridge, ghibli style",
    "a starry night sky over a quiet hill, ghibli style",
    "a garden full of vegetables and a small shed in spring, ghibli style",
]
DEFAULT_NEGATIVE = "blurry, low quality, distorted, deformed, ugly, bad anatomy"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default="stabilityai/stable-diffusion-xl-base-1.0")
    p.add_argument("--revision", default=None)
    p.add_argument("--variant", default="fp16", help="falls back to the regular weights when the model has none")
    p.add_argument("--lora_model_path", default=None,
                   help="LoRA folder, .safetensors file (diffusers or kohya format) or Hub id")
    p.add_argument("--prompt", default=None, help="one prompt (takes precedence over --prompts)")
    p.add_argument("--prompts", nargs="+", default=None, help="several prompts (default: 16 Ghibli prompts)")
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
    p.add_argument("--base_results_dir", default=None,
                   help="reuse base images saved there for the same prompt, seeds and settings")
    p.add_argument("--create_comparison_grid", action="store_true")
    p.add_argument("--allow_pickle", action="store_true",
                   help="allow pickle-based weights (.bin/.pt/.ckpt), which can run code when loaded")
    args = p.parse_args(argv)
    args.prompts = [args.prompt] if args.prompt else (args.prompts or DEFAULT_PROMPTS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from utils.comparison import GenerationSettings, pick_device, resolve_lora_source, run_comparison
    from utils.sdxl import load_pipeline

    if args.lora_model_path:
        resolve_lora_source(args.lora_model_path, args.allow_pickle)  # fail on a bad path before loading SDXL
    if not args.lora_model_path and not args.run_base_inference:
        raise FileNotFoundError("nothing to do: give --lora_model_path and/or --run_base_inference")
    device = pick_device(args.device)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipe = load_pipeline(args.pretrained_model_name_or_path, args.revision, args.variant, dtype,
                         allow_pickle=args.allow_pickle).to(device)
    settings = GenerationSettings(args.negative_prompt, args.num_inference_steps, args.guidance_scale,
                                  args.height, args.width)
    run_comparison(
        pipe, args.prompts, args.lora_model_path, args.lora_scale, settings, args.num_images, args.seed,
        Path(args.output_dir), args.pretrained_model_name_or_path,
        run_base=args.run_base_inference or args.create_comparison_grid,
        base_results_dir=Path(args.base_results_dir) if args.base_results_dir else None,
        create_grid=args.create_comparison_grid, allow_pickle=args.allow_pickle,
    )
    print(f"Images written to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
