"""Every file and folder name of a training run and of a sweep, in one place.

A training run (``train_sdxl_lora.py``):

    {output_dir}/{YYYYmmdd_HHMMSS}_{dataset_type}_r{rank}_a{alpha}_lr{lr}[_N]/
        experiment_config.json           every flag + experiment_name and timestamp
        {logging_dir}/training_log.csv   one row per epoch (0-based), loss = the epoch's mean
        {logging_dir}/training_steps.csv the same columns, one row per optimizer step
        {logging_dir}/loss_curve.png, timings.json, tensorboard events
        best_model/ (+ best_model_info.json)
        checkpoint_epoch_{E}/ (+ checkpoint_info.json), E the 0-based epoch
        final_model/ (+ final_model_info.json)
        interrupted_model/ (+ interrupted_model_info.json), the LoRA at a stop
        checkpoints/checkpoint-{step}/   resumable state, with training_state.json
        validation/                      sample images

Each model folder holds ``pytorch_lora_weights.safetensors`` (diffusers format) and, when asked, the kohya
copy ``kohya_lora.safetensors``.

A sweep (``run_experiments.sh``) trains its runs into the trainer's run folders and keeps its bookkeeping in
its results folder (default ``experiment_results``):

    {results_dir}/experiment_{R}_{A}.json   one record per run
    {results_dir}/summary.json
    {results_dir}/runs/r{R}_a{A}_lr{LR}/    status.json, train.log, run_dir.txt
    {results_dir}/loss_curves.png, .sweep.lock

Plain names and paths, no torch: argument parsers and the sweep's bookkeeping import it for free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

RUN_STAMP_FORMAT = "%Y%m%d_%H%M%S"  # a run folder's name and experiment_config.json's timestamp
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"  # the logs, the info files and the sweep's records

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights file name
KOHYA_WEIGHT_NAME = "kohya_lora.safetensors"  # must not end with LORA_WEIGHT_NAME
CONFIG_FILE = "experiment_config.json"
TRAINING_STATE_FILE = "training_state.json"
EPOCH_LOG = "training_log.csv"
STEP_LOG = "training_steps.csv"
LOSS_CURVE = "loss_curve.png"
TIMINGS_FILE = "timings.json"

FINAL_MODEL = "final_model"
BEST_MODEL = "best_model"
INTERRUPTED_MODEL = "interrupted_model"
EPOCH_MODEL_PREFIX = "checkpoint_epoch_"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
VALIDATION_DIR = "validation"
# In checkpoints/checkpoint-{step}/: the LoRA of each trained model, in order (the UNet, the text encoders)
CHECKPOINT_LORA_FILES = ("lora_unet.safetensors", "lora_text_encoder.safetensors", "lora_text_encoder_2.safetensors")


def run_name(dataset_type: str, rank: int, alpha: float, learning_rate: float, now: datetime | None = None) -> str:
    """A training run's folder name; the learning rate as given (before --scale_lr)."""
    stamp = (now or datetime.now()).strftime(RUN_STAMP_FORMAT)
    return f"{stamp}_{dataset_type}_r{rank}_a{alpha}_lr{learning_rate}"


def run_stamp(run_dir: Path) -> str | None:
    """The ``YYYYmmdd_HHMMSS`` a run folder's name starts with, or None when it does not."""
    stamp = Path(run_dir).name[:len("YYYYmmdd_HHMMSS")]
    try:
        datetime.strptime(stamp, RUN_STAMP_FORMAT)
    except ValueError:
        return None
    return stamp


def model_info_file(model_folder: str) -> str:
    """The info JSON written inside a model folder: best_model_info.json, checkpoint_info.json, ..."""
    if model_folder.startswith(EPOCH_MODEL_PREFIX):
        return "checkpoint_info.json"
    return f"{model_folder}_info.json"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one training run's folder."""

    root: Path
    logging_dir: str = "logs"

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def logs(self) -> Path:
        return self.root / self.logging_dir

    @property
    def epoch_log(self) -> Path:
        return self.logs / EPOCH_LOG

    @property
    def step_log(self) -> Path:
        return self.logs / STEP_LOG

    @property
    def loss_curve(self) -> Path:
        return self.logs / LOSS_CURVE

    @property
    def timings(self) -> Path:
        return self.logs / TIMINGS_FILE

    @property
    def final_model(self) -> Path:
        return self.root / FINAL_MODEL

    @property
    def best_model(self) -> Path:
        return self.root / BEST_MODEL

    @property
    def interrupted_model(self) -> Path:
        return self.root / INTERRUPTED_MODEL

    def epoch_model(self, epoch: int) -> Path:
        """``checkpoint_epoch_{epoch}/``, the 0-based epoch in the name."""
        return self.root / f"{EPOCH_MODEL_PREFIX}{epoch}"

    def epoch_models(self) -> list[tuple[int, Path]]:
        """(epoch, folder) of every ``checkpoint_epoch_N/`` that holds a LoRA, in epoch order."""
        found = []
        for folder in self.root.glob(f"{EPOCH_MODEL_PREFIX}*"):
            number = folder.name[len(EPOCH_MODEL_PREFIX):]
            if number.isdigit() and (folder / LORA_WEIGHT_NAME).is_file():
                found.append((int(number), folder))
        return sorted(found)

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{step}"

    @staticmethod
    def checkpoint_step(folder: Path) -> int | None:
        """The step of a ``checkpoint-{step}/`` folder, or None when the name is not one."""
        name = Path(folder).name
        number = name[len(CHECKPOINT_PREFIX):]
        return int(number) if name.startswith(CHECKPOINT_PREFIX) and number.isdigit() else None

    @property
    def validation(self) -> Path:
        return self.root / VALIDATION_DIR

    def has_model(self, model_folder: str = FINAL_MODEL) -> bool:
        return (self.root / model_folder / LORA_WEIGHT_NAME).is_file()


# ----------------------------------------------------------------------------- the sweep

SWEEP_RESULTS_DIR = "experiment_results"
SUMMARY_FILE = "summary.json"
STATUS_FILE = "status.json"
RUN_LOG_FILE = "train.log"
RUN_DIR_FILE = "run_dir.txt"  # the trainer writes its run folder here (--run_dir_file)
SWEEP_LOCK_FILE = ".sweep.lock"
LOSS_CURVES = "loss_curves.png"


def sweep_run_name(rank: object, alpha: object, learning_rate: object) -> str:
    """A sweep run's status folder name, from the grid values as written on the command line."""
    return f"r{rank}_a{alpha}_lr{learning_rate}"


def record_name(rank: object, alpha: object) -> str:
    """The sweep's per-run record, ``experiment_{R}_{A}.json``."""
    return f"experiment_{rank}_{alpha}.json"


RECORD_PATTERN = re.compile(r"experiment_(?P<rank>[^_]+)_(?P<alpha>[^_]+)\.json")


@dataclass(frozen=True)
class SweepLayout:
    """The paths of a sweep's results folder."""

    root: Path

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def lock(self) -> Path:
        return self.root / SWEEP_LOCK_FILE

    @property
    def loss_curves(self) -> Path:
        return self.root / LOSS_CURVES

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def record(self, rank: object, alpha: object) -> Path:
        return self.root / record_name(rank, alpha)

    def run_status_dir(self, rank: object, alpha: object, learning_rate: object) -> Path:
        return self.runs / sweep_run_name(rank, alpha, learning_rate)

    def status(self, rank: object, alpha: object, learning_rate: object) -> Path:
        return self.run_status_dir(rank, alpha, learning_rate) / STATUS_FILE

    def run_log(self, rank: object, alpha: object, learning_rate: object) -> Path:
        return self.run_status_dir(rank, alpha, learning_rate) / RUN_LOG_FILE

    def run_dir_file(self, rank: object, alpha: object, learning_rate: object) -> Path:
        return self.run_status_dir(rank, alpha, learning_rate) / RUN_DIR_FILE


# ----------------------------------------------------------------------------- the sweep's report

# run_inference_experiments.sh writes one image folder per run and the report beside them:
#     {inference_dir}/{run}/, base_model_results/, report/
# run_checkpoint_inference.sh one image folder per epoch checkpoint of a run:
#     {output}/{run}_checkpoints/epoch_{E}/ (and final/ with --include_final), epoch_strip.png
# and, with --all_runs, the same for every run of the sweep: {output}/{run}_checkpoints/epoch_{EEE}/
BASE_RESULTS_DIR = "base_model_results"
REPORT_DIR = "report"
GRID_PICTURE = "exp_result.png"
METRICS_CSV = "metrics.csv"
METRICS_MD = "metrics.md"
VERDICT_FILE = "verdict.json"
EPOCH_METRICS_CSV = "epoch_metrics.csv"  # the metrics of every (run, epoch)
EPOCH_CURVES = "epoch_curves.png"  # style gain and alignment of each run over its epochs
REPORT_PAGE = "report.html"  # the page that opens from disk: every run and epoch side by side
CHECKPOINT_SERIES_SUFFIX = "_checkpoints"
EPOCH_FOLDER_PREFIX = "epoch_"
FINAL_FOLDER = "final"


def checkpoint_series_dir(output_dir: Path, run_dir: Path) -> Path:
    """``{output_dir}/{run}_checkpoints/``: run_checkpoint_inference.sh's images of a run's checkpoints."""
    return Path(output_dir) / f"{Path(run_dir).name}{CHECKPOINT_SERIES_SUFFIX}"


# ----------------------------------------------------------------------------- the sweep's images

EPOCH_STRIP = "epoch_strip.png"
SLURM_DIR = "slurm"  # job scripts, job ids and output of a --slurm submission
EPOCH_IMAGES_WIDTH = 3  # digits of the epoch in the folder names that run_checkpoint_inference.sh --all_runs makes


def epoch_images_name(epoch: int, padded: bool = False) -> str:
    """The images of one epoch checkpoint: ``epoch_{N}`` as the original named them, or ``epoch_{NNN}``
    (zero-padded, so that the folders sort) in the folders that --all_runs makes."""
    return f"{EPOCH_FOLDER_PREFIX}{epoch:0{EPOCH_IMAGES_WIDTH}d}" if padded else f"{EPOCH_FOLDER_PREFIX}{epoch}"
