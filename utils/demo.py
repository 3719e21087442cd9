"""The offline demo: a small rank x alpha sweep teaches a pretrained tiny SDXL a Ghibli-like look.

    python -m utils.demo            (refreshes the pictures and the metrics in results/)

The base model (models/tiny_scenes/sdxl, pretrained by utils/pretrain_demo_model.py) draws procedural
landscapes in a plain photo look. The demo writes 24 scenes in a Ghibli-like look (warm pastel
palette, flat shading, dark outlines, soft clouds) with captions in the dataset's style, then runs the
same scripts a user runs on real hardware:

1. run_experiments.sh: rank 8 x alphas 8 and 16, each run trained by train_sdxl_lora.py;
2. run_inference_experiments.sh: base vs LoRA images for every run with the same prompts and seeds,
   then the rank x alpha grid, the loss curves, CLIP metrics (with the demo's CLIP,
   models/tiny_scenes/clip, trained on both looks), heat maps and the verdict;
3. run_checkpoint_inference.sh: the images of every saved epoch of each run (one shared set of base images),
   then the report again, which now measures every epoch and picks the best (run, epoch); its page,
   report.html, goes to results/ with a screenshot of it (results/report.png) when Chromium is installed.

At the end it checks what the pictures should show and says so: the style gain of the chosen run
against the spread of the base model's style similarity between seeds, every run's style similarity
against the base's, and each run's denoising loss on fixed (latent, noise, timestep) triples before and
after training. The numbers go to results/demo_summary.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.core.atomic import save_image, write_json, write_text
from utils.core.cli import Parser, run_cli, setup_logging
from utils.core.errors import UserError
from utils.core.layout import BASE_RESULTS_DIR, EPOCH_STRIP, FINAL_MODEL, REPORT_PAGE, RunLayout, checkpoint_series_dir, model_info_file
from utils.tiny.demo_model import DEMO_CLIP_DIR, DEMO_SDXL_DIR, RESOLUTION

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("demo")

RANKS, ALPHAS, LEARNING_RATE = "8", "8 16", "4e-3"
NUM_TRAIN_IMAGES = 24
# Daytime scenes: at sunset and at night the small VAE sometimes draws dark outlines around bright clouds
# even for the base model, and the pictures would then show the style on both rows.
PROMPTS = ["A small house by a lake under the sun, in Ghibli style.",
           "A village on green hills under the sun, drawn in Ghibli style."]
SIZE = ["--height", str(RESOLUTION), "--width", str(RESOLUTION)]
# 45 epochs of 6 steps: a style in under a minute per run. Min-SNR weighting and a noise offset let the LoRA
# move the overall palette; the convolutions, the transformers' projections and feed-forward layers join the
# attention projections because the UNet's full-resolution level has no attention.
TRAIN_FLAGS = ["--resolution", str(RESOLUTION), "--train_batch_size", "4", "--num_train_epochs", "45",
               "--save_steps", "15", "--lr_warmup_steps", "0", "--lr_scheduler", "constant", "--random_flip",
               "--snr_gamma", "5", "--noise_offset", "0.1",
               "--lora_target_modules", "to_k", "to_q", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut",
               "conv_in", "conv_out", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "time_emb_proj",
               "--report_to", "none"]
INFERENCE_FLAGS = ["--prompts", *PROMPTS, "--num_images", "3", *SIZE, "--num_inference_steps", "20"]
# Report files copied to results/ under the same names.
REPORT_FILES = ["exp_result.png", "loss_curves.png", "metrics.csv", "metrics.md", "heatmap_alignment.png",
                "heatmap_style_similarity.png", "heatmap_style_gain.png", "heatmap_diversity.png",
                "epoch_metrics.csv", "epoch_curves.png"]
TEXT_FILES = (".md", ".csv", ".json")
REPORT_SCREENSHOT = "report.png"  # the page as headless Chromium draws it, every view stacked (#all)
ENLARGE = 3  # the picture grids in results/ are shown at 3x: 64 px images are small on a page
GAIN_OVER_SPREAD = 5.0  # what the demo promises: the chosen run's style gain is this many seed spreads or more


def shown(path: Path) -> str:
    """A path as the demo prints and records it: relative to the repository when inside it."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def run(command: list) -> None:
    logger.info("$ %s", " ".join(shown(part) if isinstance(part, Path) else str(part) for part in command))
    # One thread per process unless the user says otherwise: the tiny model gains nothing from thread
    # pools, and on a busy 2-core machine they oversubscribe the cores (the demo then takes 4x as long).
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHON": sys.executable}
    subprocess.run([str(part) for part in command], check=True, cwd=ROOT, env=env)


def without_machine_paths(text: str, work: Path) -> str:
    """The committed results name no folder of the machine that made them: paths become repository-relative."""
    text = text.replace(str(work.resolve()), "demo_work").replace(str(work), "demo_work")
    return text.replace(str(ROOT) + os.sep, "").replace(str(ROOT), ".")


def copy_enlarged(source: Path, target: Path) -> None:
    """Copy a grid of 64 px pictures at three times its size (each pixel a 3 x 3 block), readable in the README."""
    from PIL import Image

    with Image.open(source) as image:
        save_image(image.resize((image.width * ENLARGE, image.height * ENLARGE), Image.Resampling.NEAREST), target)


def copy_results(inference: Path, checkpoints: Path, results: Path, work: Path) -> None:
    report = inference / "report"
    # The page embeds its images, so the copy stands alone; only the folder names in it are the machine's.
    write_text(results / REPORT_PAGE, without_machine_paths((report / REPORT_PAGE).read_text(), work))
    from utils.sweep.gallery import find_chromium, screenshot
    if find_chromium():
        screenshot(results / REPORT_PAGE, results / REPORT_SCREENSHOT)
    else:
        logger.warning("No Chromium: %s keeps its old screenshot", shown(results / REPORT_SCREENSHOT))
    for name in [*REPORT_FILES, "verdict.json"]:
        if name.endswith(TEXT_FILES):
            write_text(results / name, without_machine_paths((report / name).read_text(), work))
        elif name == "exp_result.png":
            copy_enlarged(report / name, results / name)
        else:
            shutil.copy(report / name, results / name)
    copy_enlarged(checkpoint_series_dir(checkpoints, _best_epoch_run(report)) / EPOCH_STRIP,
                  results / "epoch_strip.png")
    # The chosen run's base-vs-LoRA comparison grids, as in the original's results.
    verdict = json.loads((report / "verdict.json").read_text())
    best = _best_run_name(verdict, inference)
    for index, grid in enumerate(sorted((inference / best).glob("comparison_grid_prompt*.png"))):
        copy_enlarged(grid, results / f"demo_comparison_{index}.png")


def _best_run_name(verdict: dict, inference: Path) -> str:
    """The image folder of the verdict's run: named after its run folder (verdict.json's run_dir)."""
    runs = sorted(p.name for p in inference.iterdir() if p.is_dir() and p.name not in ("report", "base_model_results"))
    named = Path(str(verdict.get("run_dir") or "")).name
    return named if named in runs else runs[0]


def _best_epoch_run(report: Path) -> Path:
    """The run folder of the best (run, epoch)."""
    return Path(json.loads((report / "verdict.json").read_text())["best_epoch"]["run_dir"])


def fixed_noise_losses(runs_dir: Path) -> list[dict]:
    """Each run's denoising loss on the fixed evaluation triples, before and after training."""
    losses = []
    info_file = model_info_file(FINAL_MODEL)
    for run_dir in sorted(p for p in runs_dir.iterdir() if (RunLayout(p).final_model / info_file).is_file()):
        info = json.loads((RunLayout(run_dir).final_model / info_file).read_text())
        config = json.loads(RunLayout(run_dir).config.read_text())
        losses.append({"run": run_dir.name, "rank": config["lora_rank"], "alpha": config["lora_alpha"],
                       "eval_loss_before": info["initial_eval_loss"], "eval_loss_after": info["final_eval_loss"]})
        logger.info("rank %d, alpha %g: fixed-noise eval loss %.4f before training, %.4f after",
                    config["lora_rank"], config["lora_alpha"], info["initial_eval_loss"], info["final_eval_loss"])
    return losses


def base_seed_spread(inference: Path, dataset: Path, clip_model: Path) -> float:
    """Mean over prompts of the standard deviation, between seeds, of the base images' style similarity."""
    from utils.sweep.clip_metrics import ClipEmbedder, style_centroid_of

    embedder = ClipEmbedder(str(clip_model), device="cpu")
    target = style_centroid_of(embedder, sorted((dataset / "images").glob("*.png")))
    by_prompt: dict[int, list[Path]] = {}
    for path in (inference / "base_model_results").glob("base_prompt*.png"):
        match = re.match(r"base_prompt(\d+)_", path.name)
        if match:
            by_prompt.setdefault(int(match.group(1)), []).append(path)
    from PIL import Image

    spreads = []
    for paths in by_prompt.values():
        images = []
        for path in sorted(paths):
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        similarities = (embedder.images(images) @ target).tolist()
        if len(similarities) > 1:
            spreads.append(statistics.stdev(similarities))
    if not spreads:
        raise UserError(f"{shown(inference / 'base_model_results')}: no prompt with two or more base images; "
                        "the spread between seeds needs them")
    return statistics.mean(spreads)


def check_style(report: Path, spread: float) -> dict:
    """What the pictures should show, in numbers; logged, and a warning where the demo falls short."""
    with open(report / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    best = next(row for row in rows if row["best"] == "yes")
    base = float(best["style_similarity_base"])
    gain = float(best["style_gain"])
    summary = {
        "chosen_run": best["run"], "style_similarity_base": base, "style_gain_chosen": gain,
        "base_seed_spread": spread, "gain_over_spread": gain / spread if spread else float("inf"),
        "runs_above_base": sum(float(row["style_similarity"]) > base for row in rows), "runs": len(rows),
    }
    logger.info("Style gain of the chosen run %s: %+.4f = %.1f x the base model's spread between seeds (%.4f)",
                best["run"], gain, summary["gain_over_spread"], spread)
    logger.info("%d of %d runs have a higher style similarity than the base model (%.4f)",
                summary["runs_above_base"], len(rows), base)
    if summary["gain_over_spread"] < GAIN_OVER_SPREAD or summary["runs_above_base"] < len(rows):
        logger.warning("The style was learned less clearly than the demo expects (gain >= %g x spread, "
                       "every run above the base).", GAIN_OVER_SPREAD)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = Parser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m utils.demo")
    parser.add_argument("--work_dir", default=str(ROOT / "demo_work"), help="data, runs and images go here")
    parser.add_argument("--results_dir", default=str(ROOT / "results"))
    parser.add_argument("--model_dir", default=str(DEMO_SDXL_DIR), help="the base model (a diffusers folder)")
    parser.add_argument("--clip_model", default=str(DEMO_CLIP_DIR), help="the CLIP of the report's metrics")
    parser.add_argument("--pack", default="1",
                        help="passed to run_experiments.sh: 2 or auto trains the demo's two runs in one process "
                             "(default: %(default)s, each run its own process)")
    args = parser.parse_args(argv)
    setup_logging()
    started = time.time()
    work, results = Path(args.work_dir), Path(args.results_dir)
    model, clip = Path(args.model_dir), Path(args.clip_model)
    shutil.rmtree(work, ignore_errors=True)
    results.mkdir(parents=True, exist_ok=True)
    from utils.tiny.scenes import write_style_dataset
    data = write_style_dataset(work / "dataset_ghibli", num_images=NUM_TRAIN_IMAGES)
    runs_dir, records, inference, checkpoints = (work / "output_ghibli", work / "experiment_results",
                                                 work / "inference", work / "output_visualization")

    run(["bash", ROOT / "run_experiments.sh", "--ranks", RANKS, "--alphas", ALPHAS, "--lr", LEARNING_RATE,
         "--runs_dir", runs_dir, "--results_dir", records, "--pack", args.pack, "--",
         "--pretrained_model_name_or_path", model, "--dataset_dir", data, *TRAIN_FLAGS])
    run(["bash", ROOT / "run_inference_experiments.sh", "--runs_dir", runs_dir, "--output_dir", inference,
         "--clip_model", clip, "--", "--pretrained_model_name_or_path", model, *INFERENCE_FLAGS])
    # every run's epochs on one pipeline and one set of base images, then the report again with every epoch
    run(["bash", ROOT / "run_checkpoint_inference.sh", "--all_runs", "--runs_dir", runs_dir, "--output_dir",
         checkpoints, "--base_results_dir", checkpoints / BASE_RESULTS_DIR, "--inference_dir", inference,
         "--clip_model", clip, "--", "--pretrained_model_name_or_path", model, *INFERENCE_FLAGS])

    copy_results(inference, checkpoints, results, work)
    summary = check_style(inference / "report", base_seed_spread(inference, data, clip))
    summary["fixed_noise_eval_loss"] = fixed_noise_losses(runs_dir)
    verdict = json.loads((inference / "report" / "verdict.json").read_text())
    logger.info("Verdict: %s", verdict["reason"])
    summary["seconds"] = round(time.time() - started)
    write_json(results / "demo_summary.json", summary)
    logger.info("Demo finished in %.0f s; pictures and metrics.md in %s", time.time() - started, shown(results))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
