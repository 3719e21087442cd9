"""Timing training steps in this process, the trainer's way: the worker side of benchmark_train.py.

Set-up is the trainer's own ``recipe.set_up`` (model loading, LoRA, caches, data, optimizer) and each
step its ``recipe.train_step``; the variants change flags, or one thing after set-up (channels-last,
encoders kept on the device, torch.compile).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.bench.flops import synchronize

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    cache: bool = True
    release_encoders: bool = True
    gradient_checkpointing: bool | str | None = None  # None: the run's setting; 'auto': the trainer decides
    mixed_precision: str | None = None  # None: the run's setting
    optimizer: str = "adamw"
    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"


def all_variants(gradient_checkpointing: bool | str, mixed_precision: str,
                 compile_backend: str = "inductor") -> dict[str, Variant]:
    other = gradient_checkpointing is not True  # 'auto' and off are measured against forced on
    other_gc = "on" if other else "off"
    variants = [
        Variant("naive", "naive: encoders every step (--no-cache)", cache=False),
        Variant("ours", "ours: cached, encoders released (default)"),
        Variant("gc", f"ours, gradient checkpointing {other_gc}", gradient_checkpointing=other),
        Variant("channels_last", "ours, channels-last UNet", channels_last=True),
        Variant("encoders_on_device", "ours, encoders kept on the device", release_encoders=False),
        Variant("adamw8bit", "ours, 8-bit AdamW", optimizer="adamw8bit"),
        Variant("compile", "ours, torch.compile(UNet)" + ("" if compile_backend == "inductor"
                                                          else f", {compile_backend} backend"),
                compile=True, compile_backend=compile_backend),
    ]
    for precision in ("bf16", "fp16", "no"):
        if precision != mixed_precision:
            name = "fp32" if precision == "no" else precision
            variants.append(Variant(name, f"ours, {name} weights (LoRA fp32)", mixed_precision=precision))
    return {v.key: v for v in variants}


def skip_reason(variant: Variant, cuda: bool, torch_compile: bool) -> str | None:
    """Why a variant cannot be measured here, or None."""
    import importlib.util
    if variant.key in ("bf16", "fp16") and not cuda:
        return "mixed precision needs a CUDA device (the trainer falls back to fp32 on CPU)"
    if variant.key == "fp32" and not cuda:
        return "already the setting on CPU"
    if variant.key == "encoders_on_device" and not cuda:
        return "on CPU there is no device to release the encoders from"
    if variant.key == "adamw8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            return "bitsandbytes is not installed (pip install bitsandbytes)"
        if not cuda:
            return "bitsandbytes 8-bit optimizers need a CUDA device"
    if variant.key == "compile" and not torch_compile:
        return "pass --torch_compile to measure it"
    return None


# ----------------------------------------------------------------------------- one variant, in its own process


class MemoryMeter:
    """Peak memory of this process: CUDA allocations on a GPU, resident set size (RSS) on a CPU.

    The training peak is reset when training starts, so it excludes model construction and caching;
    the process peak includes everything. ``start_bytes`` is what is held when training starts (CUDA
    allocations, or the RSS), ``free_bytes`` the free device memory then (None on a CPU).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.setup_peak = 0
        self.start_bytes = 0
        self.free_bytes: int | None = None

    def start_training(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.setup_peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            self.free_bytes = torch.cuda.mem_get_info(self.device)[0]
        else:
            self.setup_peak = _peak_rss()
            _reset_peak_rss()
            self.start_bytes = _peak_rss()

    def peaks(self) -> tuple[int, int]:
        """(training peak, process peak) in bytes."""
        if self.device.type == "cuda":
            train = torch.cuda.max_memory_allocated(self.device)
        else:
            train = _peak_rss()
        return train, max(train, self.setup_peak)


def _peak_rss() -> int:
    """VmHWM (Linux), else the lifetime maximum from getrusage."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _reset_peak_rss() -> None:
    """Linux resets VmHWM to the current RSS on '5' written to clear_refs; elsewhere the peak stays lifetime."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        logger.warning("cannot reset the peak RSS here: the training peak includes set-up")


def trainer_args(config: dict, variant: Variant) -> argparse.Namespace:
    """The trainer's own flags and defaults, with the benchmark's settings."""
    from utils.training.flags import parse_training_args

    gradient_checkpointing = variant.gradient_checkpointing
    if gradient_checkpointing is None:
        gradient_checkpointing = config["gradient_checkpointing"]
    argv = ["--pretrained_model_name_or_path", config["model_dir"], "--dataset_dir", config["dataset_dir"],
            "--output_dir", config["output_dir"], "--resolution", str(config["resolution"]),
            "--train_batch_size", str(config["train_batch_size"]), "--max_train_steps", "1000000",
            "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--report_to", "none",
            "--optimizer", variant.optimizer, "--mixed_precision", variant.mixed_precision or config["mixed_precision"],
            *checkpointing_flag(gradient_checkpointing)]
    argv += [] if variant.cache else ["--no-cache"]
    argv += [] if config["buckets"] else ["--no_buckets"]
    return parse_training_args(argv)


def checkpointing_flag(setting: bool | str) -> list[str]:
    if setting == "auto":
        return []
    return ["--gradient_checkpointing"] if setting else ["--no-gradient_checkpointing"]


def run_variant(config: dict, variant: Variant) -> dict:
    """Set up with the trainer's ``recipe.set_up``, then time warm-up + N of its optimizer steps."""
    from utils.training.recipe import train_step
    from utils.training.checks import check_args

    args = trainer_args(config, variant)
    check_args(args)
    started = time.perf_counter()
    run = _prepare(args)
    device = run.accelerator.device
    if variant.channels_last:
        run.components.unet.to(memory_format=torch.channels_last)
    if not variant.release_encoders:
        for module in [run.components.vae, *run.components.text_encoders]:
            module.to(device)
    if variant.compile:
        run.models[0] = run.components.unet = torch.compile(run.models[0], backend=variant.compile_backend)
    synchronize(device)
    setup_seconds = time.perf_counter() - started

    memory = MemoryMeter(device)
    memory.start_training()
    for model in run.models:
        model.train()
    batches = _forever(run.dataloader)
    step_seconds, losses = [], []
    for _ in range(config["warmup"] + config["steps"]):
        synchronize(device)
        start = time.perf_counter()
        loss, _ = train_step(run, next(batches))
        losses.append(run.accelerator.gather(loss[None]).mean().item())  # as the training loop logs it
        step_seconds.append(time.perf_counter() - start)
    train_peak, process_peak = memory.peaks()
    return {
        "variant": variant.key, "step_seconds": step_seconds[config["warmup"]:],
        "warmup_seconds": sum(step_seconds[:config["warmup"]]), "setup_seconds": setup_seconds,
        "train_peak_bytes": train_peak, "process_peak_bytes": process_peak, "losses": losses,
        "train_start_bytes": memory.start_bytes, "free_at_start_bytes": memory.free_bytes,
        "mixed_precision": run.accelerator.mixed_precision, "gradient_checkpointing": run.gradient_checkpointing,
        "weight_dtype": str(run.components.unet.dtype),
    }


def _prepare(args: argparse.Namespace):
    """The trainer's set-up of a run (``run.open_run``, then ``recipe.set_up``) for the benchmark's flags."""
    from utils.data.listing import load_examples
    from utils.training.recipe import set_up
    from utils.training.run import open_run

    return set_up(open_run(args, args.dataset_type), load_examples(args.dataset_type, args.dataset_dir))


def _forever(dataloader):
    while True:
        yield from dataloader


def run_paired(config: dict) -> dict:
    """Naive and cached steps alternating in one process on one model: their speed ratio, robust to
    background load (a busy machine slows both alike). Speed only; memory comes from separate processes.

    Both paths stay usable side by side because the encoders are not released here (on a GPU, idle
    encoders on the device cost memory, not time).
    """
    from utils.training.caching import cache_latents, cache_text
    from utils.training.recipe import train_step

    args = trainer_args(config, Variant("naive", "", cache=False))
    run = _prepare(args)
    naive = run.batch_maker
    cached = dataclasses.replace(naive)
    cached.latent_cache = cache_latents(naive.items, run.components.vae, args.center_crop, args.random_flip, "paired")
    cached.text_cache = cache_text([i.example.caption for i in naive.items], run.components.tokenizers,
                                   run.components.text_encoders)
    device = run.accelerator.device
    for model in run.models:
        model.train()
    batches = _forever(run.dataloader)
    seconds: dict[str, list[float]] = {"naive": [], "ours": []}
    for step in range(config["warmup"] + config["steps"]):
        start = time.perf_counter()
        pixels_batch = next(batches)  # read and transformed: a cost of the naive loop only
        load_seconds = time.perf_counter() - start
        for key in (["naive", "ours"] if step % 2 == 0 else ["ours", "naive"]):  # neither always first
            run.batch_maker = naive if key == "naive" else cached
            loader_batch = pixels_batch if key == "naive" else {"index": pixels_batch["index"]}
            synchronize(device)
            start = time.perf_counter()
            train_step(run, loader_batch)[0].item()
            if step >= config["warmup"]:
                seconds[key].append(time.perf_counter() - start + (load_seconds if key == "naive" else 0.0))
    ratios = [n / o for n, o in zip(seconds["naive"], seconds["ours"])]
    return {"step_seconds": seconds, "pair_ratios": ratios, "median_ratio": statistics.median(ratios)}
