"""The report of a sweep's inference: which run is behind each folder of images, then the pictures, the metrics
of every run and every epoch that has images, and the page (report.html) that shows them all."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from utils.core.layout import LOSS_CURVES, REPORT_DIR
from utils.sweep.epochs import find_epoch_points, series_roots
from utils.sweep.gallery import write_page
from utils.sweep.metrics import report_metrics
from utils.sweep.outputs import Generation, lora_generations
from utils.sweep.pictures import plot_loss_overlay, write_grid
from utils.sweep.records import SweepError
from utils.sweep.runs import RunInfo, load_run

logger = logging.getLogger("sweep_report")


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


def build_report(args: argparse.Namespace) -> dict:
    inference_dir = Path(args.inference_dir)
    out = Path(args.output_dir) if args.output_dir else inference_dir / REPORT_DIR
    generations = lora_generations(inference_dir, args.folders)
    runs, generations = runs_of(generations)
    roots = [Path(args.epochs_dir)] if args.epochs_dir else series_roots(inference_dir)
    epoch_points = find_epoch_points(runs, roots)
    made = {"grid": str(write_grid(runs, generations, args.prompt_index, args.image_index, args.cell_size, out)),
            "loss_curves": str(plot_loss_overlay(runs, out / LOSS_CURVES))}
    if not args.no_metrics:
        try:
            made.update(report_metrics(runs, generations, args, out, epoch_points))
        except SweepError as error:
            if args.clip_model:  # asked for by name: its failure is the user's to fix
                raise
            logger.warning("No CLIP metrics: %s (pass --clip_model with a local CLIP model, or --no_metrics)",
                           error)
    made["page"] = str(write_page(out, runs, generations, epoch_points))
    return made
