"""The training runs a sweep made: found in a folder, read from their config, and their epoch checkpoints."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from utils.core.layout import (CONFIG_FILE, FINAL_MODEL, LORA_WEIGHT_NAME, STATUS_FILE, RunLayout, SweepLayout,
                               epoch_images_name)
from utils.sweep.records import SweepError, config_lora_type, read_json
from utils.sweep.status import is_finished

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInfo:
    run_dir: Path
    rank: int
    alpha: float
    learning_rate: float
    config: dict = field(compare=False, repr=False)

    @property
    def lora_type(self) -> str:
        return config_lora_type(self.config)

    @property
    def label(self) -> str:
        return f"r{self.rank}_a{self.alpha:g}_lr{self.learning_rate:g}"


def load_run(run_dir: Path) -> RunInfo:
    config = read_json(run_dir / CONFIG_FILE)
    if config is None:
        raise SweepError(f"{run_dir}: not a training run (no {CONFIG_FILE})")
    try:
        return RunInfo(run_dir, int(config["lora_rank"]), float(config["lora_alpha"]),
                       float(config["learning_rate"]), config)
    except (KeyError, TypeError, ValueError) as error:
        raise SweepError(f"{run_dir / CONFIG_FILE}: missing or bad field {error}") from None


def run_dirs(root: Path) -> list[Path]:
    """``root`` itself when it is a training run, else its subfolders that are (``ls -d root/*/``), by name."""
    if not root.is_dir():
        raise SweepError(f"{root}: folder not found")
    if (root / CONFIG_FILE).is_file():
        return [root]
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / CONFIG_FILE).is_file())


def find_runs(root: Path, model: str = FINAL_MODEL) -> list[RunInfo]:
    """Every run folder in ``root`` that has ``model``/ (final_model, best_model), in name (= start time) order."""
    return [load_run(run_dir) for run_dir in run_dirs(root) if RunLayout(run_dir).has_model(model)]


def newest_checkpoint_run(root: Path) -> Path:
    """The run folder in ``root`` whose newest checkpoint_epoch_N was written last."""
    newest: tuple[float, Path] | None = None
    for run_dir in run_dirs(root):
        times = [(folder / LORA_WEIGHT_NAME).stat().st_mtime for _, folder in epoch_checkpoints(run_dir)]
        if times and (newest is None or max(times) > newest[0]):
            newest = (max(times), run_dir)
    if newest is None:
        raise SweepError(f"{root}: no run with checkpoint_epoch_N folders (train with --save_steps N, or pass "
                         f"--run_dir)")
    logger.info("No --run_dir: using the newest run with epoch checkpoints, %s", newest[1])
    return newest[1]


def resolve_run_dir(path: Path) -> Path:
    """A run directory given itself, or a sweep run folder (r4_a8_lr1e-4/) holding one."""
    if (path / CONFIG_FILE).is_file():
        return path
    status = read_json(path / STATUS_FILE)
    if status and status.get("run_dir"):
        return Path(status["run_dir"])
    if not path.is_dir():
        raise SweepError(f"{path}: folder not found")
    runs = sorted(p for p in path.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file())
    if len(runs) != 1:
        raise SweepError(f"{path}: expected one training run (a folder with {CONFIG_FILE}), found {len(runs)}")
    return runs[0]


def epoch_checkpoints(run_dir: Path, include_final: bool = False, padded: bool = False) -> list[tuple[str, Path]]:
    """(label, folder) of the run's checkpoint_epoch_N folders in epoch order, then final_model if asked; the
    label is the folder name of the epoch's images (epoch_N, or epoch_NNN when ``padded``)."""
    layout = RunLayout(run_dir)
    series = [(epoch_images_name(epoch, padded), folder) for epoch, folder in layout.epoch_models()]
    if include_final and layout.has_model():
        series.append(("final", layout.final_model))
    return series


def sweep_runs_of(results_dir: Path) -> list[RunInfo]:
    """The finished runs recorded in a sweep's bookkeeping folder, in rank, alpha order."""
    runs = []
    for status_file in sorted(SweepLayout(results_dir).runs.glob(f"*/{STATUS_FILE}")):
        status = read_json(status_file)
        if is_finished(status):
            runs.append(load_run(Path(status["run_dir"])))
    return sorted(runs, key=lambda run: (run.rank, run.alpha, run.learning_rate))


def read_loss_log(run_dir: Path) -> tuple[list[int], list[float]]:
    """(step, loss) rows of a run's loss log (training_steps.csv, else training_log.csv), in its logging_dir."""
    from utils.training.loss_log import find_loss_log, read_losses  # torch: not at the sweep's start

    logging_dir = load_run(run_dir).config.get("logging_dir")
    path = find_loss_log(RunLayout(run_dir, *([str(logging_dir)] if logging_dir else [])).logs)
    return read_losses(path) if path else ([], [])
