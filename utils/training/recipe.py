"""The LoRA training behind train_sdxl_lora.py, in the order it runs; read it top to bottom.

    train       flag checks -> training examples -> settings -> set_up -> train_loop -> finish_run
    set_up      accelerator (device, seed) -> SDXL, frozen -> adapters -> buckets -> fixed-noise evaluation
                set -> batch maker and caches -> gradient checkpointing -> data loader -> optimizer and
                schedule -> accelerate.prepare -> resume -> experiment_config.json, trackers, loss logs
    train_loop  per epoch: run_epoch (per batch, train_step: batch -> noise -> timesteps -> forward -> loss
                -> backward -> optimizer step; then the step's logging, checkpoint or stop), the fixed-noise
                loss, the end-of-epoch files
    finish_run  final_model/, logs/timings.json, the Hub upload

The parts it calls each do one thing in their own module: checks, adapters, optimizer, memory (gradient
checkpointing), batches, caching, model_inputs, loss, timesteps, evaluation, guards (non-finite steps,
checkpoints, stops), epochs (end-of-epoch files), checkpoints, experiment_config, loss_log.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from utils.core.sdxl import DTYPES, load_components, resolve_mixed_precision
from utils.data.listing import load_training_examples
from utils.data.records import Example
from utils.data.regularisation import balance, load_reg_examples
from utils.training.adapters import AdapterEMA, inject_lora, weights_of
from utils.training.batches import assign_buckets, make_loader
from utils.training.caching import fill_caches
from utils.training.checkpoints import register_checkpoint_hooks, resume
from utils.training.checks import check_args, trackers
from utils.training.epochs import end_of_epoch, finish
from utils.training.evaluation import EvalPlan, build_eval_set, evaluate, evaluate_base, evaluation_plan, split_examples
from utils.training.experiment_config import dataset_info, dataset_line, tracker_config, write_experiment_config
from utils.training.guards import (
    StepLosses,
    StopRequest,
    checkpoint_or_stop,
    nonfinite_step,
    out_of_memory_message,
    read_interval,
    record_losses,
    skip_on_device,
)
from utils.training.loss import denoising_loss, sample_noise, sample_timesteps
from utils.training.loss_log import open_logs
from utils.training.memory import set_gradient_checkpointing
from utils.training.model_inputs import BatchMaker
from utils.training.optimizer import loraplus_groups, make_optimizer, make_scheduler
from utils.training.run import Run
from utils.training.settings import RunSettings, TrainingError, distributed_state
from utils.training.state import TrainState
from utils.training.timeline import Timeline

logger = logging.getLogger(__name__)

EVAL_IMAGES = 8  # training images used for the fixed-noise loss when nothing is held out


def train(args: argparse.Namespace) -> Path:
    """Run a full training; return the run directory."""
    timeline = Timeline()
    check_args(args)
    with timeline.phase("dataset check"):
        main_process = distributed_state().is_main_process  # one dataset report per launch
        examples, dataset_type = load_training_examples(args, report_here=main_process)
        reg_examples = load_reg_examples(args, report_here=main_process) if args.reg_data_dir else []
    settings = RunSettings.make(args, dataset_type)
    run = set_up(settings, examples, timeline, reg_examples)
    try:
        with StopRequest() as stop:
            train_loop(run, stop)
    except torch.cuda.OutOfMemoryError as error:
        raise TrainingError(out_of_memory_message(settings)) from error
    finish_run(run)
    return settings.run_dir


# ----------------------------------------------------------------------------- set-up


def set_up(settings: RunSettings, examples: list[Example], timeline: Timeline | None = None,
           reg_examples: list[Example] = ()) -> Run:
    """Everything the loop needs, built in dependency order; ``reg_examples`` (--reg_data_dir) join the
    training items after kohya's balancing. Each phase is timed (logged with the first step); nothing the
    first step does not need runs before it (the loss before training is measured at the end)."""
    args, timeline = settings.args, timeline or Timeline()
    with timeline.phase("imports"):
        import accelerate  # noqa: F401  (timed here; used below)
        import diffusers.optimization  # noqa: F401
    train_examples, held_out = split_examples(examples, args.validation_split, args.seed)
    mixed_precision = resolve_mixed_precision(args.mixed_precision)
    weight_dtype = DTYPES[mixed_precision]
    accelerator = make_accelerator(settings, mixed_precision)
    device = accelerator.device
    with timeline.phase("model loading"):
        components = load_models(args, device, weight_dtype)
    with timeline.phase("LoRA"):
        params = inject_lora(components, args)
    items = assign_buckets(train_examples + balance(train_examples, list(reg_examples)), args.resolution,
                           not args.no_buckets, args.seed)
    plan = evaluation_plan(args, sum(item.example.repeats for item in items), accelerator.num_processes)
    logger.info("Evaluation: %s", plan.describe())
    with timeline.phase("evaluation set"):
        eval_items = assign_buckets(held_out or train_examples[:EVAL_IMAGES], args.resolution, False, args.seed)
        eval_set = build_eval_set(components, eval_items, plan, args, weight_dtype, device)
    batch_maker = BatchMaker(components, items, args, weight_dtype, device)
    if args.cache:
        with timeline.phase("caching"):
            fill_caches(batch_maker, items, args, accelerator)
    gradient_checkpointing = set_gradient_checkpointing(components, args, device, weight_dtype)
    sampler, dataloader = make_loader(args, items)
    groups = loraplus_groups([components.unet, *components.text_encoders], params, args, settings.learning_rate)
    optimizer = make_optimizer(args, groups, settings.learning_rate)
    steps_per_epoch, max_train_steps = count_steps(args, len(dataloader), accelerator.num_processes)
    lr_scheduler = make_scheduler(args, optimizer, max_train_steps, accelerator.num_processes)
    with timeline.phase("accelerate prepare"):
        models, optimizer, dataloader, lr_scheduler = prepare(accelerator, args, components, optimizer, dataloader,
                                                              lr_scheduler)
    run = Run(settings, accelerator, components, models, params, optimizer, lr_scheduler, dataloader, sampler,
              batch_maker, eval_set, TrainState(max_train_steps=max_train_steps, steps_per_epoch=steps_per_epoch),
              math.ceil(max_train_steps / steps_per_epoch), timeline=timeline,
              gradient_checkpointing=gradient_checkpointing,
              ema=AdapterEMA(params, args.ema_decay, args.ema_update_every) if args.use_ema else None)
    start(run, dataset_info(items, len(reg_examples)), held_out, plan, mixed_precision)
    return run


def make_accelerator(settings: RunSettings, mixed_precision: str):
    """The Accelerator, logging into the run folder; the seed and TF32 set."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    args, run_dir = settings.args, settings.run_dir
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=trackers(args.report_to) or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / args.logging_dir)),
    )
    logger.info("Run directory: %s", run_dir)
    set_seed(args.seed)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def load_models(args: argparse.Namespace, device: torch.device, weight_dtype: torch.dtype):
    """SDXL's components loaded frozen onto the device (the scheduler with --prediction_type)."""
    components = load_components(args.pretrained_model_name_or_path, args.revision, args.variant, weight_dtype,
                                 args.pretrained_vae_model_name_or_path, args.allow_pickle, args.model_config)
    if args.prediction_type:
        components.noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    for module in [components.unet, components.vae, *components.text_encoders]:
        module.to(device)
    return components


def count_steps(args: argparse.Namespace, num_batches: int, num_processes: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps): batches shared by the processes, then accumulated."""
    steps_per_epoch = math.ceil(math.ceil(num_batches / num_processes) / args.gradient_accumulation_steps)
    return steps_per_epoch, args.max_train_steps or args.num_train_epochs * steps_per_epoch


def prepare(accelerator, args: argparse.Namespace, components, optimizer, dataloader, lr_scheduler):
    """accelerate.prepare of the trained models and the training objects; checkpoints keep only LoRA."""
    trained = [components.unet] + (components.text_encoders if args.train_text_encoder else [])
    prepared = accelerator.prepare(*trained, optimizer, dataloader, lr_scheduler)
    models, (optimizer, dataloader, lr_scheduler) = list(prepared[:len(trained)]), prepared[len(trained):]
    components.unet = models[0]
    if args.train_text_encoder:
        components.text_encoders = models[1:]
    register_checkpoint_hooks(accelerator)
    return models, optimizer, dataloader, lr_scheduler


def start(run: Run, info: dict, held_out: list, plan: EvalPlan, mixed_precision: str) -> None:
    """The run's starting state (resumed if asked), experiment_config.json, trackers and loss logs."""
    settings, args, accelerator, state = run.settings, run.settings.args, run.accelerator, run.state
    state.speed_info = {"resolved_gradient_checkpointing": run.gradient_checkpointing,
                        "eval_loss_plan": {"every_epochs": plan.every_epochs, "samples": plan.samples,
                                           "measurements": plan.measurements, "share_of_training": plan.share}}
    state.dataset_info = info
    if args.resume_from_checkpoint:
        with run.timeline.phase("resume"):
            resume(accelerator, settings, state, run.ema)
    write_experiment_config(accelerator, settings, state, info["num_train_images"], len(held_out), mixed_precision)
    if accelerator.is_main_process and trackers(args.report_to):
        accelerator.init_trackers("sdxl_lora", config=tracker_config(settings))
    run.epoch_log, run.step_log = open_logs(settings.run_dir, args.logging_dir, accelerator.is_main_process,
                                            state.global_step)
    if accelerator.is_main_process:  # the dataset summary once per launch
        logger.info("%s, batch %d x %d accumulation x %d processes",
                    dataset_line(info, len(held_out), state.max_train_steps, args.prior_loss_weight),
                    args.train_batch_size, args.gradient_accumulation_steps, accelerator.num_processes)


# ----------------------------------------------------------------------------- the loop


def train_loop(run: Run, stop: StopRequest) -> None:
    """Epochs are 0-based. A step that ends an epoch is checkpointed (or stopped at) only after the epoch's
    own work (log row, best_model, checkpoint_epoch_N): a resumable state then never lies between an
    epoch's last step and its end-of-epoch files.

    Step losses stay on the device and are read every few steps (``StepLosses``), and wherever the loop
    needs them: at an epoch's end, before a checkpoint, on a stop."""
    state = run.state
    losses = StepLosses(read_interval(run.accelerator.device.type))
    progress = tqdm(total=state.max_train_steps, initial=state.global_step, desc="Training",
                    disable=not run.accelerator.is_local_main_process)
    for epoch in range(state.global_step // state.steps_per_epoch, run.num_epochs):
        if state.global_step >= state.max_train_steps:  # resumed from the last step's checkpoint
            break
        deferred = run_epoch(run, stop, epoch, losses, progress)
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


def run_epoch(run: Run, stop: StopRequest, epoch: int, losses: StepLosses, progress) -> bool:
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
        loss, skipped = train_step(run, loader_batch)
        window.append(loss)
        window_images += loader_batch["index"].tolist()
        if not accelerator.sync_gradients:  # accumulating: no optimizer step yet
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


def train_step(run: Run, loader_batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of one batch; at an accumulation boundary, the optimizer step, skipped when
    the loss or the gradient is not finite. Returns (loss, skipped) as device tensors: nothing here waits
    for the device, unless the optimizer cannot skip a step by itself (see guards.skip_on_device)."""
    args, accelerator, scheduler = run.settings.args, run.accelerator, run.components.noise_scheduler
    skipped = torch.zeros((), dtype=torch.bool, device=accelerator.device)
    with accelerator.accumulate(*run.models):
        batch = run.batch_maker(loader_batch)  # latents, text embeddings, time ids (cached or encoded now)
        noise = sample_noise(batch.latents, args.noise_offset)
        timesteps = sample_timesteps(args, scheduler.config.num_train_timesteps, batch.latents.shape[0],
                                     batch.latents.device)
        loss = denoising_loss(run.unet, scheduler, batch, noise, timesteps, args.snr_gamma)
        accelerator.backward(loss)
        found_inf = None
        if accelerator.sync_gradients:
            norm = accelerator.clip_grad_norm_(run.params, args.max_grad_norm if args.max_grad_norm > 0 else math.inf)
            skipped = nonfinite_step(run, loss, norm)
            found_inf = skip_on_device(run, skipped)
        run.optimizer.step()
        if found_inf is not None:
            del run.optimizer.optimizer.found_inf, run.optimizer.optimizer.grad_scale
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss.detach(), skipped


# ----------------------------------------------------------------------------- the end


def finish_run(run: Run) -> None:
    """final_model/ and the last loss plot, logs/timings.json, the trackers closed, the Hub upload."""
    settings, accelerator = run.settings, run.accelerator
    finish(run)
    if accelerator.is_main_process:
        run.timeline.write(settings.run_dir / settings.args.logging_dir / "timings.json")
    accelerator.end_training()
    if settings.args.push_to_hub and accelerator.is_main_process:
        from utils.hub.publish import push_run_to_hub
        push_run_to_hub(settings.run_dir, settings.args.hub_model_id, private=settings.args.hub_private)
