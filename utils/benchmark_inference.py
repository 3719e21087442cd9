"""Inference speed: the base model against the same model with a LoRA, unfused and fused.

A LoRA with the trainer's settings (rank, alpha, target modules) and random non-zero weights is
written with the project's ``save_lora`` and loaded with ``load_lora_weights`` through the inference
CLI's own ``load_adapter``; images are made by the CLI's ``generate`` (negative prompt, guidance,
VAE decode included). Each round runs base, LoRA unfused, LoRA fused (``pipe.fuse_lora``), then
unfuses and unloads, so background load hits the three modes alike. A fused LoRA is ordinary
weights: it should cost no measurable speed, while unfused layers add their low-rank products.

    python utils/benchmark_inference.py --model small            # CPU
    python utils/benchmark_inference.py --model sdxl             # GPU: 1024x1024, 30 steps, fp16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from utils.bench.inference_runs import make_lora_file, report, run_rounds
from utils.bench.models import DEFAULT_RESOLUTION, MODELS, check_resolution
from utils.core.cli import Parser, derived, run_cli

DEFAULT_STEPS = {"tiny": 10, "small": 4, "sdxl": 30}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python utils/benchmark_inference.py --model small")
    p.add_argument("--model", choices=MODELS, default="small")
    p.add_argument("--resolution", type=int, default=None, help="default: tiny 128, small 256, sdxl 1024")
    p.add_argument("--num_inference_steps", type=int, default=None, help="default: tiny 10, small 4, sdxl 30")
    p.add_argument("--guidance_scale", type=float, default=5.0)
    p.add_argument("--images", type=int, default=2, help="timed images per mode and round (after one warm-up)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds of base / unfused / fused")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                   help="default: fp16 on a GPU (as inference_sdxl_ghibli.py), fp32 on CPU")
    p.add_argument("--lora_rank", type=int, default=8)
    p.add_argument("--lora_alpha", type=float, default=8.0)
    p.add_argument("--num_threads", type=int, default=None, help="CPU threads (default: 1 on CPU)")
    p.add_argument("--output_json", default=None)
    return check_resolution(p, p.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    given = parse_args(argv)
    # The flags with the model's defaults filled in: what the run used, as reported and saved.
    args = derived(given, resolution=given.resolution or DEFAULT_RESOLUTION[given.model],
                   num_inference_steps=given.num_inference_steps or DEFAULT_STEPS[given.model])
    from diffusers.utils import logging as diffusers_logging

    from utils.bench.models import build_pipeline

    diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoders": expected, UNet-only LoRA
    from utils.inference.flags import GenerationSettings

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype_name = args.dtype or ("fp16" if cuda else "fp32")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    if not cuda:
        torch.set_num_threads(args.num_threads or 1)
    elif args.num_threads:
        torch.set_num_threads(args.num_threads)

    pipe = build_pipeline(args.model, device, weight_dtype=dtype)
    pipe.vae.to(dtype)  # as from_pretrained(torch_dtype=...) loads it; the pipeline upcasts for decoding
    pipe.set_progress_bar_config(disable=True)
    settings = GenerationSettings(negative_prompt="blurry, low quality", num_inference_steps=args.num_inference_steps,
                                  guidance_scale=args.guidance_scale, height=args.resolution, width=args.resolution)
    with tempfile.TemporaryDirectory(prefix="benchmark_inference_") as scratch:
        lora_folder = make_lora_file(pipe, Path(scratch) / "lora", args.lora_rank, args.lora_alpha).parent
        results = run_rounds(pipe, lora_folder, settings, args, device)
    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    report(args, results, device_name, dtype_name)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"args": vars(args), **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
