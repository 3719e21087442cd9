"""The parts of the GPU check (utils/gpu_check.sh): what each one runs, in which order, and its time cap.

Plain data and argument lists, no torch import: the shell script reads the plan before anything heavy
starts. Parts come in order of importance, so that when the whole budget runs short the ones cut are
the last (the auto-checkpointing comparison reads the step benchmarks, so it follows them).
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Per model: the training resolutions ("full" is the model's own, "half" the smaller one), the big batch,
# (timed steps, warm-up steps) of the step benchmarks, the trainer runs' steps and image size, and the
# inference benchmark's resolution and steps, and the packed sweep's grid (ranks, alphas), pack sizes and
# steps. 'tiny' runs every part on a CPU in seconds.
PROFILES = {
    "sdxl": {"full": 1024, "half": 512, "big_batch": 4, "steps": (10, 3), "big_steps": (5, 2), "train_steps": 20,
             "image_size": 1024, "train_images": 4, "inference_resolution": 1024, "inference_steps": 30,
             "pack_grid": (("4", "8", "16"), ("4", "8", "16", "32")), "packs": ("4", "12"), "pack_steps": (3, 1)},
    "tiny": {"full": 128, "half": 64, "big_batch": 4, "steps": (2, 1), "big_steps": (2, 1), "train_steps": 6,
             "image_size": 160, "train_images": 2, "inference_resolution": 64, "inference_steps": 4,
             "pack_grid": (("4",), ("4", "8")), "packs": ("2",), "pack_steps": (1, 0)},
}
# Time caps in seconds per part (the whole run also has one budget, which may cut a part shorter).
CAPS = {
    "sdxl": {"versions": 60, "setup": 150, "bench_full_b1": 150, "pack_full": 200, "train_bf16": 120,
             "train_fp16": 120, "inference": 100, "pack_half": 120, "bench_full_b4": 130, "bench_half_b1": 90,
             "auto_checkpointing": 90, "adamw8bit": 75, "compile": 240},
    "tiny": {"versions": 60, "setup": 60, "bench_full_b1": 120, "pack_full": 90, "train_bf16": 90, "train_fp16": 90,
             "inference": 90, "pack_half": 90, "bench_full_b4": 90, "bench_half_b1": 90, "auto_checkpointing": 60,
             "adamw8bit": 60, "compile": 120},
}
PARTS = tuple(CAPS["sdxl"])
# The step benchmarks: (resolution key, batch, variants, steps key); on the tiny model the batch-4 and
# half-resolution ones measure only checkpointing off, and every benchmark runs its variants one after
# another in its own process (a fresh Python per variant costs seconds of imports on a CPU).
BENCHES = {"bench_full_b1": ("full", 1, "naive,ours,gc", "steps"),
           "bench_full_b4": ("full", "big_batch", "ours,gc", "big_steps"),
           "bench_half_b1": ("half", 1, "ours,gc", "steps")}
TINY_VARIANTS = {"bench_full_b4": "ours", "bench_half_b1": "ours"}
DEFAULT_BUDGET_S = 530  # under 9 minutes with the install and the summary


@dataclass(frozen=True)
class Part:
    name: str
    cap_s: int
    command: list[str]

    def line(self) -> str:
        """The plan's line for the shell script: name, cap and the shell-quoted command, tab-separated."""
        return f"{self.name}\t{self.cap_s}\t{shlex.join(self.command)}"


@dataclass(frozen=True)
class Places:
    out: Path  # results: parts/NAME.json, parts/NAME.txt, the summary
    work: Path  # the saved model and datasets (large: not under out)

    @property
    def model_dir(self) -> Path:
        return self.work / "model"

    def part_json(self, name: str) -> Path:
        return self.out / "parts" / f"{name}.json"


def check_command(part: str, model: str, places: Places, device: str) -> list[str]:
    """``utils/gpu_check.py PART ...``: the parts that are this check's own code."""
    return [sys.executable, str(ROOT / "utils" / "gpu_check.py"), part, "--model", model, "--device", device,
            "--out", str(places.out), "--work", str(places.work)]


def bench_command(name: str, model: str, places: Places) -> list[str]:
    """``utils/benchmark_train.py`` for one step benchmark, on the model the set-up saved."""
    profile = PROFILES[model]
    if name in BENCHES:
        resolution, batch, variants, steps_key = BENCHES[name]
        variants = TINY_VARIANTS.get(name, variants) if model == "tiny" else variants
        extra: list[str] = []
    else:  # adamw8bit, compile: one lever against bench_full_b1's 'ours'
        resolution, batch, variants, steps_key = "full", 1, name, "steps"
        extra = ["--torch_compile"] if name == "compile" else []
        if name == "compile" and model == "tiny":  # inductor's C++ build takes minutes on a CPU
            extra += ["--torch_compile_backend", "aot_eager"]
    if model == "tiny":
        extra.append("--no-fresh_processes")
    batch = profile[batch] if isinstance(batch, str) else batch
    steps, warmup = profile[steps_key]
    return [sys.executable, str(ROOT / "utils" / "benchmark_train.py"), "--model", model,
            "--model_dir", str(places.model_dir), "--resolution", str(profile[resolution]),
            "--train_batch_size", str(batch), "--mixed_precision", "bf16", "--no-gradient_checkpointing",
            "--variants", variants, "--whole_run", "off", "--no-paired", "--repeats", "1", "--steps", str(steps),
            "--warmup", str(warmup), "--num_images", str(max(8, batch * 2)), *extra,
            "--output_json", str(places.part_json(name))]


def pack_command(name: str, model: str, places: Places) -> list[str]:
    """``utils/benchmark_sweep.py``: one run alone against packs of the grid's first runs, with gradient
    checkpointing (what lets a 12-run pack fit at 1024²), at the full or half resolution."""
    profile = PROFILES[model]
    (ranks, alphas), (steps, warmup) = profile["pack_grid"], profile["pack_steps"]
    resolution = profile["full" if name == "pack_full" else "half"]
    extra = ["--no-fresh_processes"] if model == "tiny" else []
    return [sys.executable, str(ROOT / "utils" / "benchmark_sweep.py"), "--model", model,
            "--model_dir", str(places.model_dir), "--resolution",
            str(resolution), "--mixed_precision", "bf16" if model == "sdxl" else "no", "--gradient_checkpointing",
            "--ranks", *ranks, "--alphas", *alphas, "--packs", *profile["packs"], "--separate", "1",
            "--steps", str(steps), "--warmup", str(warmup), *extra, "--output_json", str(places.part_json(name))]


def inference_command(model: str, places: Places) -> list[str]:
    profile = PROFILES[model]
    return [sys.executable, str(ROOT / "utils" / "benchmark_inference.py"), "--model", model,
            "--resolution", str(profile["inference_resolution"]),
            "--num_inference_steps", str(profile["inference_steps"]), "--images", "1", "--repeats", "1",
            "--output_json", str(places.part_json("inference"))]


def make_plan(model: str, device: str, places: Places, parts: list[str] | None = None) -> list[Part]:
    """The parts to run, in order, each with its cap and command."""
    plan = []
    for name in PARTS:
        if parts and name not in parts:
            continue
        if name in BENCHES or name in ("adamw8bit", "compile"):
            command = bench_command(name, model, places)
        elif name == "inference":
            command = inference_command(model, places)
        elif name.startswith("pack_"):
            command = pack_command(name, model, places)
        elif name.startswith("train_"):
            command = [*check_command("train_run", model, places, device), "--mixed_precision",
                       name.removeprefix("train_"), "--name", name]
        else:
            command = check_command(name, model, places, device)
        plan.append(Part(name, CAPS[model][name], command))
    return plan
