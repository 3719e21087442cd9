"""Stopping a training on SIGINT/SIGTERM: the handlers (``StopRequest``), the processes agreeing to stop at the
same step (``all_stop``), and the stop itself (``stop_runs``): a resumable checkpoint and the current LoRA in
interrupted_model/ of each run (a pack's too), then ``TrainingInterrupted`` with the command that resumes."""

from __future__ import annotations

import logging
import os
import signal

import torch

from utils.core.errors import TrainingInterrupted
from utils.training.checkpoints import save_checkpoint
from utils.training.experiment_config import command_line
from utils.training.lora_folders import save_model_folder
from utils.training.pack import state_writer
from utils.training.run import Run

logger = logging.getLogger(__name__)


class StopRequest:
    """Installs the handlers on enter and restores the previous ones on exit; ``requested`` turns True at the
    first signal (a plain attribute: the loop reads it after every step)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signal_number: int | None = None
        self._previous: dict = {}

    def _handle(self, signal_number, frame) -> None:
        if self.requested:
            logger.warning("Second signal: exiting now without saving.")
            signal.signal(signal_number, signal.SIG_DFL)
            os.kill(os.getpid(), signal_number)
            return
        self.signal_number, self.requested = signal_number, True
        logger.warning("%s received: finishing this step, saving a resumable state, then stopping "
                       "(send it again to exit at once).", signal.Signals(signal_number).name)

    def __enter__(self) -> "StopRequest":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def all_stop(stop: StopRequest, accelerator) -> bool:
    """With several processes: True on every process if any process got a stop signal (so all stop at the
    same step)."""
    flag = torch.tensor([1.0 if stop.requested else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def stop_runs(pack: list[Run], stop: StopRequest) -> None:
    """Save each run's resumable state and current LoRA, then end with a message on how to resume."""
    saved = []
    for run in pack:
        layout, state = run.settings.layout, run.state
        checkpoint = save_checkpoint(run.accelerator, layout, state, run.adapter.ema,
                                     run.settings.args.checkpoints_total_limit, state_writer(run))
        save_model_folder(run.accelerator, layout.interrupted_model, run.models, run.settings, state,
                          {"step": state.global_step}, ema=run.adapter.ema, adapter_name=run.adapter.name)
        saved.append((checkpoint, layout.interrupted_model))
    pack[0].accelerator.end_training()
    state = pack[0].state
    command = command_line()
    if len(pack) == 1 and "--resume_from_checkpoint" not in command:
        command += f" --resume_from_checkpoint {saved[0][0]}"
    places = "; ".join(f"state saved in {checkpoint}, current LoRA in {model}" for checkpoint, model in saved)
    raise TrainingInterrupted(
        f"stopped at step {state.global_step} of {state.max_train_steps}; {places}.\nResume with:\n  python {command}",
        stop.signal_number or 15)
