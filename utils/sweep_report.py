"""Rank x alpha sweeps: the command line of the shell scripts, the pictures, CLIP metrics and the verdict.

The shell scripts call the bookkeeping subcommands; people call ``report`` and ``strip``:

    plan, status-start/-end, summary   run_experiments.sh: what to run, a status JSON per run, the summary
    runs, checkpoints, newest-checkpoint-run
                                       the inference scripts: the finished runs in a folder, a run's
                                       checkpoints, the newest run that has checkpoints
    generate                           base-vs-LoRA images of several LoRAs with one pipeline
    losses                             one plot overlaying the training loss of every run of a sweep
    report                             rank x alpha grid, loss curves, CLIP metrics (CSV, Markdown, heat
                                       maps) and the verdict
    strip                              the epoch-by-epoch strip of a checkpoint series

    python -m utils.sweep_report report --inference_dir output_visualization_additional_2
    python -m utils.sweep_report strip --inference_dir output_visualization/<run>_checkpoints

Heavy libraries (torch, matplotlib, transformers) are imported only by the subcommands that
draw, generate or measure, so the bookkeeping calls start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.core.atomic import write_json, write_text
from utils.core.cli import setup_logging
from utils.inference.grids import save_figure, save_image
from utils.sweep.records import (CONFIG_FILE, STATUS_FILE, SUMMARY_FILE, WEIGHTS_FILE, Generation, RunInfo, SweepError, base_images, end_status, epoch_checkpoints, find_runs, generate_series, is_finished, load_run, lora_generations, newest_checkpoint_run, plan_runs, read_json, resolve_run_dir, start_status, write_summary)

logger = logging.getLogger("sweep_report")

DEFAULT_ALIGNMENT_TOLERANCE = 2.0


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# ----------------------------------------------------------------------------- pictures


def _open_cell(path: Path | None, size: tuple[int, int] | None, cell_size: int):
    from PIL import Image, ImageDraw

    if path is None:
        image = Image.new("RGB", size or (cell_size, cell_size), (210, 210, 210))
        ImageDraw.Draw(image).text((8, 8), "missing", fill="black")
        return image
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    image.thumbnail((cell_size, cell_size))
    return image


def rank_alpha_grid(cells: dict[tuple[int, float], Path], title: str, cell_size: int = 512):
    """The exp_result.png picture: rows = LoRA rank, columns = LoRA alpha, one image per run."""
    from utils.inference.grids import labelled_grid

    ranks = sorted({rank for rank, _ in cells})
    alphas = sorted({alpha for _, alpha in cells})
    size = _open_cell(next(iter(cells.values())), None, cell_size).size
    rows = [[_open_cell(cells.get((rank, alpha)), size, cell_size) for alpha in alphas] for rank in ranks]
    return labelled_grid(rows, [f"rank {r}" for r in ranks], title=title,
                         column_labels=[f"alpha {a:g}" for a in alphas])


def _series_position(model_folder: Path) -> tuple[float, str]:
    """Sort key and column label of a LoRA folder in a series: epochs in number order, then final, best."""
    match = re.fullmatch(r"checkpoint_epoch_(\d+)", model_folder.name)
    if match:
        return int(match.group(1)), f"epoch {match.group(1)}"
    label = {"final_model": "final", "best_model": "best"}.get(model_folder.name, model_folder.name)
    return math.inf, label


def epoch_strip(generations: list[Generation], image_index: int = 0, cell_size: int = 256):
    """Base, then each checkpoint of a series in epoch order; one row per prompt (image ``image_index``)."""
    from utils.inference.grids import labelled_grid

    ordered = sorted(generations, key=lambda g: _series_position(g.lora_path))
    base = base_images(ordered)
    rows = []
    for k in range(len(ordered[0].prompts)):
        row = [base[k][image_index]] + [g.lora[k][image_index] for g in ordered]
        rows.append([_open_cell(path, None, cell_size) for path in row])
    columns = ["base"] + [_series_position(g.lora_path)[1] for g in ordered]
    run_name = ordered[0].lora_path.parent.name
    title = f"{run_name}: image {image_index + 1} of each prompt, epoch by epoch (same seeds)"
    return (labelled_grid(rows, [f"prompt {k + 1}" for k in range(len(rows))], title=title, column_labels=columns),
            columns)


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


LOSS_LOGS = ("training_steps.csv", "training_log.csv")  # per-step log; older runs logged steps in the second


def read_loss_log(run_dir: Path) -> tuple[list[int], list[float]]:
    """(step, loss) rows of a run's per-step loss log (training_steps.csv, else training_log.csv)."""
    log_dir = run_dir / str(load_run(run_dir).config.get("logging_dir") or "logs")
    path = next((log_dir / name for name in LOSS_LOGS if (log_dir / name).is_file()), None)
    if path is None:
        return [], []
    with open(path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("step") and row.get("loss")]
    return [int(row["step"]) for row in rows], [float(row["loss"]) for row in rows]


def plot_loss_overlay(runs: list[RunInfo], png_path: Path) -> Path:
    """One figure, one smoothed training-loss line per run (the raw loss faint behind it)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 5), dpi=100)
    for run in runs:
        steps, losses = read_loss_log(run.run_dir)
        if not steps:
            logger.warning("%s: no %s; left out of the loss plot", run.run_dir, " or ".join(LOSS_LOGS))
            continue
        window = max(1, len(losses) // 20)
        (line,) = axis.plot(steps, _moving_average(losses, window), label=f"rank {run.rank}, alpha {run.alpha:g}")
        axis.plot(steps, losses, color=line.get_color(), alpha=0.15)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss (moving average)")
    axis.set_title(f"Training loss of {len(runs)} runs")
    axis.grid(alpha=0.3)
    if runs:
        axis.legend(fontsize=8, loc="upper right", ncol=2 if len(runs) > 6 else 1)
    figure.tight_layout()
    return save_figure(figure, png_path)


# Fixed layout (no tight bbox), so every cell of a heat map sits at a known pixel position.
HEATMAP_FIGSIZE = (5.0, 4.0)
HEATMAP_DPI = 100
HEATMAP_AXES = (0.17, 0.14, 0.60, 0.72)  # left, bottom, width, height as fractions of the figure
COLORBAR_AXES = (0.81, 0.14, 0.035, 0.72)
HEATMAP_CMAP = "viridis"


def heatmap(values: list[list[float]], ranks: list[int], alphas: list[float], title: str, png_path: Path) -> Path:
    """Metric over rank (rows) x alpha (columns), each cell annotated with its value; NaN cells grey."""
    import matplotlib
    import numpy as np
    plt = _pyplot()

    data = np.ma.masked_invalid(np.array(values, dtype=float))
    figure = plt.figure(figsize=HEATMAP_FIGSIZE, dpi=HEATMAP_DPI)
    axis = figure.add_axes(HEATMAP_AXES)
    cmap = matplotlib.colormaps[HEATMAP_CMAP].with_extremes(bad=(0.85, 0.85, 0.85))
    finite = data.compressed()
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    image = axis.imshow(data, cmap=cmap, vmin=low, vmax=high, aspect="auto", interpolation="nearest")
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            value = values[i][j]
            shade = 0.0 if high == low or math.isnan(value) else (value - low) / (high - low)
            axis.text(j, i, "n/a" if math.isnan(value) else f"{value:.3g}", ha="center", va="center",
                      fontsize=9, color="black" if shade > 0.6 else "white")
    axis.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    axis.set_yticks(range(len(ranks)), [str(r) for r in ranks])
    axis.set_xlabel("LoRA alpha")
    axis.set_ylabel("LoRA rank")
    axis.set_title(title, fontsize=10)
    figure.colorbar(image, cax=figure.add_axes(COLORBAR_AXES))
    return save_figure(figure, png_path)


# ----------------------------------------------------------------------------- metrics and the verdict

# (CSV column, heat-map file stem, title, Markdown format)
METRICS = [
    ("alignment", "alignment", "Prompt alignment (CLIP score)", ".2f"),
    ("style_similarity", "style_similarity", "Style similarity (cosine to training centroid)", ".4f"),
    ("style_gain", "style_gain", "Style gain over the base model", "+.4f"),
    ("diversity", "diversity", "Diversity across seeds (cosine distance)", ".4f"),
]
CSV_FIELDS = ["run", "rank", "alpha", "learning_rate", "num_images", "alignment", "alignment_base",
              "alignment_change", "alignment_change_se", "style_similarity", "style_similarity_base",
              "style_gain", "diversity", "diversity_base", "within_tolerance", "best", "run_dir"]


def verdict_rule(tolerance: float) -> str:
    return (f"Among the runs whose prompt alignment is at most {tolerance:g} CLIP-score points below the base "
            f"model's, the run with the highest style gain (mean cosine to the training-set centroid, LoRA "
            f"minus base) wins; a tie goes to the higher alignment. If no run stays within {tolerance:g} "
            f"points, the run with the highest alignment wins.")


def choose_best(rows: list[dict], tolerance: float) -> tuple[dict, str]:
    """The run that best trades style gain against prompt alignment, and a sentence saying why."""
    for row in rows:
        row["within_tolerance"] = row["alignment_change"] >= -tolerance
    eligible = [row for row in rows if row["within_tolerance"]]
    if eligible:
        best = max(eligible, key=lambda r: (r["style_gain"], r["alignment"]))
        reason = (f"{best['run']} has the highest style gain ({best['style_gain']:+.4f}) of the {len(eligible)} "
                  f"run(s) whose alignment stays within {tolerance:g} points of the base model "
                  f"(its change: {best['alignment_change']:+.2f}).")
        if best["style_gain"] <= 0:
            reason += " No run moved the images towards the training style (every gain is 0 or less)."
    else:
        best = max(rows, key=lambda r: r["alignment"])
        reason = (f"Every run loses more than {tolerance:g} alignment points; {best['run']} loses the least "
                  f"({best['alignment_change']:+.2f}).")
    for row in rows:
        row["best"] = row is best
    return best, reason


def _style_reference(runs: list[RunInfo], style_images: Path | None) -> list[Path]:
    """The training images the style is measured against: --style_images, else the runs' dataset."""
    if style_images:
        if not style_images.is_dir():
            raise SweepError(f"{style_images}: style image folder not found")
        suffixes = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
        paths = sorted(p for p in style_images.rglob("*") if p.suffix.lower() in suffixes)
        if not paths:
            raise SweepError(f"{style_images}: no images in the style image folder")
        return paths
    from utils.ghibli_datasets import DatasetError, load_examples

    config = runs[0].config
    dataset_dir, dataset_type = config.get("dataset_dir"), config.get("dataset_type", "ghibli")
    if any(run.config.get("dataset_dir") != dataset_dir for run in runs):
        logger.warning("The runs were trained on different datasets; the style reference is %s", dataset_dir)
    try:
        return [example.image_path for example in load_examples(dataset_type, dataset_dir)]
    except (DatasetError, FileNotFoundError) as error:
        raise SweepError(f"style reference: {error} (the dataset recorded in {runs[0].run_dir / CONFIG_FILE}; "
                         f"pass --style_images)") from None


def _open_all(paths: list[list[Path]]):
    from PIL import Image

    opened = []
    for group in paths:
        images = []
        for path in group:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        opened.append(images)
    return opened


def measure(runs: list[RunInfo], generations: list[Generation], clip_model: str, style_images: Path | None,
            tolerance: float, device: str | None) -> tuple[list[dict], dict, str]:
    """CLIP metrics of every run and of the base images; returns (rows, base scores, verdict reason)."""
    from tqdm.auto import tqdm

    from utils.sweep.clip_metrics import ClipEmbedder, paired_standard_error, score_image_set, style_centroid_of

    try:
        embedder = ClipEmbedder(clip_model, device=device)
    except OSError as error:  # transformers' "not found / no network" errors; their first line says which
        raise SweepError(f"--clip_model {clip_model}: {str(error).splitlines()[0]}") from None
    target = style_centroid_of(embedder, _style_reference(runs, style_images))
    prompts = generations[0].prompts
    base = score_image_set(embedder, prompts, _open_all(base_images(generations)), target)
    rows = []
    for run, generation in tqdm(list(zip(runs, generations)), desc="CLIP metrics"):
        scores = score_image_set(embedder, prompts, _open_all(generation.lora), target)
        rows.append({
            "run": run.label, "rank": run.rank, "alpha": run.alpha, "learning_rate": run.learning_rate,
            "num_images": scores.num_images, "alignment": scores.alignment, "alignment_base": base.alignment,
            "alignment_change": scores.alignment - base.alignment,
            "alignment_change_se": paired_standard_error(scores.per_image_alignment, base.per_image_alignment),
            "style_similarity": scores.style,
            "style_similarity_base": base.style, "style_gain": scores.style - base.style,
            "diversity": scores.diversity, "diversity_base": base.diversity, "run_dir": str(run.run_dir),
        })
    best, reason = choose_best(rows, tolerance)
    return rows, {"alignment": base.alignment, "style_similarity": base.style, "diversity": base.diversity}, reason


def _csv_value(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.8g}"
    return str(value)


def write_metrics_csv(rows: list[dict], path: Path) -> Path:
    lines = [",".join(CSV_FIELDS)]
    for row in rows:
        lines.append(",".join(_csv_value(row[name]).replace(",", ";") for name in CSV_FIELDS))
    write_text(path, "\n".join(lines) + "\n")
    return path


def _fmt(value: float, spec: str) -> str:
    return "n/a" if math.isnan(value) else format(value, spec)


def metrics_markdown(rows: list[dict], base: dict, reason: str, tolerance: float, clip_model: str,
                     pictures: list[str]) -> str:
    header = ("| run | rank | alpha | prompt alignment | change vs base | style similarity | style gain "
              "| diversity | within tolerance |")
    lines = [
        "# Rank × alpha sweep: measured verdict", "",
        f"**Best trade-off: {next(r['run'] for r in rows if r['best'])}.** {reason}", "",
        f"Rule: {verdict_rule(tolerance)}", "",
        f"Metrics: CLIP `{clip_model}`. Prompt alignment is the CLIP score (100 × cosine of prompt and "
        "image, floored at 0); style similarity is the mean cosine between an image's CLIP embedding and "
        "the centroid of the training images' embeddings; diversity is the mean pairwise cosine distance "
        "between the seeds of one prompt. Every run uses the same prompts and seeds as the base model.", "",
        "The change in alignment is paired (each LoRA image against the base image of the same prompt and "
        "seed); ± is its standard error, so a change within about two of them is noise.", "",
        header, "|" + " --- |" * 9,
        f"| base model | | | {_fmt(base['alignment'], '.2f')} | | {_fmt(base['style_similarity'], '.4f')} | "
        f"| {_fmt(base['diversity'], '.4f')} | |",
    ]
    for row in rows:
        name = f"**{row['run']}** ★" if row["best"] else row["run"]
        lines.append(
            f"| {name} | {row['rank']} | {row['alpha']:g} | {_fmt(row['alignment'], '.2f')} "
            f"| {_fmt(row['alignment_change'], '+.2f')} ± {_fmt(row['alignment_change_se'], '.2f')} "
            f"| {_fmt(row['style_similarity'], '.4f')} "
            f"| {_fmt(row['style_gain'], '+.4f')} | {_fmt(row['diversity'], '.4f')} "
            f"| {'yes' if row['within_tolerance'] else 'no'} |")
    lines += [""] + [f"![{Path(p).stem}]({p})" for p in pictures]
    return "\n".join(lines) + "\n"


def metric_matrix(rows: list[dict], column: str) -> tuple[list[list[float]], list[int], list[float]]:
    ranks = sorted({row["rank"] for row in rows})
    alphas = sorted({row["alpha"] for row in rows})
    values = {(row["rank"], row["alpha"]): row[column] for row in rows}
    return [[values.get((r, a), math.nan) for a in alphas] for r in ranks], ranks, alphas


# ----------------------------------------------------------------------------- the report


def runs_of(generations: list[Generation]) -> tuple[list[RunInfo], list[Generation]]:
    """The training run behind each generation (its LoRA folder's parent), one per rank and alpha.

    Of two runs with the same rank and alpha, the newer (by name, which starts with its start time)
    is kept and the other named in a warning.
    """
    by_key: dict[tuple, tuple[RunInfo, Generation]] = {}
    for generation in generations:
        run = load_run(generation.lora_path.parent)
        key = (run.rank, run.alpha)
        if key in by_key:
            older, newer = sorted([by_key[key], (run, generation)], key=lambda pair: pair[0].run_dir.name)
            logger.warning("Two runs with rank %d and alpha %g: the report uses %s and leaves out %s", run.rank,
                           run.alpha, newer[0].run_dir.name, older[0].run_dir.name)
            by_key[key] = newer
        else:
            by_key[key] = (run, generation)
    pairs = [by_key[key] for key in sorted(by_key)]
    return [run for run, _ in pairs], [generation for _, generation in pairs]


def write_grid(runs: list[RunInfo], generations: list[Generation], prompt_index: int, image_index: int,
               cell_size: int, out: Path) -> Path:
    """exp_result.png (rows rank, columns alpha) and exp_result.json (which run and image is in each cell)."""
    reference = generations[0]
    if not 0 <= prompt_index < len(reference.prompts) or not 0 <= image_index < len(reference.seeds[0]):
        raise SweepError(f"--prompt_index {prompt_index} / --image_index {image_index}: out of range "
                         f"({len(reference.prompts)} prompts, {len(reference.seeds[0])} images each)")
    prompt, seed = reference.prompts[prompt_index], reference.seeds[prompt_index][image_index]
    cells = {(run.rank, run.alpha): gen.lora[prompt_index][image_index] for run, gen in zip(runs, generations)}
    title = f'"{prompt}" (seed {seed}): rows LoRA rank, columns LoRA alpha'
    save_image(rank_alpha_grid(cells, title, cell_size), out / "exp_result.png")
    write_json(out / "exp_result.json", {
        "prompt": prompt, "seed": seed, "ranks": sorted({r.rank for r in runs}),
        "alphas": sorted({r.alpha for r in runs}),
        "cells": [{"rank": r.rank, "alpha": r.alpha, "run_dir": str(r.run_dir.resolve()),
                   "image": str(cells[(r.rank, r.alpha)].resolve())} for r in runs],
    })
    return out / "exp_result.png"


def build_report(args: argparse.Namespace) -> dict:
    inference_dir = Path(args.inference_dir)
    out = Path(args.output_dir) if args.output_dir else inference_dir / "report"
    generations = lora_generations(inference_dir, args.folders)
    runs, generations = runs_of(generations)
    made = {"grid": str(write_grid(runs, generations, args.prompt_index, args.image_index, args.cell_size, out)),
            "loss_curves": str(plot_loss_overlay(runs, out / "loss_curves.png"))}
    if not args.no_metrics:
        try:
            made.update(report_metrics(runs, generations, args, out))
        except SweepError as error:
            if args.clip_model:  # asked for by name: its failure is the user's to fix
                raise
            logger.warning("No CLIP metrics: %s (pass --clip_model with a local CLIP model, or --no_metrics)",
                           error)
    return made


def report_metrics(runs: list[RunInfo], generations: list[Generation], args: argparse.Namespace, out: Path) -> dict:
    from utils.sweep.clip_metrics import DEFAULT_CLIP_MODEL

    clip_model = args.clip_model or DEFAULT_CLIP_MODEL
    rows, base, reason = measure(runs, generations, clip_model, Path(args.style_images) if args.style_images
                                 else None, args.alignment_tolerance, args.device)
    write_metrics_csv(rows, out / "metrics.csv")
    pictures = ["exp_result.png", "loss_curves.png"]
    for column, stem, title, _ in METRICS:
        values, ranks, alphas = metric_matrix(rows, column)
        heatmap(values, ranks, alphas, title, out / f"heatmap_{stem}.png")
        pictures.append(f"heatmap_{stem}.png")
    write_text(out / "metrics.md", metrics_markdown(rows, base, reason, args.alignment_tolerance,
                                                    clip_model, pictures))
    best = next(row for row in rows if row["best"])
    write_json(out / "verdict.json", {
        "best_run": best["run"], "rank": best["rank"], "alpha": best["alpha"], "run_dir": best["run_dir"],
        "reason": reason, "rule": verdict_rule(args.alignment_tolerance),
        "alignment_tolerance": args.alignment_tolerance, "clip_model": clip_model, "base": base,
        "eligible_runs": [row["run"] for row in rows if row["within_tolerance"]],
    })
    print(f"Best trade-off: {best['run']}. {reason}")
    return {"metrics_csv": str(out / "metrics.csv"), "metrics_md": str(out / "metrics.md"),
            "verdict": str(out / "verdict.json")}


# ----------------------------------------------------------------------------- command line


def _add_grid_flags(parser, results_dir: bool = True) -> None:
    if results_dir:
        parser.add_argument("--results_dir", required=True, help="the sweep's bookkeeping (experiment_results)")
    parser.add_argument("--ranks", nargs="+", required=True)
    parser.add_argument("--alphas", nargs="+", required=True)
    parser.add_argument("--lr", required=True)


def _add_bookkeeping_commands(commands) -> None:
    plan = commands.add_parser("plan", help="print 'rank alpha folder number resume_dir' for each run still to do")
    _add_grid_flags(plan)
    plan.add_argument("train_args", nargs=argparse.REMAINDER)

    start = commands.add_parser("status-start", help="record that a run starts now")
    for name in ("--file", "--rank", "--alpha", "--lr", "--log", "--output_dir"):
        start.add_argument(name, required=True)
    start.add_argument("--number", type=int, required=True, help="the run's experiment_number (1-based)")
    start.add_argument("--gpu", default="")
    start.add_argument("--process_group", type=int, default=None)
    start.add_argument("--command", default="", help="the trainer command line, shell-quoted")
    start.add_argument("train_args", nargs=argparse.REMAINDER, help="the flags passed through to the trainer")

    end = commands.add_parser("status-end", help="record how a run ended")
    end.add_argument("--file", required=True)
    end.add_argument("--exit_code", type=int, required=True)

    summary = commands.add_parser("summary", help="write summary.json; exit 1 unless every run finished")
    _add_grid_flags(summary)
    summary.add_argument("--start_time", required=True, help="when the sweep started (%%Y-%%m-%%d %%H:%%M:%%S)")
    summary.add_argument("--gpus", default="")
    summary.add_argument("--stopped", action="store_true")
    summary.add_argument("train_args", nargs=argparse.REMAINDER)

    runs = commands.add_parser("runs", help="print 'run name<TAB>model folder' for each finished run in a folder")
    runs.add_argument("root")
    runs.add_argument("--model", default="final_model", help="final_model or best_model")

    checkpoints = commands.add_parser("checkpoints", help="print 'label<TAB>folder' for a run's epoch checkpoints")
    checkpoints.add_argument("run_dir")
    checkpoints.add_argument("--include_final", action="store_true")

    newest = commands.add_parser("newest-checkpoint-run", help="print the newest run folder with epoch checkpoints")
    newest.add_argument("runs_dir")

    generate = commands.add_parser("generate", help="base-vs-LoRA images for several LoRAs with one pipeline")
    generate.add_argument("--output_dir", required=True, help="one folder per LoRA label goes here")
    generate.add_argument("--lora", action="append", required=True, metavar="LABEL=PATH",
                          help="a LoRA folder or file and the name of its output folder (repeatable)")
    generate.add_argument("--base_dir", default=None,
                          help="base images are made once here, then reused (default: {output_dir}/base_model_results)")
    generate.add_argument("--skip_existing", action="store_true",
                          help="leave out LoRAs whose folder already holds their images for these settings")
    generate.add_argument("inference_args", nargs=argparse.REMAINDER, help="-- then inference_sdxl_ghibli.py flags")

    losses = commands.add_parser("losses", help="overlay the training loss of every finished run of a sweep")
    losses.add_argument("--results_dir", required=True, help="the sweep's bookkeeping (experiment_results)")
    losses.add_argument("--output", default=None, help="PNG path (default: {results_dir}/loss_curves.png)")


def _add_picture_commands(commands) -> None:
    report = commands.add_parser("report", help="grid, loss curves, CLIP metrics and the verdict of a sweep")
    report.add_argument("--inference_dir", required=True, help="the output_dir of run_inference_experiments.sh")
    report.add_argument("--output_dir", default=None, help="default: {inference_dir}/report")
    report.add_argument("--folders", nargs="+", default=None,
                        help="subfolders of --inference_dir to compare (default: every one with LoRA images)")
    report.add_argument("--prompt_index", type=int, default=0, help="prompt shown in the grid")
    report.add_argument("--image_index", type=int, default=0, help="image (seed) of that prompt shown in the grid")
    report.add_argument("--cell_size", type=int, default=512, help="largest side of a grid cell (pixels)")
    report.add_argument("--clip_model", default=None,
                        help="Hub id or folder of a CLIP model (default: openai/clip-vit-large-patch14)")
    report.add_argument("--no_metrics", action="store_true", help="pictures only, no CLIP metrics")
    report.add_argument("--style_images", default=None,
                        help="folder of style reference images (default: the runs' training dataset)")
    report.add_argument("--alignment_tolerance", type=float, default=DEFAULT_ALIGNMENT_TOLERANCE,
                        help="CLIP-score points of alignment a run may lose against the base and still win")
    report.add_argument("--device", default=None, help="device for CLIP (default: cuda when available)")

    strip = commands.add_parser("strip", help="the epoch-by-epoch strip of a checkpoint series")
    strip.add_argument("--inference_dir", required=True, help="the output_dir of run_checkpoint_inference.sh")
    strip.add_argument("--output", default=None, help="default: {inference_dir}/epoch_strip.png")
    strip.add_argument("--image_index", type=int, default=0)
    strip.add_argument("--cell_size", type=int, default=256)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command_name", required=True)
    _add_bookkeeping_commands(commands)
    _add_picture_commands(commands)
    args = parser.parse_args(argv)
    for name in ("train_args", "inference_args"):
        values = getattr(args, name, None)
        if values and values[0] == "--":
            setattr(args, name, values[1:])
    return args


def _plan(args: argparse.Namespace) -> int:
    for rank, alpha, folder, number, resume in plan_runs(Path(args.results_dir), args.ranks, args.alphas, args.lr,
                                                         args.train_args):
        print(f"{rank}\t{alpha}\t{folder}\t{number}\t{resume}")
    return 0


def _status_start(args: argparse.Namespace) -> int:
    start_status(Path(args.file), args.rank, args.alpha, args.lr, args.number, args.output_dir, args.gpu, args.log,
                 args.process_group, args.train_args, args.command)
    return 0


def _status_end(args: argparse.Namespace) -> int:
    end_status(Path(args.file), args.exit_code)
    return 0


def _summary(args: argparse.Namespace) -> int:
    summary = write_summary(Path(args.results_dir), args.ranks, args.alphas, args.lr, args.gpus, args.train_args,
                            args.stopped, args.start_time)
    counts = ", ".join(f"{count} {state}" for state, count in summary["counts"].items() if count)
    print(f"Sweep: {counts} ({Path(args.results_dir) / SUMMARY_FILE})")
    return 0 if summary["complete"] else 1


def _runs(args: argparse.Namespace) -> int:
    runs = find_runs(Path(args.root), args.model)
    if not runs:
        raise SweepError(f"{args.root}: no finished runs with {args.model}/{WEIGHTS_FILE}")
    for run in runs:
        print(f"{run.run_dir.name}\t{(run.run_dir / args.model).resolve()}")
    return 0


def _checkpoints(args: argparse.Namespace) -> int:
    run_dir = resolve_run_dir(Path(args.run_dir))
    series = epoch_checkpoints(run_dir, args.include_final)
    if not series:
        raise SweepError(f"{run_dir}: no checkpoint_epoch_N folders (train with --save_steps N)")
    for label, folder in series:
        print(f"{label}\t{folder.resolve()}")
    return 0


def _newest_checkpoint_run(args: argparse.Namespace) -> int:
    print(newest_checkpoint_run(Path(args.runs_dir)))
    return 0


def _generate(args: argparse.Namespace) -> int:
    pairs = [tuple(item.split("=", 1)) for item in args.lora]
    if any(len(pair) != 2 or not all(pair) for pair in pairs):
        raise SweepError(f"--lora {args.lora}: expected LABEL=PATH")
    failed = generate_series(pairs, Path(args.output_dir), args.inference_args, args.skip_existing,
                             Path(args.base_dir) if args.base_dir else None)
    if failed:
        print(f"error: no images for {', '.join(failed)} (see the log above)", file=sys.stderr)
        return 1
    print(f"Images for {len(pairs)} LoRA(s) in {args.output_dir}")
    return 0


def sweep_runs_of(results_dir: Path) -> list[RunInfo]:
    """The finished runs recorded in a sweep's bookkeeping folder, in rank, alpha order."""
    runs = []
    for status_file in sorted((results_dir / "runs").glob(f"*/{STATUS_FILE}")):
        status = read_json(status_file)
        if is_finished(status):
            runs.append(load_run(Path(status["run_dir"])))
    return sorted(runs, key=lambda run: (run.rank, run.alpha, run.learning_rate))


def _losses(args: argparse.Namespace) -> int:
    output = Path(args.output) if args.output else Path(args.results_dir) / "loss_curves.png"
    runs = sweep_runs_of(Path(args.results_dir))
    if not runs:
        raise SweepError(f"{args.results_dir}: no finished run to plot")
    print(plot_loss_overlay(runs, output))
    return 0


def _report(args: argparse.Namespace) -> int:
    for path in build_report(args).values():
        print(path)
    return 0


def _strip(args: argparse.Namespace) -> int:
    generations = lora_generations(Path(args.inference_dir))
    output = Path(args.output) if args.output else Path(args.inference_dir) / "epoch_strip.png"
    image, columns = epoch_strip(generations, args.image_index, args.cell_size)
    save_image(image, output)
    write_json(output.with_suffix(".json"), {"columns": columns, "prompts": generations[0].prompts,
                                             "seeds": generations[0].seeds, "image_index": args.image_index})
    print(output)
    return 0


COMMANDS = {"plan": _plan, "status-start": _status_start, "status-end": _status_end, "summary": _summary,
            "runs": _runs, "checkpoints": _checkpoints, "newest-checkpoint-run": _newest_checkpoint_run,
            "generate": _generate, "losses": _losses,
            "report": _report, "strip": _strip}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        return COMMANDS[args.command_name](args)
    except (SweepError, FileNotFoundError, NotADirectoryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
