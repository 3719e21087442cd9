"""What guards a training step: the buffered step losses read into the logs, non-finite steps skipped on
the device and counted (the run stops after too many in a row), the resumable checkpoint every
--checkpointing_steps, the clean stop on a signal, and the messages for a run that cannot go on."""

from __future__ import annotations

import logging
import math
import os
import signal
from dataclasses import dataclass, field

import torch

from utils.core.errors import TrainingInterrupted
from utils.training.checkpoints import checkpoints_of, save_checkpoint
from utils.training.experiment_config import command_line
from utils.training.lora_folders import save_model_folder
from utils.training.run import Run
from utils.training.settings import RunSettings, TrainingError

logger = logging.getLogger(__name__)


def record_losses(run: Run, losses: StepLosses, progress) -> None:
    """Read the buffered step losses (one host transfer): log rows, epoch means, the non-finite guard."""
    for record in losses.read():
        if math.isfinite(record.loss):
            run.state.epoch_losses.append(record.loss)
        run.step_log.append(record.epoch, record.step, record.loss, record.learning_rate)
        run.accelerator.log({"train_loss": record.loss, "lr": record.learning_rate}, step=record.step)
        progress.set_postfix(loss=f"{record.loss:.4f}", lr=f"{record.learning_rate:.2e}")
        count_nonfinite(run, record)


def count_nonfinite(run: Run, record: StepRecord) -> None:
    """Count skipped steps in a row; stop training after too many. The step itself was already skipped
    on the device, so reading this a few steps late changes no weight."""
    if not record.skipped:
        run.nonfinite_in_a_row = 0
        return
    run.nonfinite_in_a_row += 1
    run.state.skipped_steps += 1
    logger.warning("Step %d skipped: non-finite %s (%d in a row)", record.step,
                   "loss" if not math.isfinite(record.loss) else "gradient", run.nonfinite_in_a_row)
    if run.nonfinite_in_a_row >= run.settings.args.max_nonfinite_steps:
        raise TrainingError(nonfinite_message(run))


def checkpoint_or_stop(run: Run, stop: StopRequest, progress, losses: StepLosses) -> None:
    """After an optimizer step: the resumable state every --checkpointing_steps, and the stop on a signal.
    With several processes the stop flag is exchanged only when the losses are read (no sync per step)."""
    checkpoint = run.settings.args.checkpointing_steps and run.state.global_step % run.settings.args.checkpointing_steps == 0
    if checkpoint:
        record_losses(run, losses, progress)
        save_checkpoint(run.accelerator, run.settings, run.state, run.ema)
    exchange = run.accelerator.num_processes == 1 or not losses.pending
    if exchange and stop_requested(stop, run.accelerator):
        record_losses(run, losses, progress)
        progress.close()
        stop_now(run, stop)


def nonfinite_step(run: Run, loss: torch.Tensor, grad_norm) -> torch.Tensor:
    """A device bool: the loss (on any process) or the gradient is NaN/Inf.

    With fp16 loss scaling an infinite gradient alone is the scaler's business (it skips the
    step and lowers the scale); a non-finite loss never is.
    """
    bad = ~torch.isfinite(run.accelerator.gather(loss.detach()[None])).all()
    if run.accelerator.scaler is None and grad_norm is not None:
        bad = bad | ~torch.isfinite(torch.as_tensor(grad_norm, device=bad.device))
    return bad


def skip_on_device(run: Run, skipped: torch.Tensor):
    """Make the coming optimizer step a no-op when ``skipped``, without the host reading the flag.

    The fused AdamW takes a ``found_inf`` tensor (the protocol torch's GradScaler uses) and skips the
    update, the moments and the step count on the device. With a GradScaler (fp16) the scaler already
    skips steps whose gradients are not finite. Other optimizers: the host reads the flag (a sync) and
    drops the gradients, so the step leaves the parameters alone.
    """
    optimizer = run.optimizer.optimizer
    if run.accelerator.scaler is not None:
        return None
    if isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults.get("fused"):
        optimizer.grad_scale, optimizer.found_inf = None, skipped.float()
        return optimizer.found_inf
    if bool(skipped):
        run.optimizer.zero_grad(set_to_none=True)  # parameters without gradients are not updated
    return None


def nonfinite_message(run: Run) -> str:
    checkpoints = checkpoints_of(run.settings.run_dir)
    last = f" The last good resumable state is {checkpoints[-1]}." if checkpoints else ""
    return (f"training stopped at step {run.state.global_step + 1}: {run.nonfinite_in_a_row} steps in a row had a "
            f"NaN/Inf loss or gradient, and no weights were updated or saved from them. Likely causes: the SDXL VAE "
            f"overflowing in fp16 (use --mixed_precision bf16, or --pretrained_vae_model_name_or_path "
            f"madebyollin/sdxl-vae-fp16-fix), or a learning rate too high for this setup (--learning_rate "
            f"{run.settings.learning_rate:g}; try 1e-4 or lower).{last}")


def out_of_memory_message(settings: RunSettings) -> str:
    checkpoints = checkpoints_of(settings.run_dir)
    last = f" The last checkpoint, {checkpoints[-1]}, is intact." if checkpoints else ""
    return (f"out of GPU memory at --resolution {settings.args.resolution}, --train_batch_size {settings.args.train_batch_size}. "
            "Ways to fit: a smaller --train_batch_size (with --gradient_accumulation_steps to keep the effective "
            "batch), a lower --resolution, --gradient_checkpointing, --optimizer adamw8bit, "
            "--mixed_precision bf16 or fp16, keeping --cache on (the VAE and text encoders then leave the GPU), "
            f"or a smaller --lora_rank.{last}")


def stop_requested(stop: StopRequest, accelerator) -> bool:
    """True on every process if any process got a stop signal (so all stop at the same step)."""
    if accelerator.num_processes == 1:
        return stop.requested
    flag = torch.tensor([1.0 if stop.requested else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def stop_now(run: Run, stop: StopRequest) -> None:
    """Save a resumable state and the current LoRA, then end with a message on how to resume."""
    checkpoint = save_checkpoint(run.accelerator, run.settings, run.state, run.ema)
    save_model_folder(run.accelerator, run.settings.run_dir / "interrupted_model", run.models, run.settings,
                      run.state, "interrupted_model_info.json", {"step": run.state.global_step}, ema=run.ema)
    run.accelerator.end_training()
    command = command_line()
    if "--resume_from_checkpoint" not in command:
        command += f" --resume_from_checkpoint {checkpoint}"
    raise TrainingInterrupted(
        f"stopped at step {run.state.global_step} of {run.state.max_train_steps}; state saved in {checkpoint}, "
        f"current LoRA in {run.settings.run_dir / 'interrupted_model'}.\nResume with:\n  python {command}",
        stop.signal_number or 15)


# ----------------------------------------------------------------------------- stops on a signal


logger = logging.getLogger(__name__)


class StopRequest:
    """Installs the handlers on enter and restores the previous ones on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal_number: int | None = None
        self._previous: dict = {}

    def _handle(self, signal_number, frame) -> None:
        if self.signal_number is not None:
            logger.warning("Second signal: exiting now without saving.")
            signal.signal(signal_number, signal.SIG_DFL)
            os.kill(os.getpid(), signal_number)
            return
        self.signal_number = signal_number
        logger.warning("%s received: finishing this step, saving a resumable state, then stopping "
                       "(send it again to exit at once).", signal.Signals(signal_number).name)

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    def __enter__(self) -> "StopRequest":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- step losses


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
    reads: int = 0  # host transfers so far (what the test counts)

    def add(self, epoch: int, step: int, learning_rate: float, loss: torch.Tensor, skipped: torch.Tensor) -> None:
        self.pending.append((epoch, step, learning_rate, loss.detach().float().reshape(()),
                             skipped.detach().float().reshape(())))

    def due(self, step: int) -> bool:
        return bool(self.pending) and (self.read_every <= 1 or step % self.read_every == 0)

    def read(self) -> list[StepRecord]:
        if not self.pending:
            return []
        values = torch.stack([torch.stack([loss, skipped]) for *_, loss, skipped in self.pending]).cpu().tolist()
        self.reads += 1
        records = [StepRecord(epoch, step, lr, loss, bool(skipped))
                   for (epoch, step, lr, _, _), (loss, skipped) in zip(self.pending, values)]
        self.pending = []
        return records


def read_interval(device_type: str) -> int:
    """Steps between host reads of the losses: every step on a CPU (a read costs nothing there)."""
    return 1 if device_type == "cpu" else 25
