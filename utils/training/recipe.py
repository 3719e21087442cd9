"""The LoRA training behind train_sdxl_lora.py, in the order it runs; read it top to bottom.

    train       flag checks -> training examples -> the run folder -> set_up -> train_loop -> finish_run
    set_up      accelerator (device, seed) -> SDXL, frozen -> adapters -> buckets and the data loader -> steps
                per epoch -> fixed-noise evaluation set -> batch maker and caches -> gradient checkpointing ->
                optimizer and schedule -> accelerate.prepare -> resume -> experiment_config.json, trackers,
                loss logs -> the Run, whole
    train_loop  per epoch: run_epoch (per batch, train_step: batch -> noise -> timesteps -> forward -> loss
                -> backward -> clip -> non-finite check -> optimizer step -> schedule -> zero grad; then the
                step's logging, checkpoint or stop), the fixed-noise loss, the end-of-epoch files
    finish_run  final_model/, logs/timings.json, the Hub upload

A step runs through this file, model_inputs (the batch), loss (noise, timesteps, the denoising loss),
loss_log (the step losses, buffered and written), checkpoints and the run's layout. The parts set-up
calls each do one thing in their own module: checks, adapters, optimizer, memory (gradient
checkpointing), batches, caching, evaluation, epochs (end-of-epoch files), experiment_config, stop (signals).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from utils.core.atomic import write_text
from utils.core.errors import TrainingError
from utils.core.sdxl import DTYPES, SDXLComponents, load_components, resolve_mixed_precision
from utils.data.listing import load_training_examples
from utils.data.records import CACHE_FOLDER, Example
from utils.data.regularisation import balance, load_reg_examples
from utils.training.adapters import AdapterEMA, inject_lora, weights_of
from utils.training.batches import assign_buckets, make_loader
from utils.training.caching import fill_caches
from utils.training.checkpoints import checkpoints_of, register_checkpoint_hooks, resume, save_checkpoint
from utils.training.checks import check_args, trackers
from utils.training.epochs import end_of_epoch, finish
from utils.training.evaluation import build_eval_set, evaluate, evaluate_base, evaluation_plan, split_examples
from utils.training.experiment_config import dataset_info, dataset_line, tracker_config, write_experiment_config
from utils.training.loss import denoising_loss, sample_noise, sample_timesteps
from utils.training.loss_log import StepLosses, open_logs, read_interval
from utils.training.memory import set_gradient_checkpointing
from utils.training.model_inputs import BatchMaker
from utils.training.optimizer import loraplus_groups, make_optimizer, make_scheduler
from utils.training.run import Adapter, Run, RunSettings, Timeline, TrainState, distributed_state, open_run
from utils.training.stop import StopRequest, all_stop, stop_run

logger = logging.getLogger(__name__)

EVAL_IMAGES = 8  # training images used for the fixed-noise loss when nothing is held out


def train(args: argparse.Namespace) -> Path:
    """Run a full training; return the run directory."""
    timeline = Timeline()
    check_args(args)
    with timeline.phase("dataset check"):
        main_process = distributed_state().is_main_process  # one dataset report per launch
        examples, dataset_type = training_examples(args, report_here=main_process)
        reg_examples = (load_reg_examples(args, main_process, cache_dir=Path(args.output_dir) / CACHE_FOLDER)
                        if args.reg_data_dir else [])
    settings = open_run(args, dataset_type)
    if args.run_dir_file and main_process:  # the sweep's record of where this run trains, before any other work
        write_text(args.run_dir_file, f"{settings.run_dir.resolve()}\n")
    run = set_up(settings, examples, timeline, reg_examples)
    try:
        with StopRequest() as stop:
            train_loop(run, stop)
    except torch.cuda.OutOfMemoryError as error:
        raise TrainingError(out_of_memory_message(settings)) from error
    finish_run(run)
    return settings.run_dir


def training_examples(args: argparse.Namespace, report_here: bool = True) -> tuple[list[Example], str]:
    """The checked training examples and the dataset type read, with the trainer's flags: the loss masks with
    --masked_loss; images of a `datasets` source written to --dataset_cache_dir, else {output_dir}/.dataset_cache."""
    return load_training_examples(args, report_here, masks=args.masked_loss,
                                  cache_dir=args.dataset_cache_dir or Path(args.output_dir) / CACHE_FOLDER)


def out_of_memory_message(settings: RunSettings) -> str:
    checkpoints = checkpoints_of(settings.run_dir)
    last = f" The last checkpoint, {checkpoints[-1]}, is intact." if checkpoints else ""
    return (f"out of GPU memory at --resolution {settings.args.resolution}, --train_batch_size "
            f"{settings.args.train_batch_size}. Ways to fit: a smaller --train_batch_size (with "
            "--gradient_accumulation_steps to keep the effective batch), a lower --resolution, "
            "--gradient_checkpointing, --optimizer adamw8bit, --mixed_precision bf16 or fp16, keeping --cache on "
            f"(the VAE and text encoders then leave the GPU), or a smaller --lora_rank.{last}")


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
    sampler, dataloader = make_loader(args, items)
    steps_per_epoch, max_train_steps = count_steps(args, len(dataloader), accelerator.num_processes)
    plan = evaluation_plan(args, steps_per_epoch, max_train_steps, accelerator.num_processes)
    logger.info("Evaluation: %s", plan.describe())
    with timeline.phase("evaluation set"):
        eval_items = assign_buckets(held_out or train_examples[:EVAL_IMAGES], args.resolution, False, args.seed)
        eval_set = build_eval_set(components, eval_items, plan, args, weight_dtype, device)
    batch_maker = BatchMaker(components, items, args, weight_dtype, device)
    if args.cache:
        with timeline.phase("caching"):
            fill_caches(batch_maker, items, args, accelerator)
    gradient_checkpointing = set_gradient_checkpointing(components, args, device, weight_dtype)
    groups = loraplus_groups([components.unet, *components.text_encoders], params, args, settings.learning_rate)
    optimizer = make_optimizer(args, groups, settings.learning_rate)
    lr_scheduler = make_scheduler(args, optimizer, max_train_steps, accelerator.num_processes)
    with timeline.phase("accelerate prepare"):
        models, optimizer, dataloader, lr_scheduler = prepare(accelerator, args, components, optimizer, dataloader,
                                                              lr_scheduler)
    info = dataset_info(items, len(reg_examples))
    state = TrainState(max_train_steps=max_train_steps, steps_per_epoch=steps_per_epoch, dataset_info=info,
                       speed_info={"resolved_gradient_checkpointing": gradient_checkpointing,
                                   "eval_loss_plan": {"every_epochs": plan.every_epochs, "samples": plan.samples,
                                                      "measurements": plan.measurements,
                                                      "share_of_training": plan.share}})
    ema = AdapterEMA(params, args.ema_decay, args.ema_update_every) if args.use_ema else None
    if settings.resume_checkpoint:
        with timeline.phase("resume"):
            resume(accelerator, settings.resume_checkpoint, state, ema)
    write_experiment_config(accelerator, settings, state, info["num_train_images"], len(held_out), mixed_precision)
    if accelerator.is_main_process and trackers(args.report_to):
        accelerator.init_trackers("sdxl_lora", config=tracker_config(settings))
    epoch_log, step_log = open_logs(settings.layout, accelerator.is_main_process, state.global_step)
    if accelerator.is_main_process:  # the dataset summary once per launch
        logger.info("%s, batch %d x %d accumulation x %d processes",
                    dataset_line(info, len(held_out), state.max_train_steps, args.prior_loss_weight),
                    args.train_batch_size, args.gradient_accumulation_steps, accelerator.num_processes)
    adapter = Adapter(params=params, optimizer=optimizer, lr_scheduler=lr_scheduler,
                      max_grad_norm=args.max_grad_norm if args.max_grad_norm > 0 else math.inf,
                      skips_on_device=accelerator.scaler is None and isinstance(optimizer.optimizer, torch.optim.AdamW)
                      and bool(optimizer.optimizer.defaults.get("fused")),
                      max_nonfinite_steps=args.max_nonfinite_steps, ema=ema)
    return Run(settings=settings, accelerator=accelerator, components=components, models=models, adapter=adapter,
               dataloader=dataloader, sampler=sampler, batch_maker=batch_maker, eval_set=eval_set, state=state,
               num_epochs=math.ceil(max_train_steps / steps_per_epoch), timeline=timeline,
               gradient_checkpointing=gradient_checkpointing, epoch_log=epoch_log, step_log=step_log)


def make_accelerator(settings: RunSettings, mixed_precision: str):
    """The Accelerator, logging into the run folder; the seed and TF32 set."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    args, layout = settings.args, settings.layout
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=trackers(args.report_to) or None,
        project_config=ProjectConfiguration(project_dir=str(layout.root), logging_dir=str(layout.logs)),
    )
    logger.info("Run directory: %s", layout.root)
    set_seed(args.seed)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def load_models(args: argparse.Namespace, device: torch.device, weight_dtype: torch.dtype) -> SDXLComponents:
    """SDXL's components loaded frozen onto the device (the scheduler with --prediction_type)."""
    components = load_components(args.pretrained_model_name_or_path, args.revision, args.variant, weight_dtype,
                                 args.pretrained_vae_model_name_or_path, args.allow_pickle, args.model_config)
    if args.prediction_type:
        components.noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    for module in [components.unet, components.vae, *components.text_encoders]:
        module.to(device)
    return components


def count_steps(args: argparse.Namespace, num_batches: int, num_processes: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps): the loader's batches (bucket by bucket) shared by the
    processes, then accumulated. Computed once; the evaluation plan and the state take them from here."""
    steps_per_epoch = math.ceil(math.ceil(num_batches / num_processes) / args.gradient_accumulation_steps)
    return steps_per_epoch, args.max_train_steps or args.num_train_epochs * steps_per_epoch


def prepare(accelerator, args: argparse.Namespace, components: SDXLComponents, optimizer, dataloader, lr_scheduler):
    """accelerate.prepare of the trained models and the training objects; the prepared models replace the
    plain ones in ``components`` (one handle to each). Checkpoints keep only LoRA."""
    trained = [components.unet] + (components.text_encoders if args.train_text_encoder else [])
    prepared = accelerator.prepare(*trained, optimizer, dataloader, lr_scheduler)
    models, (optimizer, dataloader, lr_scheduler) = list(prepared[:len(trained)]), prepared[len(trained):]
    components.unet = models[0]
    if args.train_text_encoder:
        components.text_encoders = models[1:]
    register_checkpoint_hooks(accelerator)
    return models, optimizer, dataloader, lr_scheduler


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
            with weights_of(run.adapter.ema):
                eval_loss = evaluate(run.components.unet, run.components.noise_scheduler, run.eval_set)
        end_of_epoch(run, epoch, run.adapter.lr_scheduler.get_last_lr()[0], eval_loss,
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
    state, accelerator, adapter = run.state, run.accelerator, run.adapter
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
        if adapter.ema is not None:
            adapter.ema.update(state.global_step)
        run.timeline.step_marks.append(time.time())
        if len(run.timeline.step_marks) == 1:
            logger.info(run.timeline.describe_setup())
        losses.add(epoch, state.global_step, adapter.lr_scheduler.get_last_lr()[0],
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
    """One batch: forward and loss, backward; at an accumulation boundary the update of ``run.adapter``: clip,
    the non-finite check, the optimizer step (skipped when the loss or the gradient is not finite), the
    schedule, zero grad. Returns (loss, skipped) as device tensors: nothing here waits for the device, unless
    the optimizer cannot skip a step by itself (then the host reads the flag and drops the gradients).

    The skip on the device: the fused AdamW takes a ``found_inf`` tensor (the protocol torch's GradScaler
    uses) and leaves the weights, the moments and the step count alone; with a GradScaler (fp16) the scaler
    skips steps whose gradients are not finite, and an infinite gradient alone is its business (a non-finite
    loss never is)."""
    args, accelerator, adapter = run.settings.args, run.accelerator, run.adapter
    unet, scheduler = run.components.unet, run.components.noise_scheduler
    skipped = torch.zeros((), dtype=torch.bool, device=accelerator.device)
    with accelerator.accumulate(*run.models):
        batch = run.batch_maker(loader_batch)  # latents, text embeddings, time ids (cached or encoded now)
        noise = sample_noise(batch.latents, args.noise_offset)
        timesteps = sample_timesteps(args, scheduler.config.num_train_timesteps, batch.latents.shape[0],
                                     batch.latents.device)
        loss = denoising_loss(unet, scheduler, batch, noise, timesteps, args.snr_gamma)
        accelerator.backward(loss)
        inner = adapter.optimizer.optimizer
        if accelerator.sync_gradients:
            norm = accelerator.clip_grad_norm_(adapter.params, adapter.max_grad_norm)
            skipped = ~torch.isfinite(accelerator.gather(loss.detach()[None])).all()  # on any process
            if accelerator.scaler is None and norm is not None:
                skipped = skipped | ~torch.isfinite(torch.as_tensor(norm, device=skipped.device))
            if adapter.skips_on_device:
                inner.grad_scale, inner.found_inf = None, skipped.float()
            elif accelerator.scaler is None and bool(skipped):
                adapter.optimizer.zero_grad(set_to_none=True)  # parameters without gradients are not updated
        adapter.optimizer.step()
        if adapter.skips_on_device and accelerator.sync_gradients:
            del inner.found_inf, inner.grad_scale
        adapter.lr_scheduler.step()
        adapter.optimizer.zero_grad(set_to_none=True)
    return loss.detach(), skipped


def record_losses(run: Run, losses: StepLosses, progress) -> None:
    """Read the buffered step losses (one host transfer): log rows, epoch means, and the non-finite guard,
    which stops the run after --max_nonfinite_steps skipped steps in a row. The steps themselves were
    already skipped on the device, so reading this a few steps late changes no weight."""
    adapter = run.adapter
    for record in losses.read():
        if math.isfinite(record.loss):
            run.state.epoch_losses.append(record.loss)
        run.step_log.append(record.epoch, record.step, record.loss, record.learning_rate)
        run.accelerator.log({"train_loss": record.loss, "lr": record.learning_rate}, step=record.step)
        progress.set_postfix(loss=f"{record.loss:.4f}", lr=f"{record.learning_rate:.2e}")
        if not record.skipped:
            adapter.nonfinite_in_a_row = 0
            continue
        adapter.nonfinite_in_a_row += 1
        run.state.skipped_steps += 1
        logger.warning("Step %d skipped: non-finite %s (%d in a row)", record.step,
                       "loss" if not math.isfinite(record.loss) else "gradient", adapter.nonfinite_in_a_row)
        if adapter.nonfinite_in_a_row >= adapter.max_nonfinite_steps:
            checkpoints = checkpoints_of(run.settings.run_dir)
            last = f" The last good resumable state is {checkpoints[-1]}." if checkpoints else ""
            raise TrainingError(
                f"training stopped at step {run.state.global_step + 1}: {adapter.nonfinite_in_a_row} steps in a "
                f"row had a NaN/Inf loss or gradient, and no weights were updated or saved from them. Likely "
                f"causes: the SDXL VAE overflowing in fp16 (use --mixed_precision bf16, or "
                f"--pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix), or a learning rate too high "
                f"for this setup (--learning_rate {run.settings.learning_rate:g}; try 1e-4 or lower).{last}")


def checkpoint_or_stop(run: Run, stop: StopRequest, progress, losses: StepLosses) -> None:
    """After an optimizer step: the resumable state every --checkpointing_steps, and the stop on a signal.
    With several processes the stop flag is exchanged only when the losses are read (no sync per step)."""
    args, accelerator, state = run.settings.args, run.accelerator, run.state
    if args.checkpointing_steps and state.global_step % args.checkpointing_steps == 0:
        record_losses(run, losses, progress)
        save_checkpoint(accelerator, run.settings.layout, state, run.adapter.ema, args.checkpoints_total_limit)
    if accelerator.num_processes == 1:
        stopping = stop.requested
    else:
        stopping = not losses.pending and all_stop(stop, accelerator)
    if stopping:
        record_losses(run, losses, progress)
        progress.close()
        stop_run(run, stop)


# ----------------------------------------------------------------------------- the end


def finish_run(run: Run) -> None:
    """final_model/ and the last loss plot, logs/timings.json, the trackers closed, the Hub upload."""
    settings, accelerator = run.settings, run.accelerator
    finish(run)
    if accelerator.is_main_process:
        run.timeline.write(settings.layout.timings)
    accelerator.end_training()
    if settings.args.push_to_hub and accelerator.is_main_process:
        from utils.hub.publish import push_run_to_hub
        push_run_to_hub(settings.run_dir, settings.args.hub_model_id, private=settings.args.hub_private)
