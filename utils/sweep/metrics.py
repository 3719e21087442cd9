"""CLIP metrics of a sweep's runs against the base model, their table and heat maps, and the verdict.

The verdict's rule is stated in ``verdict_rule``: among the runs that keep the prompt alignment within a
tolerance of the base model's, the highest style gain wins.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

from utils.core.atomic import write_json, write_text
from utils.core.layout import (EPOCH_CURVES, EPOCH_METRICS_CSV, GRID_PICTURE, LOSS_CURVES, METRICS_CSV, METRICS_MD,
                               VERDICT_FILE)
from utils.sweep.outputs import Generation, base_images
from utils.sweep.epochs import EPOCH_FIELDS, epoch_name, epoch_verdict, final_epoch_rows
from utils.sweep.pictures import heatmap, plot_epoch_curves
from utils.sweep.records import CONFIG_FILE, SweepError
from utils.sweep.runs import RunInfo

logger = logging.getLogger("sweep_report")


# (CSV column, heat-map file stem, title, Markdown format)
METRICS = [
    ("alignment", "alignment", "Prompt alignment (CLIP score)", ".2f"),
    ("style_similarity", "style_similarity", "Style similarity (cosine to training centroid)", ".4f"),
    ("style_gain", "style_gain", "Style gain over the base model", "+.4f"),
    ("diversity", "diversity", "Diversity across seeds (cosine distance)", ".4f"),
]
CSV_FIELDS = ["run", "rank", "alpha", "learning_rate", "num_images", "alignment", "alignment_base",
              "alignment_change", "alignment_change_se", "style_similarity", "style_similarity_base",
              "style_gain", "diversity", "diversity_base", "within_tolerance", "best", "run_dir", "lora_type"]


def verdict_rule(tolerance: float) -> str:
    return (f"Among the runs whose prompt alignment is at most {tolerance:g} CLIP-score points below the base "
            f"model's, the run with the highest style gain (mean cosine to the training-set centroid, LoRA "
            f"minus base) wins; a tie goes to the higher alignment. If no run stays within {tolerance:g} "
            f"points, the run with the highest alignment wins.")


def choose_best(rows: list[dict], tolerance: float, name=lambda row: row["run"], noun: str = "run") -> tuple[dict, str]:
    """The row (a run, or a run at one epoch) that best trades style gain against prompt alignment, and why."""
    for row in rows:
        row["within_tolerance"] = row["alignment_change"] >= -tolerance
    eligible = [row for row in rows if row["within_tolerance"]]
    if eligible:
        best = max(eligible, key=lambda r: (r["style_gain"], r["alignment"]))
        reason = (f"{name(best)} has the highest style gain ({best['style_gain']:+.4f}) of the {len(eligible)} "
                  f"{noun}(s) whose alignment stays within {tolerance:g} points of the base model "
                  f"(its change: {best['alignment_change']:+.2f}).")
        if best["style_gain"] <= 0:
            reason += f" No {noun} moved the images towards the training style (every gain is 0 or less)."
    else:
        best = max(rows, key=lambda r: r["alignment"])
        reason = (f"Every {noun} loses more than {tolerance:g} alignment points; {name(best)} loses the least "
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
    from utils.data.listing import load_examples
    from utils.data.records import DatasetError

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
    """The images of each group (prompt), opened as RGB."""
    from utils.data.images import open_all

    return [open_all(group) for group in paths]


def open_embedder(clip_model: str, device: str | None):
    from utils.sweep.clip_metrics import ClipEmbedder

    try:
        return ClipEmbedder(clip_model, device=device)
    except OSError as error:  # transformers' "not found / no network" errors; their first line says which
        raise SweepError(f"--clip_model {clip_model}: {str(error).splitlines()[0]}") from None


def scores_row(embedder, target, prompts: list[str], images: list[list[Path]], base) -> dict:
    """The metric numbers of one set of LoRA images against the base images of the same prompts and seeds."""
    from utils.sweep.clip_metrics import paired_standard_error, score_image_set

    scores = score_image_set(embedder, prompts, _open_all(images), target)
    return {
        "num_images": scores.num_images, "alignment": scores.alignment, "alignment_base": base.alignment,
        "alignment_change": scores.alignment - base.alignment,
        "alignment_change_se": paired_standard_error(scores.per_image_alignment, base.per_image_alignment),
        "style_similarity": scores.style, "style_similarity_base": base.style,
        "style_gain": scores.style - base.style, "diversity": scores.diversity, "diversity_base": base.diversity,
    }


def measure(runs: list[RunInfo], generations: list[Generation], embedder, target,
            tolerance: float) -> tuple[list[dict], dict, str]:
    """CLIP metrics of every run and of the base images; returns (rows, base scores, verdict reason)."""
    from tqdm.auto import tqdm

    from utils.sweep.clip_metrics import score_image_set

    prompts = generations[0].prompts
    base = score_image_set(embedder, prompts, _open_all(base_images(generations)), target)
    rows = []
    for run, generation in tqdm(list(zip(runs, generations)), desc="CLIP metrics"):
        rows.append({"run": run.label, "rank": run.rank, "alpha": run.alpha, "learning_rate": run.learning_rate,
                     **scores_row(embedder, target, prompts, generation.lora, base),
                     "run_dir": str(run.run_dir), "lora_type": run.lora_type})
    best, reason = choose_best(rows, tolerance)
    return rows, {"alignment": base.alignment, "style_similarity": base.style, "diversity": base.diversity}, reason


def measure_epochs(points: list, embedder, target) -> list[dict]:
    """The metrics of every (run, epoch), against the base images of the epochs' own prompts and seeds."""
    from tqdm.auto import tqdm

    from utils.sweep.clip_metrics import score_image_set

    if not points:
        return []
    prompts = points[0].generation.prompts
    base = score_image_set(embedder, prompts, _open_all(base_images([p.generation for p in points])), target)
    return [{**point.describe(), **scores_row(embedder, target, prompts, point.generation.lora, base)}
            for point in tqdm(points, desc="CLIP metrics per epoch")]


def _csv_value(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.8g}"
    return str(value)


def write_metrics_csv(rows: list[dict], path: Path, fields: list[str] = CSV_FIELDS) -> Path:
    lines = [",".join(fields)]
    for row in rows:
        lines.append(",".join(_csv_value(row[name]).replace(",", ";") for name in fields))
    write_text(path, "\n".join(lines) + "\n")
    return path


def _fmt(value: float, spec: str) -> str:
    return "n/a" if math.isnan(value) else format(value, spec)


def metrics_markdown(rows: list[dict], base: dict, reason: str, tolerance: float, clip_model: str,
                     pictures: list[str], epoch_reason: str = "") -> str:
    header = ("| run | rank | alpha | prompt alignment | change vs base | style similarity | style gain "
              "| diversity | within tolerance | adapter |")
    lines = [
        "# Rank × alpha sweep: measured verdict", "",
        f"**Best trade-off: {next(r['run'] for r in rows if r['best'])}.** {reason}", "",
        f"Rule: {verdict_rule(tolerance)}", "",
        *([f"**Best checkpoint.** {epoch_reason} (Every epoch: {EPOCH_METRICS_CSV}, {EPOCH_CURVES}.)", ""]
          if epoch_reason else []),
        f"Metrics: CLIP `{clip_model}`. Prompt alignment is the CLIP score (100 × cosine of prompt and "
        "image, floored at 0); style similarity is the mean cosine between an image's CLIP embedding and "
        "the centroid of the training images' embeddings; diversity is the mean pairwise cosine distance "
        "between the seeds of one prompt. Every run uses the same prompts and seeds as the base model.", "",
        "The change in alignment is paired (each LoRA image against the base image of the same prompt and "
        "seed); ± is its standard error, so a change within about two of them is noise.", "",
        header, "|" + " --- |" * 10,
        f"| base model | | | {_fmt(base['alignment'], '.2f')} | | {_fmt(base['style_similarity'], '.4f')} | "
        f"| {_fmt(base['diversity'], '.4f')} | | |",
    ]
    for row in rows:
        name = f"**{row['run']}** ★" if row["best"] else row["run"]
        lines.append(
            f"| {name} | {row['rank']} | {row['alpha']:g} | {_fmt(row['alignment'], '.2f')} "
            f"| {_fmt(row['alignment_change'], '+.2f')} ± {_fmt(row['alignment_change_se'], '.2f')} "
            f"| {_fmt(row['style_similarity'], '.4f')} "
            f"| {_fmt(row['style_gain'], '+.4f')} | {_fmt(row['diversity'], '.4f')} "
            f"| {'yes' if row['within_tolerance'] else 'no'} | {row['lora_type']} |")
    lines += [""] + [f"![{Path(p).stem}]({p})" for p in pictures]
    return "\n".join(lines) + "\n"


def metric_matrix(rows: list[dict], column: str) -> tuple[list[list[float]], list[int], list[float]]:
    ranks = sorted({row["rank"] for row in rows})
    alphas = sorted({row["alpha"] for row in rows})
    values = {(row["rank"], row["alpha"]): row[column] for row in rows}
    return [[values.get((r, a), math.nan) for a in alphas] for r in ranks], ranks, alphas


def report_metrics(runs: list[RunInfo], generations: list[Generation], args: argparse.Namespace, out: Path,
                   epoch_points: list | None = None) -> dict:
    """metrics.csv/md, the heat maps and verdict.json; with ``epoch_points`` (EpochPoint) also the best
    (run, epoch) by the same rule, epoch_metrics.csv and epoch_curves.png."""
    from utils.sweep.clip_metrics import DEFAULT_CLIP_MODEL, style_centroid_of

    clip_model = args.clip_model or DEFAULT_CLIP_MODEL
    embedder = open_embedder(clip_model, args.device)
    target = style_centroid_of(embedder, _style_reference(runs, Path(args.style_images) if args.style_images
                                                          else None))
    rows, base, reason = measure(runs, generations, embedder, target, args.alignment_tolerance)
    write_metrics_csv(rows, out / METRICS_CSV)
    pictures = [GRID_PICTURE, LOSS_CURVES]
    for column, stem, title, _ in METRICS:
        values, ranks, alphas = metric_matrix(rows, column)
        heatmap(values, ranks, alphas, title, out / f"heatmap_{stem}.png")
        pictures.append(f"heatmap_{stem}.png")
    epoch_rows = measure_epochs(epoch_points or [], embedder, target) or final_epoch_rows(rows, runs)
    best_epoch, epoch_reason = choose_best(epoch_rows, args.alignment_tolerance, name=epoch_name,
                                           noun="checkpoint")
    write_metrics_csv(epoch_rows, out / EPOCH_METRICS_CSV, EPOCH_FIELDS)
    pictures.append(plot_epoch_curves(epoch_rows, args.alignment_tolerance, out / EPOCH_CURVES).name)
    write_text(out / METRICS_MD, metrics_markdown(rows, base, reason, args.alignment_tolerance,
                                                  clip_model, pictures, epoch_reason))
    best = next(row for row in rows if row["best"])
    write_json(out / VERDICT_FILE, {
        "best_run": best["run"], "rank": best["rank"], "alpha": best["alpha"], "run_dir": best["run_dir"],
        "reason": reason, "rule": verdict_rule(args.alignment_tolerance),
        "alignment_tolerance": args.alignment_tolerance, "clip_model": clip_model, "base": base,
        "eligible_runs": [row["run"] for row in rows if row["within_tolerance"]],
        **epoch_verdict(epoch_rows, best_epoch, epoch_reason, args.alignment_tolerance),
    })
    print(f"Best trade-off: {best['run']}. {reason}")
    print(f"Best checkpoint: {epoch_name(best_epoch)}. {epoch_reason}")
    return {"metrics_csv": str(out / METRICS_CSV), "metrics_md": str(out / METRICS_MD),
            "verdict": str(out / VERDICT_FILE), "epoch_metrics": str(out / EPOCH_METRICS_CSV)}
