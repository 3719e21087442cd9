"""Where a training run stands: its step, its best epoch, its losses so far and the facts recorded with it.
Saved in each resumable checkpoint (training_state.json) and restored from it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class TrainState:
    max_train_steps: int
    steps_per_epoch: int
    global_step: int = 0
    best_metric: float = math.inf
    best_epoch: int = 0
    initial_eval_loss: float | None = None
    last_eval_loss: float | None = None
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient
    epoch_losses: list = field(default_factory=list)  # finite step losses of the current epoch so far
    dataset_info: dict = field(default_factory=dict)  # image count and caption tag frequencies
    speed_info: dict = field(default_factory=dict)  # resolved speed settings (checkpointing, evaluation plan)
