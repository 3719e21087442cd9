"""The offline demo: a small rank x alpha sweep on the tiny built-in SDXL, ending in pictures and a table.

    python -m utils.demo            (writes result images and the metrics table to results/)

Builds a tiny SDXL-topology model, a synthetic 'Ghibli-like' dataset and a tiny CLIP, then runs the
same scripts a user runs on real hardware:

1. run_experiments.sh: 2 ranks x 2 alphas, each run trained by train_sdxl_lora.py;
2. run_inference_experiments.sh: base vs LoRA images for every run with the same prompts and seeds,
   then the rank x alpha grid, the loss curves, CLIP metrics, heat maps and the verdict;
3. run_checkpoint_inference.sh: the epoch-by-epoch strip of one run.

The tiny models are randomly initialised, so the pictures are abstract and the CLIP numbers say
nothing about style; the point is that every step runs for real. What the training itself achieved
is printed at the end: the denoising loss on fixed (latent, noise, timestep) triples before and after.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from utils.cli import setup_logging

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("demo")

RANKS, ALPHAS = "4 8", "4 16"
PROMPTS = ["a peaceful village under a golden sky in ghibli style", "a forest and a river in ghibli style"]
TRAIN_FLAGS = ["--resolution", "128", "--train_batch_size", "2", "--num_train_epochs", "10", "--save_steps", "2",
               "--lr_warmup_steps", "0", "--lr_scheduler", "constant", "--random_flip", "--report_to", "none"]
INFERENCE_FLAGS = ["--prompts", *PROMPTS, "--num_images", "3", "--height", "128", "--width", "128",
                   "--num_inference_steps", "10"]
# Report files copied to results/ under the same names.
REPORT_FILES = ["exp_result.png", "loss_curves.png", "metrics.csv", "metrics.md", "heatmap_alignment.png",
                "heatmap_style_similarity.png", "heatmap_style_gain.png", "heatmap_diversity.png"]


def run(command: list[str]) -> None:
    logger.info("$ %s", " ".join(str(part) for part in command))
    # One thread per process unless the user says otherwise: the tiny model gains nothing from thread
    # pools, and on a busy 2-core machine they oversubscribe the cores (the demo then takes 4x as long).
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHON": sys.executable}
    subprocess.run([str(part) for part in command], check=True, cwd=ROOT, env=env)


def build_inputs(work: Path) -> tuple[Path, Path, Path]:
    from utils.make_tiny_clip import save_tiny_clip
    from utils.make_tiny_sdxl import make_synthetic_dataset, save_tiny_sdxl

    model, data, clip = work / "tiny_sdxl", work / "dataset_ghibli", work / "tiny_clip"
    save_tiny_sdxl(model)
    make_synthetic_dataset(data, num_images=12)
    save_tiny_clip(clip)
    return model, data, clip


def copy_results(sweep: Path, report: Path, strip_dir: Path, results: Path) -> None:
    for name in REPORT_FILES:
        shutil.copy(report / name, results / name)
    shutil.copy(strip_dir / "epoch_strip.png", results / "epoch_strip.png")
    # The first run's base-vs-LoRA comparison grids, as in the original's results.
    first = sorted(p for p in (sweep / "inference").iterdir() if p.is_dir() and p.name != "report")[0]
    for index, grid in enumerate(sorted(first.glob("comparison_grid_prompt*.png"))):
        shutil.copy(grid, results / f"demo_comparison_{index}.png")


def log_losses(sweep: Path) -> None:
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    for entry in summary["runs"]:
        info = json.loads((Path(entry["run_dir"]) / "final_model" / "final_model_info.json").read_text())
        logger.info("rank %d, alpha %g: fixed-noise eval loss %.4f before training, %.4f after",
                    entry["rank"], entry["alpha"], info["initial_eval_loss"], info["final_eval_loss"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default=str(ROOT / "demo_work"), help="models, data and runs go here")
    parser.add_argument("--results_dir", default=str(ROOT / "results"))
    args = parser.parse_args(argv)
    setup_logging()
    started = time.time()
    work, results = Path(args.work_dir), Path(args.results_dir)
    shutil.rmtree(work, ignore_errors=True)
    results.mkdir(parents=True, exist_ok=True)
    model, data, clip = build_inputs(work)
    sweep = work / "sweep"

    run(["bash", ROOT / "run_experiments.sh", "--ranks", RANKS, "--alphas", ALPHAS, "--lr", "1e-2",
         "--output_dir", sweep, "--", "--pretrained_model_name_or_path", model, "--dataset_dir", data, *TRAIN_FLAGS])
    run(["bash", ROOT / "run_inference_experiments.sh", "--sweep_dir", sweep, "--clip_model", clip, "--",
         "--pretrained_model_name_or_path", model, *INFERENCE_FLAGS])
    one_run = sorted(p for p in sweep.iterdir() if (p / "status.json").is_file())[-1]
    run(["bash", ROOT / "run_checkpoint_inference.sh", "--run_dir", one_run, "--",
         "--pretrained_model_name_or_path", model, "--prompts", PROMPTS[0], "--num_images", "2",
         "--height", "128", "--width", "128", "--num_inference_steps", "10"])

    copy_results(sweep, sweep / "inference" / "report", one_run / "checkpoint_inference", results)
    log_losses(sweep)
    verdict = json.loads((sweep / "inference" / "report" / "verdict.json").read_text())
    logger.info("Verdict (tiny random CLIP, so only a demonstration): %s", verdict["reason"])
    logger.info("Demo finished in %.0f s; pictures and metrics.md in %s", time.time() - started, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
