"""The offline demo: the whole pipeline on the tiny built-in SDXL and a synthetic style dataset.

    python -m utils.demo            (writes result images to results/)

Builds a tiny SDXL-topology model and a synthetic 'Ghibli-like' dataset, trains a
LoRA with train_sdxl_lora.py, then runs inference_sdxl_ghibli.py for base vs LoRA
with the same seeds. The tiny model is randomly initialised, so its pictures are
abstract; the point is that every step runs for real and the numbers are honest.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

from utils.cli import setup_logging

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("demo")


def run(script: str, *args: str) -> None:
    command = [sys.executable, str(ROOT / script), *args]
    logger.info("$ %s", " ".join(command[1:]))
    subprocess.run(command, check=True, cwd=ROOT)


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
    model, data, runs = work / "tiny_sdxl", work / "dataset_ghibli", work / "output_ghibli"

    run("utils/make_tiny_sdxl.py", "--model_dir", str(model), "--dataset_dir", str(data), "--num_images", "12")
    run("train_sdxl_lora.py", "--pretrained_model_name_or_path", str(model), "--dataset_dir", str(data),
        "--output_dir", str(runs), "--resolution", "128", "--train_batch_size", "2", "--num_train_epochs", "10",
        "--learning_rate", "1e-2", "--lr_warmup_steps", "0", "--lr_scheduler", "constant",
        "--lora_rank", "4", "--lora_alpha", "8", "--random_flip", "--report_to", "none")
    (run_dir,) = [p for p in runs.iterdir() if p.is_dir() and not p.name.startswith(".")]
    run("inference_sdxl_ghibli.py", "--pretrained_model_name_or_path", str(model),
        "--lora_model_path", str(run_dir / "final_model"), "--prompts",
        "a peaceful village under a golden sky in ghibli style", "a forest and a river in ghibli style",
        "--num_images", "3", "--height", "128", "--width", "128", "--num_inference_steps", "10",
        "--output_dir", str(work / "output_visualization"), "--create_comparison_grid")

    for index, grid in enumerate(sorted((work / "output_visualization").glob("comparison_grid_*.png"))):
        shutil.copy(grid, results / f"demo_comparison_{index}.png")
    shutil.copy(run_dir / "logs" / "loss_curve.png", results / "demo_loss_curve.png")
    info = json.loads((run_dir / "final_model" / "final_model_info.json").read_text())
    logger.info("Fixed-noise eval loss: %.4f before training, %.4f after",
                info["initial_eval_loss"], info["final_eval_loss"])
    logger.info("Demo finished in %.0f s; result images in %s", time.time() - started, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
