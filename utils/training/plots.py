"""The run's loss curve, ``logs/loss_curve.png``, drawn from its loss log."""

from __future__ import annotations

from pathlib import Path

from utils.core.atomic import save_figure
from utils.training.loss_log import EPOCH_LOG, find_loss_log, moving_average, read_losses, smoothing_window


def plot_losses(run_dir: Path, logging_dir: str) -> None:
    """Redraw ``{logging_dir}/loss_curve.png`` of a run from its loss log (if it has one yet)."""
    log = find_loss_log(run_dir / logging_dir)
    if log is not None:
        plot_loss_curve(log, run_dir / logging_dir / "loss_curve.png")


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
