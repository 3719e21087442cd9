"""The end-of-epoch policy: after each epoch its row in logs/training_log.csv, best_model/ and
checkpoint_epoch_{epoch}/, then the loss plot and validation images; at the end final_model/ (and an
interrupted_model/ left by a stop before a resume goes).

They read the run (``run.Run``) and of its flags --save_steps, --logging_dir, --validation_prompt,
--validation_prompts_file and --validation_epochs."""

from __future__ import annotations

import logging
import math
import shutil

from utils.training.adapters import weights_of
from utils.training.lora_folders import save_model_folder
from utils.training.loss_log import log_timestamp, plot_losses
from utils.training.pack import own_adapter, run_label

logger = logging.getLogger(__name__)


def end_of_epoch(run, epoch: int, learning_rate: float, eval_loss: float | None, select_by: str = "eval_loss") -> None:
    """After epoch ``epoch`` (0-based) of ``run`` (a training's ``Run``).

    best_model: with ``select_by`` 'eval_loss' only epochs that measured the fixed-noise loss compete;
    with 'train_loss' (evaluation off), the lowest mean training loss."""
    state = run.state
    losses = state.epoch_losses
    train_loss = sum(losses) / len(losses) if losses else math.nan
    if eval_loss is not None:
        state.last_eval_loss = eval_loss
        run.accelerator.log({"eval_loss": eval_loss}, step=state.global_step)
    logger.info("epoch %d%s: mean train loss %.5f, fixed-noise eval loss %s", epoch, run_label(run), train_loss,
                f"{eval_loss:.5f}" if eval_loss is not None else "n/a")
    run.epoch_log.append(epoch, state.global_step, train_loss, learning_rate)
    info = {"epoch": epoch, "loss": train_loss, "learning_rate": learning_rate, "timestamp": log_timestamp(),
            "step": state.global_step, "train_loss": train_loss, "eval_loss": eval_loss}
    metric = (eval_loss if eval_loss is not None else math.nan) if select_by == "eval_loss" else train_loss
    _best_model(run, epoch, metric, {**info, "selected_by": select_by})
    _epoch_checkpoint(run, epoch, info)
    _validation(run, epoch)


def _best_model(run, epoch: int, metric: float, info: dict) -> None:
    """best_model/: replaced whenever this epoch's metric is the lowest so far."""
    state = run.state
    if math.isfinite(metric) and metric < state.best_metric:
        state.best_metric, state.best_epoch = metric, epoch
        save_model_folder(run.accelerator, run.settings.layout.best_model, run.models, run.settings, state, info,
                          ema=run.adapter.ema, adapter_name=run.adapter.name)


def _epoch_checkpoint(run, epoch: int, info: dict) -> None:
    """checkpoint_epoch_{epoch}/ every --save_steps epochs (0-based epoch in the name), and the loss plot."""
    settings = run.settings
    if not settings.args.save_steps or (epoch + 1) % settings.args.save_steps:
        return
    info = {"epoch": epoch, "global_step": run.state.global_step, **info}  # the original's key order
    save_model_folder(run.accelerator, settings.layout.epoch_model(epoch), run.models, settings, run.state, info,
                      ema=run.adapter.ema, adapter_name=run.adapter.name)
    if run.accelerator.is_main_process:
        plot_losses(settings.layout)


def _validation(run, epoch: int) -> None:
    """Validation images every --validation_epochs epochs, when there are validation prompts."""
    settings = run.settings
    if (settings.args.validation_prompt or settings.args.validation_prompts_file) and (epoch + 1) % settings.args.validation_epochs == 0:
        from utils.training.validation import log_validation_images
        with weights_of(run.adapter.ema), own_adapter(run):
            log_validation_images(run.accelerator, settings.args, settings.run_dir, run.components, run.models,
                                  epoch + 1, run.state.global_step)


def finish(run) -> None:
    """final_model/ (with the run's summary) and the last loss plot. A resumed run that had been stopped
    leaves no interrupted_model/ beside its final_model/: final_model/ holds the later weights."""
    accelerator, state, layout = run.accelerator, run.state, run.settings.layout
    accelerator.wait_for_everyone()
    save_model_folder(accelerator, layout.final_model, run.models, run.settings, state,
                      {"step": state.global_step, "initial_eval_loss": state.initial_eval_loss,
                       "final_eval_loss": state.last_eval_loss, "best_epoch": state.best_epoch,
                       "skipped_nonfinite_steps": state.skipped_steps}, ema=run.adapter.ema,
                      adapter_name=run.adapter.name)
    if accelerator.is_main_process:
        if layout.interrupted_model.is_dir():
            shutil.rmtree(layout.interrupted_model)
            logger.info("Removed %s: the run went on to %s", layout.interrupted_model, layout.final_model)
        plot_losses(layout)
        logger.info("Finished: %s", layout.final_model)
