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
import logging
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from utils.bench.models import DEFAULT_RESOLUTION, MODELS

logger = logging.getLogger("benchmark_inference")

DEFAULT_STEPS = {"tiny": 10, "small": 4, "sdxl": 30}
MODES = ("base", "lora_unfused", "lora_fused")
LABELS = {"base": "base model", "lora_unfused": "LoRA, unfused (load_lora_weights)",
          "lora_fused": "LoRA, fused (fuse_lora)"}
PROMPT = "a quiet village by the sea under a golden sky, ghibli style"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    args = p.parse_args(argv)
    if args.resolution is not None and args.resolution % 64:
        p.error(f"--resolution {args.resolution} must be a multiple of 64")
    return args


def make_lora_file(pipe, folder: Path, rank: int, alpha: float) -> Path:
    """A LoRA like the trainer's (its PEFT config and targets), with random non-zero weights, saved the
    project's way; the adapter is then removed again so the pipeline is the base model."""
    from train_sdxl_lora import parse_args as trainer_parse_args
    from utils.lora.files import save_lora
    from utils.training.trainer import lora_config

    args = trainer_parse_args(["--lora_rank", str(rank), "--lora_alpha", str(alpha)])
    pipe.unet.add_adapter(lora_config(args, args.lora_target_modules))
    generator = torch.Generator().manual_seed(0)
    for name, parameter in pipe.unet.named_parameters():
        if "lora_B" in name:  # zero at initialisation; a trained LoRA is not
            noise = torch.randn(parameter.shape, generator=generator) * 0.1
            parameter.data.copy_(noise.to(parameter.device, parameter.dtype))
    path = save_lora(folder, pipe.unet)
    pipe.unload_lora_weights()
    return path


class Meter:
    """Wall time and peak memory (CUDA allocations, or RSS on CPU) of one stretch of work."""

    def __init__(self, device: torch.device):
        from utils.bench.steps import MemoryMeter
        self.memory = MemoryMeter(device)
        self.device = device

    def __enter__(self):
        self.memory.start_training()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.start
        self.peak = self.memory.peaks()[0]


def timed_images(pipe, settings, count: int, device: torch.device) -> tuple[float, int, np.ndarray]:
    """One untimed warm-up image, then ``count`` timed ones: (seconds per image, peak bytes, last image)."""
    from utils.inference.generation import generate

    generate(pipe, PROMPT, [0], settings)
    with Meter(device) as meter:
        for seed in range(count):
            image = generate(pipe, PROMPT, [seed], settings)[0]
    return meter.seconds / count, meter.peak, np.asarray(image, dtype=np.int16)


def run_rounds(pipe, lora_folder: Path, settings, args: argparse.Namespace, device: torch.device) -> dict:
    from utils.inference.generation import ADAPTER_NAME, load_adapter

    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    peaks: dict[str, int] = {mode: 0 for mode in MODES}
    images: dict[str, np.ndarray] = {}
    one_off: dict[str, list[float]] = {"load_lora_weights": [], "fuse_lora": [], "unfuse+unload": []}
    for round_index in range(args.repeats):
        logger.info("round %d/%d", round_index + 1, args.repeats)
        for mode in MODES:
            if mode == "lora_unfused":
                with Meter(device) as meter:
                    load_adapter(pipe, str(lora_folder), 1.0)
                one_off["load_lora_weights"].append(meter.seconds)
            if mode == "lora_fused":
                with Meter(device) as meter:
                    pipe.fuse_lora(components=["unet"], lora_scale=1.0, adapter_names=[ADAPTER_NAME])
                one_off["fuse_lora"].append(meter.seconds)
            per_image, peak, images[mode] = timed_images(pipe, settings, args.images, device)
            seconds[mode].append(per_image)
            peaks[mode] = max(peaks[mode], peak)
        with Meter(device) as meter:
            pipe.unfuse_lora(components=["unet"])
            pipe.unload_lora_weights()
        one_off["unfuse+unload"].append(meter.seconds)
    return {"seconds_per_image": seconds, "peak_bytes": peaks, "one_off_seconds": one_off,
            "fused_vs_unfused_max_pixel_diff": int(np.abs(images["lora_fused"] - images["lora_unfused"]).max()),
            "lora_vs_base_mean_pixel_diff": float(np.abs(images["lora_unfused"] - images["base"]).mean())}


def report(args: argparse.Namespace, results: dict, device_name: str, dtype_name: str) -> None:
    from utils.bench.report import format_table, mib, rate_text

    base_best = min(results["seconds_per_image"]["base"])
    print(f"SDXL inference benchmark -- model '{args.model}' (random weights), {device_name}, {dtype_name}, "
          f"{args.resolution}x{args.resolution}, {args.num_inference_steps} steps, guidance {args.guidance_scale}, "
          f"1 image per call")
    print(f"LoRA: rank {args.lora_rank}, alpha {args.lora_alpha:g}, UNet attention projections (the trainer's "
          f"defaults); {args.repeats} interleaved round(s) of {args.images} timed image(s) per mode after a "
          f"warm-up; fastest round shown")
    print()
    rows = []
    for mode in MODES:
        per_image = min(results["seconds_per_image"][mode])
        rows.append([LABELS[mode], rate_text(1 / per_image), f"{per_image:.3f}", f"{base_best / per_image:.3f}x",
                     mib(results["peak_bytes"][mode]),
                     " ".join(rate_text(1 / s) for s in results["seconds_per_image"][mode])])
    memory = "GPU MiB" if device_name != "CPU" else "RSS MiB"
    print(format_table(["mode", "images/s", "s/image", "speed vs base", f"peak {memory}", "images/s per round"],
                       rows))
    print()
    one_off = {name: min(values) for name, values in results["one_off_seconds"].items()}
    print("one-off costs: " + ", ".join(f"{name} {value:.2f} s" for name, value in one_off.items()))
    print(f"fused vs unfused output: max difference {results['fused_vs_unfused_max_pixel_diff']} of 255 pixel "
          f"levels; LoRA vs base: mean difference {results['lora_vs_base_mean_pixel_diff']:.1f} (the LoRA acts)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from diffusers.utils import logging as diffusers_logging

    from utils.bench.models import build_pipeline

    diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoders": expected, UNet-only LoRA
    from utils.inference.generation import GenerationSettings

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    args.resolution = args.resolution or DEFAULT_RESOLUTION[args.model]
    args.num_inference_steps = args.num_inference_steps or DEFAULT_STEPS[args.model]
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
    sys.exit(main())
