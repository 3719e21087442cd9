"""The driver side of benchmark_train.py: settings, each variant in a fresh process, whole runs through
train_sdxl_lora.py, and the report."""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from utils.bench.diffusers_run import DIFFUSERS_KEY, failure, launch
from utils.bench.flops import executed_flops
from utils.bench.models import DEFAULT_RESOLUTION, describe_model
from utils.bench.report import format_table, mib, rate_text
from utils.bench.steps import Variant

logger = logging.getLogger("benchmark_train")

RESULT_MARK = "BENCHMARK_RESULT "
ROOT = Path(__file__).resolve().parents[2]
COMMAND = ROOT / "utils" / "benchmark_train.py"  # the worker runs the command itself, with --worker
DEFAULT_STEPS = {"tiny": (None, 2), "small": (None, 1), "sdxl": (20, 5)}  # (timed, warm-up); None: one epoch


def resolve_settings(args: argparse.Namespace, cuda: bool) -> dict:
    """The flags with every default resolved for this machine (the flags themselves stay as given)."""
    steps, warmup = DEFAULT_STEPS[args.model]
    mixed_precision = args.mixed_precision or (("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda
                                               else "no")
    return {
        "model": args.model, "resolution": args.resolution or DEFAULT_RESOLUTION[args.model],
        "train_batch_size": args.train_batch_size, "mixed_precision": mixed_precision,
        "gradient_checkpointing": (args.gradient_checkpointing if args.gradient_checkpointing is not None
                                   else "auto" if cuda else False),
        "steps": args.steps or steps or -(-args.num_images // args.train_batch_size),
        "warmup": args.warmup if args.warmup is not None else warmup + (3 if args.torch_compile else 0),
        "buckets": args.buckets, "repeats": args.repeats or (1 if cuda else 2),
        "num_threads": args.num_threads or (torch.get_num_threads() if cuda else 1),
        "fresh_processes": args.fresh_processes,
    }


def run_in_subprocess(config: dict, variant: Variant | None) -> dict:
    """One variant (or, with None, the paired naive/ours run) in a fresh Python process."""
    payload = json.dumps({"config": config, "variant": asdict(variant) if variant else None})
    command = [sys.executable, str(COMMAND), "--worker", payload]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(config["num_threads"])}
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    name = variant.key if variant else "paired"
    logger.error("benchmark run '%s' failed (exit %d):\n%s", name, completed.returncode, completed.stderr[-3000:])
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    return {"failed": lines[-1] if lines else f"exit status {completed.returncode}"}


def run_here(config: dict, variant: Variant) -> dict:
    """One variant in this process (after the first, the imports are paid): for proving the paths on a CPU,
    where peak memory need not be the variant's own. A failure is reported as ``run_in_subprocess`` does."""
    try:
        return worker({"config": config, "variant": asdict(variant)})
    except Exception as error:  # noqa: BLE001 - the variant failed, the benchmark goes on
        logger.exception("benchmark run '%s' failed", variant.key)
        return {"failed": f"{type(error).__name__}: {error}"}


def worker(payload: dict) -> dict:
    """In the fresh process: one variant (or the paired run) from the driver's JSON payload."""
    from utils.bench.steps import run_paired, run_variant

    config = payload["config"]
    torch.set_num_threads(config["num_threads"])
    logging.getLogger().setLevel(logging.WARNING)
    if payload["variant"] is None:
        return run_paired(config)
    return run_variant(config, Variant(**payload["variant"]))


def summarise(results: list[dict]) -> dict:
    """Across rounds: the fastest round (background load only ever slows a round down) and the spread."""
    rates = [1.0 / statistics.median(r["step_seconds"]) for r in results]
    best = results[rates.index(max(rates))]
    return {
        "steps_per_second": max(rates), "all_rates": rates, "setup_seconds": min(r["setup_seconds"] for r in results),
        "wall_seconds": min(r["setup_seconds"] + r["warmup_seconds"] + sum(r["step_seconds"]) for r in results),
        "train_peak_bytes": max(r["train_peak_bytes"] for r in results),
        "process_peak_bytes": max(r["process_peak_bytes"] for r in results),
        "gradient_checkpointing": best["gradient_checkpointing"], "mixed_precision": best["mixed_precision"],
        "final_loss": best["losses"][-1], "warmup_seconds": min(r["warmup_seconds"] for r in results),
        "train_start_bytes": best["train_start_bytes"], "free_at_start_bytes": best["free_at_start_bytes"],
    }


def save_model(model: str, folder: Path, device: torch.device) -> Path:
    """The random-weight pipeline as a diffusers folder, so every variant loads it the trainer's way.

    The full-size model is built on the GPU (seconds instead of minutes on a CPU) and saved as the
    fp16 variant, the way SDXL ships.
    """
    from utils.bench.models import build_pipeline

    if model == "sdxl":
        build_pipeline(model, device, weight_dtype=torch.float16).save_pretrained(folder, variant="fp16")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    else:
        build_pipeline(model).save_pretrained(folder)
    return folder


WHOLE_RUNS = {
    "naive": ("the original's loop (--no-cache, checkpointing on, no eval)",
              ["--no-cache", "--gradient_checkpointing", "--eval_loss_epochs", "0"]),
    "previous": ("previous (cache, checkpointing on, eval every epoch x 32)",
                 ["--gradient_checkpointing", "--eval_loss_epochs", "1", "--eval_loss_samples", "32"]),
    "default": ("default (no flags)", []),
}


def whole_run(config: dict, key: str, steps: int) -> dict:
    """One training through train_sdxl_lora.py in a fresh process: wall time from launch to exit, and the
    trainer's own logs/timings.json (first and last optimizer step)."""
    from utils.training.run import read_timings

    logger.info("whole run: %s", WHOLE_RUNS[key][0])
    output_dir = Path(config["output_dir"]) / f"whole_{key}"
    command = [sys.executable, str(ROOT / "train_sdxl_lora.py"),
               "--pretrained_model_name_or_path", config["model_dir"], "--dataset_dir", config["dataset_dir"],
               "--output_dir", str(output_dir), "--resolution", str(config["resolution"]),
               "--train_batch_size", str(config["train_batch_size"]), "--max_train_steps", str(steps),
               "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--report_to", "none",
               "--mixed_precision", config["mixed_precision"], *([] if config["buckets"] else ["--no_buckets"]),
               *WHOLE_RUNS[key][1]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(config["num_threads"])}
    completed = launch(command, env)
    launched = completed["launched"]
    if completed["returncode"] != 0:
        return {"failed": failure(completed)}
    (timings_path,) = output_dir.glob("*/logs/timings.json")
    timings = read_timings(timings_path)
    return {"wall_s": completed["ended"] - launched, "peak_rss_bytes": completed["peak_rss_bytes"],
            "time_to_first_step_s": timings["first_step"] - launched,
            "first_to_last_steps_per_s": timings["first_to_last_steps_per_s"],
            "steady_steps_per_s": timings["steady_steps_per_s"], "steps": timings["steps"],
            "setup_phases_s": timings["setup_phases_s"]}


def report_whole_runs(results: dict[str, dict], steps: int) -> dict:
    """Print the whole runs; return the ratios of default to naive (and to diffusers' example, when run)."""
    print()
    print(f"Whole runs through train_sdxl_lora.py, {steps} optimizer steps each, launch to exit:")
    rows = []
    for key, result in results.items():
        if "failed" in result:
            print(f"  {key}: failed: {result['failed']}")
            continue
        label = WHOLE_RUNS[key][0] if key in WHOLE_RUNS else key
        rows.append([label, f"{result['time_to_first_step_s']:.1f}", f"{result['first_to_last_steps_per_s']:.3f}",
                     f"{result['steady_steps_per_s']:.3f}", f"{result['wall_s']:.1f}", mib(result["peak_rss_bytes"])])
    print(format_table(["run", "to first step s", "first-to-last steps/s", "steady steps/s", "wall s",
                        "peak RSS MiB"], rows))
    ratios = _whole_ratios(results, "naive")
    if DIFFUSERS_KEY in results:
        ratios.update({f"{name}_vs_example": value
                       for name, value in _whole_ratios(results, DIFFUSERS_KEY).items()})
    return ratios


def _whole_ratios(results: dict[str, dict], base: str) -> dict:
    """Print and return default / ``base`` for the whole runs (empty when either failed or is missing)."""
    naive, default = results.get(base, {}), results.get("default", {})
    if "failed" in naive or "failed" in default or not naive or not default:
        return {}
    ratios = {"whole_steady_speed": default["steady_steps_per_s"] / naive["steady_steps_per_s"],
              "whole_first_to_last_speed": default["first_to_last_steps_per_s"] / naive["first_to_last_steps_per_s"],
              "whole_wall_time": default["wall_s"] / naive["wall_s"],
              "whole_time_to_first_step": default["time_to_first_step_s"] / naive["time_to_first_step_s"],
              "whole_peak_rss": default["peak_rss_bytes"] / naive["peak_rss_bytes"]}
    print(f"default / {base}: steady-state {ratios['whole_steady_speed']:.2f}x steps/s, first-to-last step "
          f"{ratios['whole_first_to_last_speed']:.2f}x steps/s, wall time {ratios['whole_wall_time']:.2f}x "
          f"({default['wall_s']:.1f} s vs {naive['wall_s']:.1f} s), time to first step "
          f"{ratios['whole_time_to_first_step']:.2f}x, peak RSS {ratios['whole_peak_rss']:.2f}x")
    return ratios


def report(settings: dict, chosen: list[Variant], skipped: dict[str, str | None], summary: dict[str, dict],
           flops: dict[str, int], peak, num_images: int, paired: dict | None) -> dict:
    """Print the results; return the ratios of ours to naive."""
    _print_setup(settings, flops, peak, num_images)
    cuda = torch.cuda.is_available()
    rows = _speed_rows(settings, chosen, summary, flops, peak)
    memory = "GPU MiB" if cuda else "RSS MiB"
    print(format_table(["variant", "steps/s", "images/s", "ms/step", "setup s", "wall s", f"train peak {memory}",
                        f"process peak {memory}", "TFLOP/s", "MFU", "steps/s per round"], rows))
    for key, reason in skipped.items():
        if reason:
            print(f"skipped {key}: {reason}")
    ratios = {}
    if "naive" in summary and "ours" in summary:
        ratios = _caching_ratios(summary["naive"], summary["ours"], num_images, paired)
    return {"ratios": ratios}


def _print_setup(settings: dict, flops: dict[str, int], peak, num_images: int) -> None:
    from utils.bench.report import flops_text

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} thread(s) per process)"
    print(f"SDXL LoRA training benchmark -- model '{settings['model']}': {describe_model(settings['model'])}")
    print(f"device {device}; {settings['resolution']}x{settings['resolution']}, batch {settings['train_batch_size']}, "
          f"mixed precision {settings['mixed_precision']}, gradient checkpointing "
          f"{ {True: 'on', False: 'off'}.get(settings['gradient_checkpointing'], 'auto') }"
          f", {num_images} synthetic images, {'aspect buckets' if settings['buckets'] else 'square crops'}")
    print(f"timing: {settings['steps']} optimizer steps after {settings['warmup']} warm-up, median step; "
          f"{'each variant in a fresh process' if settings['fresh_processes'] else 'all variants in one process'}; {settings['repeats']} interleaved round(s), fastest round shown")
    print(f"FLOPs per step (torch.utils.flop_counter): UNet+LoRA forward+backward {flops_text(flops['unet'])} "
          f"(model FLOPs); with checkpointing {flops_text(flops['unet_checkpointed'])}; naive loop adds VAE "
          f"encode {flops_text(flops['vae'])} + text encoders {flops_text(flops['text'])}")
    print(f"peak: {peak.tflops:.4g} TFLOP/s ({peak.source}); MFU = model FLOPs x steps/s / peak")
    print()


def _speed_rows(settings: dict, chosen: list[Variant], summary: dict[str, dict], flops: dict[str, int],
                peak) -> list[list[str]]:
    rows = []
    for variant in chosen:
        result = summary[variant.key]
        rate = result["steps_per_second"]
        executed = executed_flops(flops, result, variant.cache)
        rows.append([variant.label, rate_text(rate), rate_text(rate * settings["train_batch_size"]),
                     f"{1000 / rate:.0f}", f"{result['setup_seconds']:.1f}", f"{result['wall_seconds']:.1f}",
                     mib(result["train_peak_bytes"]), mib(result["process_peak_bytes"]),
                     f"{executed * rate / 1e12:.3g}", f"{100 * flops['unet'] * rate / 1e12 / peak.tflops:.1f}%",
                     " ".join(rate_text(r) for r in result["all_rates"])])
    return rows


def _caching_ratios(naive: dict, ours: dict, num_images: int, paired: dict | None) -> dict:
    """Print and return ours / naive: speed, wall time and memory, and the paired step ratio."""
    ratios = {"speed": ours["steps_per_second"] / naive["steps_per_second"],
              "wall": naive["wall_seconds"] / ours["wall_seconds"],
              "train_peak": ours["train_peak_bytes"] / naive["train_peak_bytes"],
              "process_peak": ours["process_peak_bytes"] / naive["process_peak_bytes"]}
    print()
    print("Caching benchmark (--cache vs --no-cache) = 'ours' vs 'naive' above: same model, data and settings.")
    print(f"ours / naive, separate processes: {ratios['speed']:.2f}x steps/s and images/s; peak memory "
          f"{ratios['train_peak']:.2f}x (training), {ratios['process_peak']:.2f}x (whole process); wall time "
          f"of the whole run (set-up with model loading and caching, then all steps): naive "
          f"{naive['wall_seconds']:.1f} s, ours {ours['wall_seconds']:.1f} s")
    if paired:
        ratios["paired_speed"] = paired["median_ratio"]
        spread = sorted(paired["pair_ratios"])
        print(f"ours / naive, alternating steps in one process: {paired['median_ratio']:.2f}x steps/s "
              f"(median of {len(spread)} step pairs, range {spread[0]:.2f}-{spread[-1]:.2f}; naive "
              f"{1000 * statistics.median(paired['step_seconds']['naive']):.0f} ms, ours "
              f"{1000 * statistics.median(paired['step_seconds']['ours']):.0f} ms per step)")
    saved = 1 / naive["steps_per_second"] - 1 / ours["steps_per_second"]
    caching = ours["setup_seconds"] - naive["setup_seconds"]
    if saved > 0 and caching > 0:
        print(f"caching {num_images} images cost about {caching:.1f} s of set-up and saves {saved:.2f} s per "
              f"step: it pays for itself after about {caching / saved:.0f} steps")
    return ratios
