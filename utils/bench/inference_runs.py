"""The measuring side of benchmark_inference.py: a LoRA file like the trainer's, timed images per mode
(base, LoRA unfused, LoRA fused) in interleaved rounds, and the report."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch

from utils.bench.report import format_table, mib, rate_text

logger = logging.getLogger("benchmark_inference")

MODES = ("base", "lora_unfused", "lora_fused")
LABELS = {"base": "base model", "lora_unfused": "LoRA, unfused (load_lora_weights)",
          "lora_fused": "LoRA, fused (fuse_lora)"}
PROMPT = "a quiet village by the sea under a golden sky, ghibli style"


def make_lora_file(pipe, folder: Path, rank: int, alpha: float) -> Path:
    """A LoRA like the trainer's (its PEFT config and targets), with random non-zero weights, saved the
    project's way; the adapter is then removed again so the pipeline is the base model."""
    from utils.lora.files import save_lora
    from utils.training.flags import parse_training_args
    from utils.training.adapters import lora_config

    args = parse_training_args(["--lora_rank", str(rank), "--lora_alpha", str(alpha)])
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
    """``args.repeats`` rounds of base, LoRA unfused, LoRA fused (then unfused and unloaded again)."""
    from utils.inference.pipeline import ADAPTER_NAME, load_adapter

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
    """Print images/s per mode, the one-off costs and how much the outputs differ."""
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
