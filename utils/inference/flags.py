"""The flags of inference_sdxl_ghibli.py, and what a generation derives from them.

The sweep scripts pass their inference flags through the same parser (``parse_inference_args``), so
every LoRA of a sweep gets exactly the prompts, seeds and settings the script would give it. No torch
import here: the parser must start fast.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from utils.core.cli import Parser, derived
from utils.core.errors import UserError
from utils.core.names import SDXL_BASE_ID
from utils.core.prompt_file import read_prompt_file
from utils.inference.prompts import DEFAULT_PROMPTS
from utils.inference.sources import check_sizes

logger = logging.getLogger(__name__)

RUNS_DIR = "output_ghibli"  # where the default LoRA is looked for
DEFAULT_NEGATIVE = "blurry, low quality, distorted, deformed, ugly, bad anatomy"


@dataclass(frozen=True)
class GenerationSettings:
    negative_prompt: str
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int


def settings_of(args: argparse.Namespace) -> GenerationSettings:
    """The per-image settings given by the inference flags."""
    return GenerationSettings(args.negative_prompt, args.num_inference_steps, args.guidance_scale, args.height,
                              args.width)


def prompt_settings(args: argparse.Namespace) -> list[GenerationSettings] | GenerationSettings:
    """One GenerationSettings for every prompt, or, with --prompts_file, one per prompt: its inline options
    over the flags."""
    base = settings_of(args)
    if not getattr(args, "prompt_specs", None):
        return base
    return [replace(base, **{name: value for name, value in (
        ("negative_prompt", spec.negative_prompt), ("num_inference_steps", spec.steps),
        ("guidance_scale", spec.guidance_scale), ("height", spec.height), ("width", spec.width))
        if value is not None}) for spec in args.prompt_specs]


def prompt_seeds(args: argparse.Namespace) -> list[int | None] | None:
    """--prompts_file's --d seeds (None where a line has none), else None."""
    return [spec.seed for spec in args.prompt_specs] if getattr(args, "prompt_specs", None) else None


def seeds_for(prompt_index: int, num_images: int, seed: int) -> list[int]:
    """Image i of prompt k (both from 0) uses seed + k * num_images + i."""
    return [seed + prompt_index * num_images + i for i in range(num_images)]


def add_inference_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="diffusers folder, Hub id or single-file checkpoint (default: the base model the LoRA was "
                        f"trained on, as its run records it; else {SDXL_BASE_ID})")
    p.add_argument("--model_config", default=None,
                   help="with a single-file checkpoint: a local diffusers SDXL folder whose configs it uses "
                        "(no Hub access needed)")
    p.add_argument("--revision", default=None)
    p.add_argument("--variant", default="fp16", help="falls back to the regular weights when the model has none")
    p.add_argument("--lora_model_path", default=None,
                   help="LoRA folder, .safetensors file (diffusers or kohya format) or Hub id "
                        f"(default: the newest {RUNS_DIR}/*/final_model); a run folder means its final_model/")
    p.add_argument("--use_best_model", action="store_true",
                   help="with a run folder as --lora_model_path: its best_model/ instead of final_model/")
    p.add_argument("--prompt", default=None, help="one prompt (takes precedence over --prompts)")
    p.add_argument("--prompts", nargs="+", default=None, help="several prompts (default: the original's 16)")
    p.add_argument("--prompts_file", default=None,
                   help="prompts, one per line, with kohya's inline options (--n negative, --w/--h size, --s steps, "
                        "--l guidance, --d seed of the first image); takes precedence over --prompt and --prompts")
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


def parse_inference_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """The inference flags, with ``prompts`` resolved: --prompt, else --prompts, else the original's 16."""
    p = Parser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python inference_sdxl_ghibli.py \\\n"
               "      --prompt \"a quiet seaside town in ghibli style\" --run_base_inference --create_comparison_grid")
    add_inference_arguments(p)
    args = p.parse_args(argv)
    if args.prompts_file:
        specs = read_prompt_file(args.prompts_file)
        args = derived(args, prompts=[spec.prompt for spec in specs], prompt_specs=specs)
    else:
        args = derived(args, prompts=[args.prompt] if args.prompt else (args.prompts or DEFAULT_PROMPTS),
                       prompt_specs=None)
    check_sizes(args)
    return args


def default_lora(run_base: bool, use_best: bool = False) -> str | None:
    """The newest trained run's final_model (its run folder with ``use_best``), for a call without
    --lora_model_path."""
    from utils.inference.pipeline import newest_final_model

    found = newest_final_model(Path(RUNS_DIR))
    if found:
        logger.info("No --lora_model_path: using the newest run's LoRA, %s", found.parent if use_best else found)
        return str(found.parent if use_best else found)
    if run_base:
        logger.warning("No --lora_model_path and no %s/*/final_model: base images only", RUNS_DIR)
        return None
    raise UserError(f"no --lora_model_path given and no trained run in {RUNS_DIR}/*/final_model; "
                    "pass --lora_model_path")
