"""The sweep's pictures: the rank x alpha grid, the epoch strip, the loss overlay and the metric heat maps.

matplotlib and PIL are imported inside the functions, so the bookkeeping commands start fast.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

from utils.core.atomic import save_figure, save_image, write_json
from utils.core.layout import BEST_MODEL, EPOCH_MODEL_PREFIX, EPOCH_STRIP, FINAL_MODEL
from utils.sweep.outputs import Generation, base_images
from utils.sweep.records import SweepError
from utils.sweep.runs import RunInfo, read_loss_log
from utils.training.loss_log import LOSS_LOGS, moving_average, smoothing_window

logger = logging.getLogger("sweep_report")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


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
    match = re.fullmatch(rf"{EPOCH_MODEL_PREFIX}(\d+)", model_folder.name)
    if match:
        return int(match.group(1)), f"epoch {match.group(1)}"
    label = {FINAL_MODEL: "final", BEST_MODEL: "best"}.get(model_folder.name, model_folder.name)
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


def plot_loss_overlay(runs: list[RunInfo], png_path: Path) -> Path:
    """One figure, one smoothed training-loss line per run (the raw loss faint behind it)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 5), dpi=100)
    for run in runs:
        steps, losses = read_loss_log(run.run_dir)
        if not steps:
            logger.warning("%s: no %s; left out of the loss plot", run.run_dir, " or ".join(LOSS_LOGS))
            continue
        window = smoothing_window(len(losses))
        (line,) = axis.plot(steps, moving_average(losses, window), label=f"rank {run.rank}, alpha {run.alpha:g}")
        axis.plot(steps, losses, color=line.get_color(), alpha=0.15)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss (moving average)")
    axis.set_title(f"Training loss of {len(runs)} runs")
    axis.grid(alpha=0.3)
    if runs:
        axis.legend(fontsize=8, loc="upper right", ncol=2 if len(runs) > 6 else 1)
    figure.tight_layout()
    return save_figure(figure, png_path)


def plot_epoch_curves(rows: list[dict], tolerance: float, png_path: Path) -> Path:
    """Style gain (top) and alignment change (bottom) of each run over its epochs; the best (run, epoch)
    starred, epochs beyond the alignment tolerance drawn hollow."""
    plt = _pyplot()
    figure, (gain_axis, change_axis) = plt.subplots(2, 1, figsize=(8, 7), dpi=100, sharex=True)
    for run in dict.fromkeys(row["run"] for row in rows):
        points = sorted((row for row in rows if row["run"] == run), key=lambda row: row["epoch"])
        epochs = [row["epoch"] for row in points]
        (line,) = gain_axis.plot(epochs, [row["style_gain"] for row in points], marker="o", label=run)
        change_axis.plot(epochs, [row["alignment_change"] for row in points], marker="o", color=line.get_color())
        for axis, column in ((gain_axis, "style_gain"), (change_axis, "alignment_change")):
            outside = [row for row in points if not row.get("within_tolerance", True)]
            axis.scatter([row["epoch"] for row in outside], [row[column] for row in outside], s=60,
                         facecolors="white", edgecolors=line.get_color(), zorder=3)
    for row in rows:
        if row.get("best"):
            gain_axis.scatter([row["epoch"]], [row["style_gain"]], marker="*", s=300, color="gold",
                              edgecolors="black", zorder=4, label=f"best: {row['run']} at epoch {row['epoch']}")
    change_axis.axhline(-tolerance, color="grey", linestyle="--", linewidth=1)
    change_axis.text(0.01, 0.02, f"tolerance: {-tolerance:g} points", transform=change_axis.transAxes, fontsize=8)
    gain_axis.axhline(0, color="grey", linewidth=0.8)
    gain_axis.set_ylabel("style gain over the base")
    change_axis.set_ylabel("alignment change vs base")
    change_axis.set_xlabel("epoch (0-based, as in checkpoint_epoch_N)")
    gain_axis.set_title("Each run over its epochs (hollow: alignment beyond the tolerance)")
    for axis in (gain_axis, change_axis):
        axis.grid(alpha=0.3)
    gain_axis.legend(fontsize=8)
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


def write_epoch_strip(inference_dir: Path, output: Path | None = None, image_index: int = 0,
                      cell_size: int = 256) -> Path:
    """``{inference_dir}/epoch_strip.png`` (and its .json: columns, prompts, seeds) of the checkpoint series
    whose images are in ``inference_dir``'s subfolders."""
    from utils.sweep.outputs import lora_generations

    generations = lora_generations(inference_dir)
    output = output or inference_dir / EPOCH_STRIP
    image, columns = epoch_strip(generations, image_index, cell_size)
    save_image(image, output)
    write_json(output.with_suffix(".json"), {"columns": columns, "prompts": generations[0].prompts,
                                             "seeds": generations[0].seeds, "image_index": image_index})
    return output
