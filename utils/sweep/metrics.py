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
from utils.sweep.outputs import Generation, base_images
from utils.sweep.pictures import heatmap
from utils.sweep.records import CONFIG_FILE, SweepError
from utils.sweep.runs import RunInfo

logger = logging.getLogger("sweep_report")

DEFAULT_ALIGNMENT_TOLERANCE = 2.0

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
            "lora_type": run.lora_type,
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
              "| diversity | within tolerance | adapter |")
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
