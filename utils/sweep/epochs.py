"""The epochs of a sweep's runs: their image folders, their metrics table and the best (run, epoch).

run_checkpoint_inference.sh leaves the images of a run's epoch checkpoints in
``{output}/{run}_checkpoints/epoch_{E}/`` (``final/`` with --include_final), each folder's metadata naming
the LoRA it was made with. The report looks for those folders beside the sweep's images and measures every
epoch with the sweep's metrics; the best (run, epoch) follows the verdict's rule (metrics.choose_best).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from utils.core.layout import EPOCH_MODEL_PREFIX, FINAL_MODEL, RunLayout, checkpoint_series_dir, model_info_file
from utils.sweep.outputs import Generation, read_generation
from utils.sweep.records import read_json
from utils.sweep.runs import RunInfo
from utils.training.loss_log import read_rows

logger = logging.getLogger("sweep_report")

DEFAULT_SERIES_DIR = "output_visualization"  # run_checkpoint_inference.sh's default output folder
EPOCH_FIELDS = ["run", "rank", "alpha", "epoch", "model", "num_images", "alignment", "alignment_base",
                "alignment_change", "alignment_change_se", "style_similarity", "style_similarity_base",
                "style_gain", "diversity", "diversity_base", "eval_loss", "within_tolerance", "best", "run_dir"]


@dataclass
class EpochPoint:
    """One run at one epoch: the LoRA folder it was saved in and the images made with it."""

    run: RunInfo
    epoch: int  # 0-based, as in checkpoint_epoch_{epoch}
    model: str  # the LoRA folder's name: checkpoint_epoch_{epoch} or final_model
    generation: Generation
    eval_loss: float | None

    def describe(self) -> dict:
        return {"run": self.run.label, "rank": self.run.rank, "alpha": self.run.alpha, "epoch": self.epoch,
                "model": self.model, "eval_loss": math.nan if self.eval_loss is None else self.eval_loss,
                "run_dir": str(self.run.run_dir)}


def epoch_name(row: dict) -> str:
    return f"{row['run']} at epoch {row['epoch']}"


def final_epoch(run_dir: Path, config: dict) -> int:
    """The last epoch (0-based) a run trained: its epoch log's last row, else --num_train_epochs - 1."""
    layout = RunLayout(run_dir, str(config.get("logging_dir") or "logs"))
    rows = read_rows(layout.epoch_log) if layout.epoch_log.is_file() else []
    if rows and str(rows[-1].get("epoch", "")).isdigit():
        return int(rows[-1]["epoch"])
    return int(config.get("num_train_epochs", 1)) - 1


def model_eval_loss(model_dir: Path) -> float | None:
    """The fixed-noise loss recorded with a LoRA folder (checkpoint_info.json / final_model_info.json)."""
    info = read_json(model_dir / model_info_file(model_dir.name)) or {}
    value = info.get("final_eval_loss" if model_dir.name == FINAL_MODEL else "eval_loss")
    return float(value) if isinstance(value, (int, float)) else None


def series_roots(inference_dir: Path) -> list[Path]:
    """Where run_checkpoint_inference.sh's ``{run}_checkpoints/`` folders may lie: in the sweep's image folder,
    beside it, or in the script's default output folder beside it."""
    roots = [inference_dir, inference_dir.parent, inference_dir.parent / DEFAULT_SERIES_DIR]
    return [root for i, root in enumerate(roots) if root.is_dir() and root not in roots[:i]]


def _run_points(run: RunInfo, series_dir: Path) -> list[EpochPoint]:
    points: dict[int, EpochPoint] = {}
    for folder in sorted(p for p in series_dir.iterdir() if p.is_dir()):
        generation = read_generation(folder)
        if not (generation and generation.lora_path and all(generation.lora)):
            continue
        model_dir = generation.lora_path
        if model_dir.parent.resolve() != run.run_dir.resolve():
            logger.warning("%s: made with %s, not a LoRA of %s; left out", folder, model_dir, run.run_dir)
            continue
        match = re.fullmatch(rf"{EPOCH_MODEL_PREFIX}(\d+)", model_dir.name)
        epoch = int(match.group(1)) if match else final_epoch(run.run_dir, run.config)
        if match or model_dir.name == FINAL_MODEL:
            if epoch not in points or match:  # a checkpoint of the last epoch and final_model: the checkpoint
                points[epoch] = EpochPoint(run, epoch, model_dir.name, generation, model_eval_loss(model_dir))
    return [points[epoch] for epoch in sorted(points)]


def find_epoch_points(runs: list[RunInfo], roots: list[Path]) -> list[EpochPoint]:
    """Every (run, epoch) with images in a ``{run}_checkpoints/`` folder under one of ``roots``.

    Epochs are compared only on the same prompts and seeds: points made with others than most of them are
    left out with a warning.
    """
    points = []
    for run in runs:
        for root in roots:
            series_dir = checkpoint_series_dir(root, run.run_dir)
            if series_dir.is_dir():
                points += _run_points(run, series_dir)
                break
    if not points:
        return []
    key = Counter(_prompts_key(p.generation) for p in points).most_common(1)[0][0]
    for point in points:
        if _prompts_key(point.generation) != key:
            logger.warning("%s: other prompts or seeds than the other epochs; left out", point.generation.folder)
    return [point for point in points if _prompts_key(point.generation) == key]


def _prompts_key(generation: Generation) -> str:
    return repr((generation.prompts, generation.seeds))


def final_epoch_rows(rows: list[dict], runs: list[RunInfo]) -> list[dict]:
    """Without epoch images, each run's final model is its one epoch."""
    by_label = {run.label: run for run in runs}
    out = []
    for row in rows:
        run = by_label[row["run"]]
        loss = model_eval_loss(run.run_dir / FINAL_MODEL)
        out.append({**{k: v for k, v in row.items() if k in EPOCH_FIELDS},
                    "epoch": final_epoch(run.run_dir, run.config), "model": FINAL_MODEL,
                    "eval_loss": math.nan if loss is None else loss})
    return out


def _json_row(row: dict) -> dict:
    return {name: (None if isinstance(row[name], float) and math.isnan(row[name]) else row[name])
            for name in EPOCH_FIELDS}


def epoch_rule(tolerance: float) -> str:
    return (f"The verdict's rule over every saved epoch of every run: among the checkpoints whose prompt alignment "
            f"is at most {tolerance:g} CLIP-score points below the base model's (on the same prompts and seeds), "
            f"the highest style gain wins; a tie goes to the higher alignment.")


def epoch_verdict(rows: list[dict], best: dict, reason: str, tolerance: float) -> dict:
    """verdict.json's keys for the best (run, epoch): best_epoch, its reason and rule, and every epoch's numbers."""
    return {
        "best_epoch": {key: best[key] for key in ("run", "rank", "alpha", "epoch", "model", "num_images", "run_dir")}
        | {key: _json_row(best)[key] for key in ("style_gain", "alignment_change", "alignment_change_se",
                                                  "eval_loss")},
        "best_epoch_reason": reason, "best_epoch_rule": epoch_rule(tolerance),
        "epochs": [_json_row(row) for row in rows],
    }
