"""The loss logs of a run, buffered, written, read and drawn (``logs/loss_curve.png``) in one place.

    logs/training_log.csv     one row per epoch (0-based), loss = the epoch's mean
    logs/training_steps.csv   the same columns, one row per optimizer step

The step losses wait on the device (``StepLosses``) and are read into the per-step log every few steps.

Everything that reads a loss log (the run's loss plot, the sweep's overlay, tests) goes through
``find_loss_log`` and ``read_losses``, and smooths with ``moving_average``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from utils.core.atomic import replace_file, save_figure
from utils.core.layout import EPOCH_LOG, STEP_LOG, TIMESTAMP_FORMAT, RunLayout

LOSS_LOGS = (STEP_LOG, EPOCH_LOG)  # the per-step log first; the original (and older runs) only have the second


def read_rows(path: Path) -> list[dict]:
    """The data rows of a loss log (rows without a step, e.g. blank lines, are left out)."""
    with open(path, newline="") as handle:
        return [row for row in csv.DictReader(handle) if row.get("step")]


def find_loss_log(log_dir: Path) -> Path | None:
    """The run's per-step loss log (``training_steps.csv``), else the original's per-epoch
    ``training_log.csv`` (all that a run of the original, or an older run, has)."""
    for name in LOSS_LOGS:
        if (Path(log_dir) / name).is_file():
            return Path(log_dir) / name
    return None


def read_losses(path: Path) -> tuple[list[int], list[float]]:
    """(steps, losses) of a loss log, in file order."""
    rows = [row for row in read_rows(path) if row.get("loss")]
    return [int(row["step"]) for row in rows], [float(row["loss"]) for row in rows]


def smoothing_window(count: int) -> int:
    """The moving-average window for ``count`` points: a twentieth of them, at least one."""
    return max(1, count // 20)


def moving_average(values: list[float], window: int) -> list[float]:
    """Each value averaged with up to ``window - 1`` values before it."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def log_timestamp() -> str:
    return datetime.now().strftime(TIMESTAMP_FORMAT)


class CsvLog:
    """A CSV log under ``logs/`` with the original's columns, written by the main process a row at a time.

    ``training_log.csv`` gets one row per epoch, ``training_steps.csv`` one per optimizer step. On resume,
    rows written after the checkpoint's step belong to the lost future and are dropped, so the run
    writes each of them again exactly once.
    """

    FIELDS = ["epoch", "step", "loss", "learning_rate", "timestamp"]

    def __init__(self, path: Path, enabled: bool, keep_until_step: int = 0):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.read(path) if path.exists() else []
        rows = [row for row in rows if int(row["step"]) <= keep_until_step]

        def fill(temporary: Path) -> None:  # a kill during the cut leaves the old log or the new, never half
            with open(temporary, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.FIELDS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
        replace_file(path, fill)

    @staticmethod
    def read(path: Path) -> list[dict]:
        return read_rows(path)

    def append(self, epoch: int, step: int, loss: float, learning_rate: float) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as handle:
            csv.writer(handle).writerow([epoch, step, loss, learning_rate, log_timestamp()])


def open_logs(layout: RunLayout, enabled: bool, keep_until_step: int) -> tuple[CsvLog, CsvLog]:
    """(per-epoch log, per-step log) of the run, cut back to ``keep_until_step``."""
    return (CsvLog(layout.epoch_log, enabled, keep_until_step), CsvLog(layout.step_log, enabled, keep_until_step))


# ----------------------------------------------------------------------------- step losses, buffered


@dataclass
class StepRecord:
    epoch: int
    step: int
    learning_rate: float
    loss: float
    skipped: bool  # the optimizer step was skipped for a non-finite loss or gradient


@dataclass
class StepLosses:
    """Per-step losses and skip flags kept on the device, read in one transfer every ``read_every`` steps.

    On a GPU a ``.item()`` per step would make the host wait for the step to finish before queuing
    the next one; here the host reads only at log points (and where the loop needs the values:
    epoch ends, checkpoints, stops).
    """

    read_every: int
    pending: list = field(default_factory=list)

    def add(self, epoch: int, step: int, learning_rate: float, loss: torch.Tensor, skipped: torch.Tensor) -> None:
        self.pending.append((epoch, step, learning_rate, loss.detach().float().reshape(()),
                             skipped.detach().float().reshape(())))

    def due(self, step: int) -> bool:
        return bool(self.pending) and (self.read_every <= 1 or step % self.read_every == 0)

    def read(self) -> list[StepRecord]:
        if not self.pending:
            return []
        values = torch.stack([torch.stack([loss, skipped]) for *_, loss, skipped in self.pending]).cpu().tolist()
        records = [StepRecord(epoch, step, lr, loss, bool(skipped))
                   for (epoch, step, lr, _, _), (loss, skipped) in zip(self.pending, values)]
        self.pending = []
        return records


def read_interval(device_type: str) -> int:
    """Steps between host reads of the losses: every step on a CPU (a read costs nothing there)."""
    return 1 if device_type == "cpu" else 25


# ----------------------------------------------------------------------------- the loss curve


def plot_losses(layout: RunLayout) -> None:
    """Redraw ``{logging_dir}/loss_curve.png`` of a run from its loss log (if it has one yet)."""
    log = find_loss_log(layout.logs)
    if log is not None:
        plot_loss_curve(log, layout.loss_curve)


def plot_loss_curve(csv_path: Path, png_path: Path) -> Path:
    """Training loss against the optimizer step (and its moving average) from a loss log: one row per
    step (training_steps.csv) or one per epoch (training_log.csv, the epoch's mean)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = read_losses(csv_path)
    unit = "epoch" if Path(csv_path).name == EPOCH_LOG else "step"
    window = smoothing_window(len(losses))
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    axis.plot(steps, losses, alpha=0.35 if window > 1 else 1.0, marker="o" if unit == "epoch" else None,
              label=f"loss per {unit}" + (" (mean)" if unit == "epoch" else ""))
    if window > 1:
        axis.plot(steps, moving_average(losses, window), label=f"moving average ({window} {unit}s)")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return save_figure(figure, png_path)
