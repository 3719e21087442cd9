"""The training loop: epochs of optimizer steps, the loss log as it goes, the non-finite guard, resumable
checkpoints every --checkpointing_steps and a clean stop on a signal."""

from __future__ import annotations

import logging
import math

import torch
from tqdm.auto import tqdm

from utils.core.errors import TrainingInterrupted
from utils.training.checkpoints import checkpoints_of, save_checkpoint
from utils.training.ema import weights_of
from utils.training.epochs import end_of_epoch
from utils.training.interrupts import StopRequest
from utils.training.evaluation import evaluate, evaluate_base
from utils.training.experiment_config import command_line
from utils.training.lora_folders import save_model_folder
from utils.training.loss import denoising_loss, sample_noise
from utils.training.settings import RunSettings, TrainingError
from utils.training.setup import Run
from utils.training.timesteps import sample_timesteps
from utils.training.step_losses import StepLosses, StepRecord, read_interval

logger = logging.getLogger(__name__)


def train_loop(run: Run, stop: StopRequest) -> None:
    """Epochs are 0-based, as in the original. A step that ends an epoch is checkpointed (or stopped at)
    only after the epoch's own work (log row, best_model, checkpoint_epoch_N): a resumable state then
    never lies between an epoch's last step and its end-of-epoch files.

    Step losses stay on the device and are read every few steps (``StepLosses``), and wherever the loop
    needs them: at an epoch's end, before a checkpoint, on a stop."""
    state = run.state
    losses = StepLosses(read_interval(run.accelerator.device.type))
    progress = tqdm(total=state.max_train_steps, initial=state.global_step, desc="Training",
                    disable=not run.accelerator.is_local_main_process)
    for epoch in range(state.global_step // state.steps_per_epoch, run.num_epochs):
        if state.global_step >= state.max_train_steps:  # resumed from the last step's checkpoint
            break
        deferred = _run_epoch(run, stop, epoch, losses, progress)
        record_losses(run, losses, progress)
        eval_loss = None
        if run.eval_set.plan.after_epoch(epoch, run.num_epochs - 1):
            with weights_of(run.ema):
                eval_loss = evaluate(run.unet, run.components.noise_scheduler, run.eval_set)
        end_of_epoch(run, epoch, run.lr_scheduler.get_last_lr()[0], eval_loss,
                     select_by="eval_loss" if run.eval_set.batches else "train_loss")
        if deferred:
            checkpoint_or_stop(run, stop, progress, losses)
        if state.global_step >= state.max_train_steps:
            break
    progress.close()
    if state.initial_eval_loss is None and run.eval_set.batches:
        state.initial_eval_loss = evaluate_base(run)
        logger.info("Fixed-noise validation loss: %.5f before training, %s after", state.initial_eval_loss,
                    f"{state.last_eval_loss:.5f}" if state.last_eval_loss is not None else "n/a")


def _run_epoch(run: Run, stop: StopRequest, epoch: int, losses: StepLosses, progress) -> bool:
    """The optimizer steps of epoch ``epoch`` (from where a resumed run stands). Returns True when the
    epoch's last step still waits for its checkpoint or stop (after the end-of-epoch work)."""
    state, accelerator = run.state, run.accelerator
    for model in run.models:
        model.train()
    skip = (state.global_step - epoch * state.steps_per_epoch) * run.settings.args.gradient_accumulation_steps
    loader = accelerator.skip_first_batches(run.dataloader, skip) if skip > 0 else run.dataloader
    if skip == 0:
        state.epoch_losses = []  # on a mid-epoch resume they come from the checkpoint
    run.sampler.use_epoch(epoch)
    epoch_end = min((epoch + 1) * state.steps_per_epoch, state.max_train_steps)
    deferred = False
    window: list[torch.Tensor] = []
    window_images: list[int] = []
    for loader_batch in loader:
        loss, skipped = train_micro_step(run, loader_batch)
        window.append(loss)
        window_images += loader_batch["index"].tolist()
        if not accelerator.sync_gradients:
            continue
        local_loss = torch.stack(window).mean()
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("process %d step %d images %s loss %.6f", accelerator.process_index,
                         state.global_step + 1, window_images, local_loss.item())
        window, window_images = [], []
        state.global_step += 1
        if run.ema is not None:
            run.ema.update(state.global_step)
        run.timeline.step_done()
        losses.add(epoch, state.global_step, run.lr_scheduler.get_last_lr()[0],
                   accelerator.gather(local_loss[None]).mean(), skipped)
        progress.update(1)
        if losses.due(state.global_step):
            record_losses(run, losses, progress)
        deferred = state.global_step >= epoch_end
        if not deferred:
            checkpoint_or_stop(run, stop, progress, losses)
        if state.global_step >= state.max_train_steps:
            break
    return deferred


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


def train_micro_step(run: Run, loader_batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of one batch; at an accumulation boundary, the optimizer step, skipped when
    the loss or the gradient is not finite. Returns (loss, skipped) as device tensors: nothing here waits
    for the device, unless the optimizer cannot skip a step by itself (see skip_on_device)."""
    settings, accelerator, scheduler = run.settings, run.accelerator, run.components.noise_scheduler
    skipped = torch.zeros((), dtype=torch.bool, device=accelerator.device)
    with accelerator.accumulate(*run.models):
        batch = run.batch_maker(loader_batch)
        noise = sample_noise(batch.latents, settings.args.noise_offset)
        timesteps = sample_timesteps(settings.args, scheduler.config.num_train_timesteps, batch.latents.shape[0],
                                     batch.latents.device)
        loss = denoising_loss(run.unet, scheduler, batch, noise, timesteps, settings.args.snr_gamma)
        accelerator.backward(loss)
        found_inf = None
        if accelerator.sync_gradients:
            max_norm = settings.args.max_grad_norm if settings.args.max_grad_norm > 0 else math.inf
            norm = accelerator.clip_grad_norm_(run.params, max_norm)
            skipped = nonfinite_step(run, loss, norm)
            found_inf = skip_on_device(run, skipped)
        run.optimizer.step()
        if found_inf is not None:
            del run.optimizer.optimizer.found_inf, run.optimizer.optimizer.grad_scale
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss.detach(), skipped


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
