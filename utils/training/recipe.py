"""The LoRA training behind train_sdxl_lora.py, in the order it runs; read it top to bottom.

    train       flag checks -> training examples -> the run folder -> set_up -> train_loop -> finish_run
    set_up      accelerator (device, seed) -> SDXL, frozen -> adapters -> buckets and the data loader -> steps
                per epoch -> fixed-noise evaluation set -> batch maker and caches -> gradient checkpointing ->
                optimizer and schedule -> accelerate.prepare -> resume -> experiment_config.json, trackers,
                loss logs -> the Run, whole
    train_loop  per epoch: run_epoch (per batch, train_step: batch -> noise -> timesteps -> forward -> loss
                -> backward -> per run, update: clip -> non-finite check -> optimizer step -> schedule -> zero
                grad; then the step's logging, checkpoint or stop), the fixed-noise loss, the end-of-epoch files
    finish_run  final_model/, logs/timings.json, the Hub upload

The same functions train a pack (``train_pack``, utils/train_pack.py): several runs of a rank x alpha grid
on one frozen model, the batch drawn once and each run's copy routed to its own adapter (pack.py); set-up,
loop and end then do per run what they do for a run alone, and ``update`` steps each run's adapter on its own.

A step runs through this file, model_inputs (the batch), loss (noise, timesteps, the denoising loss),
loss_log (the step losses, buffered and written), checkpoints and the run's layout. The parts set-up
calls each do one thing in their own module: checks, adapters, optimizer, memory (gradient
checkpointing), batches, caching, evaluation, epochs (end-of-epoch files), experiment_config, stop (signals).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import time
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from utils.core.atomic import write_text
from utils.core.errors import TrainingError
from utils.core.sdxl import DTYPES, SDXLComponents, load_components, resolve_mixed_precision
from utils.data.listing import load_training_examples
from utils.data.records import CACHE_FOLDER, Example
from utils.data.regularisation import balance, load_reg_examples
from utils.training.adapters import AdapterEMA, add_adapters, adapter_name, weights_of
from utils.training.batches import assign_buckets, make_loader
from utils.training.caching import fill_caches
from utils.training.checkpoints import checkpoints_of, register_checkpoint_hooks, resume, save_checkpoint
from utils.training.checks import check_args, trackers
from utils.training.epochs import end_of_epoch, finish
from utils.training.evaluation import build_eval_set, evaluate, evaluate_base, evaluation_plan, split_examples
from utils.training.experiment_config import dataset_info, dataset_line, tracker_config, write_experiment_config
from utils.training.loss import pack_losses, sample_noise, sample_timesteps
from utils.training.loss_log import StepLosses, open_logs, read_interval
from utils.training.memory import set_gradient_checkpointing
from utils.training.model_inputs import BatchMaker
from utils.training.optimizer import loraplus_groups, make_optimizer, make_scheduler
from utils.training.run import Adapter, Run, RunSettings, Timeline, TrainState, distributed_state, open_run
from utils.training.pack import Routing, check_pack, load_run_state, own_adapter, routes, run_label, state_writer
from utils.training.stop import StopRequest, all_stop, stop_runs

logger = logging.getLogger(__name__)

EVAL_IMAGES = 8  # training images used for the fixed-noise loss when nothing is held out


def train(args: argparse.Namespace) -> Path:
    """Run a full training; return the run directory."""
    return train_pack([args])[0]


def train_pack(pack_args: list[argparse.Namespace]) -> list[Path]:
    """Train one run, or several runs of a grid at once on one frozen model (their flags differ only in
    --lora_rank and --lora_alpha: utils/training/pack.py); return the run directories."""
    timeline = Timeline()
    args = pack_args[0]
    for run_args in pack_args:
        check_args(run_args)
    check_pack(pack_args)
    with timeline.phase("dataset check"):
        main_process = distributed_state().is_main_process  # one dataset report per launch
        examples, dataset_type = training_examples(args, report_here=main_process)
        reg_examples = (load_reg_examples(args, main_process, cache_dir=Path(args.output_dir) / CACHE_FOLDER)
                        if args.reg_data_dir else [])
    pack = [open_run(run_args, dataset_type) for run_args in pack_args]
    for settings in pack:
        if settings.args.run_dir_file and main_process:  # the sweep's record of where it trains, before other work
            write_text(settings.args.run_dir_file, f"{settings.run_dir.resolve()}\n")
    runs = set_up_pack(pack, examples, timeline, reg_examples)
    training = list(runs)  # a run that stops leaves this list; the others go on
    try:
        with StopRequest() as stop:
            train_loop(training, stop)
    except torch.cuda.OutOfMemoryError as error:
        raise TrainingError(out_of_memory_message(pack[0])) from error
    finish_run(training)
    failed = [run for run in runs if run.failure]
    if failed:
        raise TrainingError(f"{len(failed)} of the pack's {len(runs)} runs stopped, the others finished: "
                            + "; ".join(f"{run.settings.run_dir.name}: {run.failure}" for run in failed))
    return [settings.run_dir for settings in pack]


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
    """A run alone: a pack of one (``set_up_pack``)."""
    return set_up_pack([settings], examples, timeline, reg_examples)[0]


def set_up_pack(pack: list[RunSettings], examples: list[Example], timeline: Timeline | None = None,
                reg_examples: list[Example] = ()) -> list[Run]:
    """Everything the loop needs, built in dependency order, for one run or a pack of runs whose flags differ
    only in the adapter's rank and alpha (utils/training/pack.py): the model, data, caches and evaluation set
    once, from the first run's flags; per run its adapter, optimizer, schedule, state, files and logs.
    ``reg_examples`` (--reg_data_dir) join the training items after kohya's balancing. Each phase is timed
    (logged with the first step); nothing the first step does not need runs before it (the loss before
    training is measured at the end)."""
    settings, timeline = pack[0], timeline or Timeline()
    args = settings.args
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
        params = add_adapters(components, [run.args for run in pack])
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
    gradient_checkpointing = set_gradient_checkpointing(components, args, device, weight_dtype, len(pack))
    optimizers, lr_schedulers = [], []
    for run, own in zip(pack, params):
        groups = loraplus_groups([components.unet, *components.text_encoders], own, run.args, run.learning_rate)
        optimizers.append(make_optimizer(run.args, groups, run.learning_rate))
        lr_schedulers.append(make_scheduler(run.args, optimizers[-1], max_train_steps, accelerator.num_processes))
    with timeline.phase("accelerate prepare"):
        models, optimizers, dataloader, lr_schedulers = prepare(accelerator, args, components, optimizers, dataloader,
                                                                lr_schedulers)
    info = dataset_info(items, len(reg_examples))
    routing = Routing(models) if len(pack) > 1 else None
    runs = []
    for index, (run, own, optimizer, lr_scheduler) in enumerate(zip(pack, params, optimizers, lr_schedulers)):
        state = TrainState(max_train_steps=max_train_steps, steps_per_epoch=steps_per_epoch, dataset_info=info,
                           speed_info={"resolved_gradient_checkpointing": gradient_checkpointing,
                                       "eval_loss_plan": {"every_epochs": plan.every_epochs, "samples": plan.samples,
                                                          "measurements": plan.measurements,
                                                          "share_of_training": plan.share}})
        adapter = Adapter(name=adapter_name(index), params=own, optimizer=optimizer, lr_scheduler=lr_scheduler,
                          max_grad_norm=run.args.max_grad_norm if run.args.max_grad_norm > 0 else math.inf,
                          skips_on_device=accelerator.scaler is None and isinstance(optimizer.optimizer,
                                                                                     torch.optim.AdamW)
                          and bool(optimizer.optimizer.defaults.get("fused")),
                          max_nonfinite_steps=run.args.max_nonfinite_steps,
                          ema=AdapterEMA(own, run.args.ema_decay, run.args.ema_update_every) if run.args.use_ema
                          else None)
        if run.resume_checkpoint:
            with timeline.phase("resume"):
                resume(accelerator, run.resume_checkpoint, state, adapter.ema,
                       load_state=None if routing is None else partial(load_run_state, accelerator, models=models,
                                                                        adapter=adapter, dataloaders=[dataloader]))
        write_experiment_config(accelerator, run, state, info["num_train_images"], len(held_out), mixed_precision)
        if accelerator.is_main_process and trackers(run.args.report_to):
            accelerator.init_trackers("sdxl_lora", config=tracker_config(run))
        epoch_log, step_log = open_logs(run.layout, accelerator.is_main_process, state.global_step)
        runs.append(Run(settings=run, accelerator=accelerator, components=components, models=models,
                        adapter=adapter, dataloader=dataloader, sampler=sampler, batch_maker=batch_maker,
                        eval_set=eval_set, state=state, num_epochs=math.ceil(max_train_steps / steps_per_epoch),
                        timeline=timeline, gradient_checkpointing=gradient_checkpointing, epoch_log=epoch_log,
                        step_log=step_log, routing=routing))
    steps = {run.state.global_step for run in runs}
    if len(steps) > 1:
        raise TrainingError(f"the runs of a pack resume from different steps ({sorted(steps)}): they train together "
                            "only from the same step; train them alone")
    if accelerator.is_main_process:  # the dataset summary once per launch
        logger.info("%s, batch %d x %d accumulation x %d processes%s",
                    dataset_line(info, len(held_out), max_train_steps, args.prior_loss_weight),
                    args.train_batch_size, args.gradient_accumulation_steps, accelerator.num_processes,
                    f", {len(runs)} runs packed" if len(runs) > 1 else "")
    return runs


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


def prepare(accelerator, args: argparse.Namespace, components: SDXLComponents, optimizers: list, dataloader,
            lr_schedulers: list):
    """accelerate.prepare of the trained models and the training objects (an optimizer and a schedule per run);
    the prepared models replace the plain ones in ``components`` (one handle to each). Checkpoints keep only
    LoRA."""
    trained = [components.unet] + (components.text_encoders if args.train_text_encoder else [])
    prepared = accelerator.prepare(*trained, *optimizers, dataloader, *lr_schedulers)
    models, rest = list(prepared[:len(trained)]), list(prepared[len(trained):])
    count = len(optimizers)
    optimizers, dataloader, lr_schedulers = rest[:count], rest[count], rest[count + 1:]
    components.unet = models[0]
    if args.train_text_encoder:
        components.text_encoders = models[1:]
    register_checkpoint_hooks(accelerator)
    return models, optimizers, dataloader, lr_schedulers


# ----------------------------------------------------------------------------- the loop


def as_pack(pack: Run | list[Run]) -> list[Run]:
    return pack if isinstance(pack, list) else [pack]


def train_loop(pack: Run | list[Run], stop: StopRequest) -> None:
    """The runs of ``pack`` (a run alone, or several sharing the model and the data) step together. Epochs are
    0-based. A step that ends an epoch is checkpointed (or stopped at) only after the epoch's own work (log
    row, best_model, checkpoint_epoch_N): a resumable state then never lies between an epoch's last step and
    its end-of-epoch files.

    Step losses stay on the device and are read every few steps (``StepLosses``, one per run), and wherever
    the loop needs them: at an epoch's end, before a checkpoint, on a stop."""
    pack = as_pack(pack)
    lead = pack[0]
    state = lead.state  # every run of the pack stands at the same step
    losses = [StepLosses(read_interval(lead.accelerator.device.type)) for _ in pack]
    progress = tqdm(total=state.max_train_steps, initial=state.global_step, desc="Training",
                    disable=not lead.accelerator.is_local_main_process)
    for epoch in range(state.global_step // state.steps_per_epoch, lead.num_epochs):
        if pack[0].state.global_step >= state.max_train_steps:  # resumed from the last step's checkpoint
            break
        deferred = run_epoch(pack, stop, epoch, losses, progress)
        for run, run_losses in zip(pack, losses):
            record_losses(run, run_losses, progress)
            eval_loss = None
            if run.eval_set.plan.after_epoch(epoch, run.num_epochs - 1):
                with weights_of(run.adapter.ema), own_adapter(run):
                    eval_loss = evaluate(run.components.unet, run.components.noise_scheduler, run.eval_set)
            end_of_epoch(run, epoch, run.adapter.lr_scheduler.get_last_lr()[0], eval_loss,
                         select_by="eval_loss" if run.eval_set.batches else "train_loss")
        drop_failed(pack, losses)
        if deferred:
            checkpoint_or_stop(pack, stop, progress, losses)
        if pack[0].state.global_step >= state.max_train_steps:  # (a run that stopped left the pack)
            break
    progress.close()
    if state.initial_eval_loss is None and lead.eval_set.batches:
        initial = evaluate_base(lead)  # the adapters off: the same for every run
        for run in pack:
            run.state.initial_eval_loss = initial
            logger.info("Fixed-noise validation loss%s: %.5f before training, %s after", run_label(run), initial,
                        f"{run.state.last_eval_loss:.5f}" if run.state.last_eval_loss is not None else "n/a")


def run_epoch(pack: list[Run], stop: StopRequest, epoch: int, losses: list[StepLosses], progress) -> bool:
    """The optimizer steps of epoch ``epoch`` (from where a resumed run stands). Returns True when the
    epoch's last step still waits for its checkpoint or stop (after the end-of-epoch work)."""
    lead = pack[0]
    state, accelerator = lead.state, lead.accelerator
    for model in lead.models:
        model.train()
    skip = (state.global_step - epoch * state.steps_per_epoch) * lead.settings.args.gradient_accumulation_steps
    loader = accelerator.skip_first_batches(lead.dataloader, skip) if skip > 0 else lead.dataloader
    if skip == 0:
        for run in pack:
            run.state.epoch_losses = []  # on a mid-epoch resume they come from the checkpoint
    lead.sampler.use_epoch(epoch)
    epoch_end = min((epoch + 1) * state.steps_per_epoch, state.max_train_steps)
    deferred = False
    window: list[torch.Tensor] = []
    window_images: list[int] = []
    for loader_batch in loader:
        loss, skipped = train_step(pack, loader_batch)
        window.append(loss)
        window_images += loader_batch["index"].tolist()
        if not accelerator.sync_gradients:  # accumulating: no optimizer step yet
            continue
        local_loss = torch.stack(window).mean(dim=0)  # per run
        if logger.isEnabledFor(logging.DEBUG):
            losses_text = " ".join(f"{value:.6g}" for value in local_loss.tolist())  # one per run of the pack
            logger.debug("process %d step %d images %s loss %s", accelerator.process_index,
                         state.global_step + 1, window_images, losses_text)
        window, window_images = [], []
        lead.timeline.step_marks.append(time.time())
        if len(lead.timeline.step_marks) == 1:
            logger.info(lead.timeline.describe_setup())
        for i, (run, run_losses) in enumerate(zip(pack, losses)):
            run.state.global_step += 1
            if run.adapter.ema is not None:
                run.adapter.ema.update(run.state.global_step)
            run_losses.add(epoch, run.state.global_step, run.adapter.lr_scheduler.get_last_lr()[0],
                           accelerator.gather(local_loss[i][None]).mean(), skipped[i])
            if run_losses.due(run.state.global_step):
                record_losses(run, run_losses, progress)
        drop_failed(pack, losses)
        progress.update(1)
        deferred = pack[0].state.global_step >= epoch_end  # (a run that stopped left the pack)
        if not deferred:
            checkpoint_or_stop(pack, stop, progress, losses)
        if pack[0].state.global_step >= state.max_train_steps:
            break
    return deferred


def train_step(pack: Run | list[Run], loader_batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch for the runs of ``pack``: the batch, noise and timesteps drawn once; forward (each run's
    copy of the batch routed to its adapter) and each run's loss; backward; at an accumulation boundary each
    run's ``update``. Returns (losses, skipped), one per run, as device tensors."""
    pack = as_pack(pack)
    lead = pack[0]
    args, accelerator = lead.settings.args, lead.accelerator
    unet, scheduler = lead.components.unet, lead.components.noise_scheduler
    skipped = torch.zeros(len(pack), dtype=torch.bool, device=accelerator.device)
    with accelerator.accumulate(*lead.models):
        batch = lead.batch_maker(loader_batch)  # latents, text embeddings, time ids (cached or encoded now)
        noise = sample_noise(batch.latents, args.noise_offset)
        timesteps = sample_timesteps(args, scheduler.config.num_train_timesteps, batch.latents.shape[0],
                                     batch.latents.device)
        route = (lead.routing.route(routes(batch.latents.shape[0], [run.adapter.name for run in pack]))
                 if lead.routing is not None else contextlib.nullcontext())
        with route:
            losses = pack_losses(unet, scheduler, batch, noise, timesteps, len(pack), args.snr_gamma)
            accelerator.backward(losses.sum())
        if accelerator.sync_gradients:
            skipped = torch.stack([update(accelerator, run.adapter, loss) for run, loss in zip(pack, losses)])
        else:
            for run in pack:  # accumulating: accelerate makes these no-ops
                run.adapter.optimizer.step()
                run.adapter.lr_scheduler.step()
                run.adapter.optimizer.zero_grad(set_to_none=True)
    return losses.detach(), skipped


def update(accelerator, adapter: Adapter, loss: torch.Tensor) -> torch.Tensor:
    """One run's update after the backward: clip its own gradient norm, the non-finite check, the optimizer
    step (skipped when its loss or gradient is not finite), the schedule, zero grad. Returns the skip flag as
    a device bool: nothing here waits for the device, unless the optimizer cannot skip a step by itself (then
    the host reads the flag and drops the gradients).

    The skip on the device: the fused AdamW takes a ``found_inf`` tensor (the protocol torch's GradScaler
    uses) and leaves the weights, the moments and the step count alone; with a GradScaler (fp16) the scaler
    skips steps whose gradients are not finite, and an infinite gradient alone is its business (a non-finite
    loss never is)."""
    inner = adapter.optimizer.optimizer
    norm = accelerator.clip_grad_norm_(adapter.params, adapter.max_grad_norm)
    skipped = ~torch.isfinite(accelerator.gather(loss.detach()[None])).all()  # on any process
    if accelerator.scaler is None and norm is not None:
        skipped = skipped | ~torch.isfinite(torch.as_tensor(norm, device=skipped.device))
    if adapter.skips_on_device:
        inner.grad_scale, inner.found_inf = None, skipped.float()
    elif accelerator.scaler is None and bool(skipped):
        adapter.optimizer.zero_grad(set_to_none=True)  # parameters without gradients are not updated
    adapter.optimizer.step()
    if adapter.skips_on_device:
        del inner.found_inf, inner.grad_scale
    adapter.lr_scheduler.step()
    adapter.optimizer.zero_grad(set_to_none=True)
    return skipped


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
        logger.warning("Step %d skipped%s: non-finite %s (%d in a row)", record.step, run_label(run),
                       "loss" if not math.isfinite(record.loss) else "gradient", adapter.nonfinite_in_a_row)
        if adapter.nonfinite_in_a_row >= adapter.max_nonfinite_steps:
            checkpoints = checkpoints_of(run.settings.run_dir)
            last = f" The last good resumable state is {checkpoints[-1]}." if checkpoints else ""
            run.failure = (
                f"training stopped at step {run.state.global_step + 1}: {adapter.nonfinite_in_a_row} steps in a "
                f"row had a NaN/Inf loss or gradient, and no weights were updated or saved from them. Likely "
                f"causes: the SDXL VAE overflowing in fp16 (use --mixed_precision bf16, or "
                f"--pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix), or a learning rate too high "
                f"for this setup (--learning_rate {run.settings.learning_rate:g}; try 1e-4 or lower).{last}")
            if run.routing is None:
                raise TrainingError(run.failure)
            logger.error("%s%s: %s", run.settings.run_dir.name, run_label(run), run.failure)
            return


def drop_failed(pack: list[Run], losses: list[StepLosses]) -> None:
    """The runs of a pack that stopped leave it (and the routing); the others go on. None left: the error."""
    for index in reversed(range(len(pack))):
        if pack[index].failure:
            del pack[index], losses[index]
    if not pack:
        raise TrainingError("every run of the pack stopped (see the errors above)")


def checkpoint_or_stop(pack: list[Run], stop: StopRequest, progress, losses: list[StepLosses]) -> None:
    """After an optimizer step: each run's resumable state every --checkpointing_steps, and the stop on a
    signal (every run of the pack saved, then one exit). With several processes the stop flag is exchanged
    only when the losses are read (no sync per step)."""
    lead = pack[0]
    args, accelerator, state = lead.settings.args, lead.accelerator, lead.state
    if args.checkpointing_steps and state.global_step % args.checkpointing_steps == 0:
        for run, run_losses in zip(pack, losses):
            record_losses(run, run_losses, progress)
            if not run.failure:
                save_checkpoint(accelerator, run.settings.layout, run.state, run.adapter.ema,
                                run.settings.args.checkpoints_total_limit,
                                state_writer(run) if run.routing is not None else None)
        drop_failed(pack, losses)
    if accelerator.num_processes == 1:
        stopping = stop.requested
    else:
        stopping = not losses[0].pending and all_stop(stop, accelerator)
    if stopping:
        for run, run_losses in zip(pack, losses):
            record_losses(run, run_losses, progress)
        drop_failed(pack, losses)
        progress.close()
        stop_runs(pack, stop)


# ----------------------------------------------------------------------------- the end


def finish_run(pack: Run | list[Run]) -> None:
    """Per run: final_model/ and the last loss plot, logs/timings.json, the Hub upload; the trackers closed."""
    pack = as_pack(pack)
    accelerator = pack[0].accelerator
    for run in pack:
        finish(run)
        if accelerator.is_main_process:
            run.timeline.write(run.settings.layout.timings)
    accelerator.end_training()
    for run in pack:
        settings = run.settings
        if settings.args.push_to_hub and accelerator.is_main_process:
            from utils.hub.publish import push_run_to_hub
            push_run_to_hub(settings.run_dir, settings.args.hub_model_id, private=settings.args.hub_private)
