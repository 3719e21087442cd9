"""The GPU check's own parts: versions, the set-up (model and dataset), the automatic gradient-checkpointing
choice held against the measured peaks, and real training runs whose files are loaded back.

Each returns a JSON-able dict with ``status`` ("ok", "failed: ..." or "skipped: ...") that the
command writes to ``parts/NAME.json``; the step and inference benchmarks write their own JSON.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from utils.bench.gpu_plan import BENCHES, PROFILES, ROOT, Places
from utils.core.layout import RunLayout

logger = logging.getLogger("gpu_check")

DISTRIBUTIONS = ("torch", "diffusers", "transformers", "peft", "accelerate", "huggingface_hub", "safetensors",
                 "numpy", "pillow", "matplotlib", "bitsandbytes", "triton")
GIB = 1024 ** 3


def versions(device: str) -> dict:
    """Python, the libraries (None: not installed), the device, and what the optional parts need."""
    found = {}
    for name in DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    info = {"python": platform.python_version(), "packages": found, "cuda_available": torch.cuda.is_available(),
            "torch_cuda": torch.version.cuda, "c_compiler": shutil.which("cc") or shutil.which("gcc")}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(gpu=properties.name, gpu_memory_gib=properties.total_memory / GIB,
                    bf16=torch.cuda.is_bf16_supported(), cudnn=torch.backends.cudnn.version())
    missing = [name for name in ("diffusers", "transformers", "peft", "accelerate", "matplotlib", "pillow")
               if found[name] is None]
    if device == "cuda" and not torch.cuda.is_available():
        info["status"] = "failed: no CUDA device visible to torch"
    elif missing:
        info["status"] = f"failed: not installed: {', '.join(missing)}"
    else:
        info["status"] = "ok"
    return info


def setup(model: str, places: Places, device: str) -> dict:
    """Build the model with random weights and save it to local disk; make the trainer's dataset."""
    from utils.bench.train_runs import save_model
    from utils.tiny.sdxl import make_synthetic_dataset

    profile = PROFILES[model]
    shutil.rmtree(places.work, ignore_errors=True)
    timings = {}
    started = time.perf_counter()
    save_model(model, places.model_dir, torch.device(device))
    timings["model_build_and_save_s"] = time.perf_counter() - started
    started = time.perf_counter()
    size = profile["image_size"]
    make_synthetic_dataset(places.work / "dataset", profile["train_images"], size=(size, size))
    timings["dataset_s"] = time.perf_counter() - started
    weights = sum(f.stat().st_size for f in places.model_dir.rglob("*.safetensors"))
    return {"status": "ok", **timings, "model_dir": str(places.model_dir), "model_bytes": weights,
            "dataset_images": profile["train_images"], "image_size": size}


# ----------------------------------------------------------------------------- automatic checkpointing


def auto_checkpointing(model: str, places: Places, device: str) -> dict:
    """For each step benchmark: what the trainer's auto rule chooses, from its estimate and the free memory
    the run had when training started, against the peaks measured with checkpointing off and on."""
    from utils.training.flags import parse_training_args
    from utils.training.adapters import lora_config

    unet_config = json.loads((places.model_dir / "unet" / "config.json").read_text())
    args = parse_training_args([])
    lora = lora_config(args, args.lora_target_modules)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = {}
    for name in BENCHES:
        path = places.part_json(name)
        if path.is_file():
            rows[name] = _choice_against_peaks(json.loads(path.read_text()), unet_config, lora, dtype, device)
    if not rows:
        return {"status": "failed: no step benchmark results to compare with", "configs": {}}
    return {"status": "ok", "configs": rows}


def _choice_against_peaks(bench: dict, unet_config: dict, lora, dtype: torch.dtype, device: str) -> dict:
    from utils.training.memory import ACTIVATION_MARGIN, FIXED_MARGIN, choose_gradient_checkpointing
    from utils.training.memory import estimate_activation_bytes

    settings, results = bench["settings"], bench.get("results", {})
    off, on = results.get("ours"), results.get("gc")
    estimate = estimate_activation_bytes(unet_config, settings["resolution"], settings["train_batch_size"],
                                         dtype, lora)
    free = off["free_at_start_bytes"] if off else (on or {}).get("free_at_start_bytes")
    chosen, reason = choose_gradient_checkpointing("auto", device, free, estimate)
    row = {"resolution": settings["resolution"], "batch": settings["train_batch_size"],
           "estimated_activation_bytes": estimate, "needed_bytes": int(estimate * ACTIVATION_MARGIN) + FIXED_MARGIN,
           "free_at_start_bytes": free, "chose": "on" if chosen else "off", "reason": reason,
           "peak_off_bytes": off["train_peak_bytes"] if off else None,
           "peak_on_bytes": on["train_peak_bytes"] if on else None}
    if off:
        measured = off["train_peak_bytes"] - off["train_start_bytes"]
        row.update(measured_step_bytes=measured, estimate_over_measured=estimate / measured if measured > 0 else None)
    row["verdict"] = _verdict(chosen, off is not None, bench.get("skipped", {}).get("ours"))
    return row


def _verdict(chose_on: bool, off_ran: bool, off_failure: str | None) -> str:
    if not chose_on:
        return "right: off, and the step fitted without checkpointing" if off_ran else \
            f"wrong: chose off, but without checkpointing the step failed ({off_failure})"
    if off_ran:
        return "conservative: chose on, but the step fitted without checkpointing"
    return "right: on, the step did not fit without checkpointing"


# ----------------------------------------------------------------------------- a real training run


def train_run(model: str, places: Places, mixed_precision: str, name: str) -> dict:
    """train_sdxl_lora.py on the saved model and dataset; then its losses, weights and files checked."""
    steps = PROFILES[model]["train_steps"]
    output_dir = places.work / "runs" / name
    command = [sys.executable, str(ROOT / "train_sdxl_lora.py"),
               "--pretrained_model_name_or_path", str(places.model_dir),
               "--dataset_dir", str(places.work / "dataset"), "--output_dir", str(output_dir),
               "--resolution", str(PROFILES[model]["full"]),
               "--train_batch_size", "1", "--max_train_steps", str(steps), "--mixed_precision", mixed_precision,
               "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
               "--save_kohya", "--report_to", "none"]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    wall = time.perf_counter() - started
    sys.stderr.write(completed.stderr[-20000:])
    if completed.returncode != 0:
        lines = [line for line in completed.stderr.splitlines() if line.strip()]
        return {"status": f"failed: train_sdxl_lora.py exit {completed.returncode}: {lines[-1] if lines else ''}"}
    (run_dir,) = [p for p in output_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    result = {"wall_s": wall, "mixed_precision": mixed_precision, "steps": steps, **_run_facts(run_dir)}
    result.update(_load_back(places.model_dir, RunLayout(run_dir).final_model))
    problems = [key for key in ("losses_finite", "weights_finite", "weights_trained", "kohya_finite",
                                "diffusers_loads", "kohya_loads", "image_finite") if not result.get(key)]
    result["status"] = "ok" if not problems else f"failed: {', '.join(problems)}"
    return result


def _run_facts(run_dir: Path) -> dict:
    """Losses, timings and the resolved settings of a finished run; its LoRA files' tensors checked."""
    from safetensors.torch import load_file

    from utils.core.layout import LORA_WEIGHT_NAME
    from utils.lora.kohya_names import KOHYA_WEIGHT_NAME
    from utils.training.loss_log import read_losses
    from utils.training.run import read_timings

    layout = RunLayout(run_dir)
    _, losses = read_losses(layout.step_log)
    timings = read_timings(layout.timings)
    config = json.loads(layout.config.read_text())
    weights = load_file(layout.final_model / LORA_WEIGHT_NAME)
    kohya = load_file(layout.final_model / KOHYA_WEIGHT_NAME)
    up = [t for key, t in weights.items() if "lora_B" in key or "lora.up" in key]
    return {"losses": losses, "losses_finite": bool(losses) and all(math.isfinite(x) for x in losses),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "steady_steps_per_s": timings["steady_steps_per_s"], "time_to_first_step_s": timings["time_to_first_step_s"],
            "resolved_gradient_checkpointing": config.get("resolved_gradient_checkpointing"),
            "lora_tensors": len(weights), "kohya_tensors": len(kohya),
            "weights_finite": all(bool(torch.isfinite(t.float()).all()) for t in weights.values()),
            "weights_trained": bool(up) and any(bool(t.float().abs().max() > 0) for t in up),
            "kohya_finite": bool(kohya) and all(bool(torch.isfinite(t.float()).all()) for t in kohya.values())}


def _load_back(model_dir: Path, folder: Path) -> dict:
    """Both files into a fresh pipeline (diffusers' loader, as the inference CLI loads them) and one small
    image with the LoRA on."""
    from utils.inference.pipeline import load_adapter, open_pipeline, unload_adapter
    from utils.lora.kohya_names import KOHYA_WEIGHT_NAME

    pipe, _ = open_pipeline(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    facts = {}
    for key, weight_name in (("diffusers_loads", None), ("kohya_loads", KOHYA_WEIGHT_NAME)):
        load_adapter(pipe, str(folder), 1.0, weight_name=weight_name)
        layers = sum(1 for name, _ in pipe.unet.named_parameters() if "lora_" in name)
        facts[key] = layers > 0
        facts[f"{key.split('_')[0]}_lora_parameters"] = layers
        if key == "kohya_loads":  # decoded as floats: a NaN would only turn black in a PNG
            size = 256 if pipe.unet.config.sample_size >= 64 else 64
            generator = torch.Generator(device=pipe.device).manual_seed(0)
            pixels = pipe("a quiet village, ghibli style", num_inference_steps=2, height=size, width=size,
                          generator=generator, output_type="np").images
            facts.update(image_finite=bool(np.isfinite(pixels).all()) and float(pixels.std()) > 0,
                         image_std=float(pixels.std()))
        unload_adapter(pipe)
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return facts
