"""The run directory of a training: its name, made unique, and the timestamp read back from it.

What goes in it: the config in experiment_config.py, the loss logs in loss_log.py, the LoRA folders in
lora_folders.py (when: epochs.py), resumable checkpoints in checkpoints.py.

    {output_dir}/{YYYYmmdd_HHMMSS}_{dataset_type}_r{rank}_a{alpha}_lr{lr}[_N]/
        experiment_config.json           every flag + experiment_name and timestamp
        logs/training_log.csv            one row per epoch (0-based), loss = the epoch's mean
        logs/training_steps.csv          the same columns, one row per optimizer step
        logs/loss_curve.png, tensorboard events
        best_model/ (+ best_model_info.json)
        checkpoint_epoch_{E}/ (+ checkpoint_info.json), E the 0-based epoch, saved when (E + 1) % save_steps == 0
        final_model/ (+ final_model_info.json)
        checkpoints/checkpoint-{step}/   resumable accelerate state
        validation/epoch_{N}_{k}.png     N counts finished epochs
"""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path

from utils.core.names import RUN_STAMP_FORMAT


def run_name(args: argparse.Namespace, dataset_type: str, now: datetime | None = None) -> str:
    """The run folder's name, from the resolved dataset type and the flags as given (the learning rate
    before --scale_lr)."""
    stamp = (now or datetime.now()).strftime(RUN_STAMP_FORMAT)
    return f"{stamp}_{dataset_type}_r{args.lora_rank}_a{args.lora_alpha}_lr{args.learning_rate}"


def create_unique_dir(parent: Path, name: str) -> Path:
    """mkdir is atomic, so two runs starting in the same second get different folders."""
    parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        candidate = parent / (name if attempt == 1 else f"{name}_{attempt}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"{parent}: could not create a unique run directory for {name}")


def run_timestamp(run_dir: Path) -> str:
    """The run's start as the original wrote it (``YYYYmmdd_HHMMSS``), read from the folder's name."""
    stamp = run_dir.name[:len("YYYYmmdd_HHMMSS")]
    try:
        datetime.strptime(stamp, RUN_STAMP_FORMAT)
        return stamp
    except ValueError:
        return datetime.now().strftime(RUN_STAMP_FORMAT)
