"""The LoRA training run behind train_sdxl_lora.py.

Order of work: check everything cheap (flags, dataset) -> load SDXL frozen ->
inject LoRA with PEFT -> cache latents/embeddings -> train with accelerate ->
write the original's run-directory layout as it goes.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from utils import run_files
from utils.errors import UserError
from utils.ghibli_datasets import Example, load_training_examples
from utils.interrupts import StopRequest, TrainingInterrupted
from utils.sdxl import (DTYPES, check_model_source, encode_prompts, load_components, resolve_mixed_precision,
                        scale_latents, vae_latent_distribution)
from utils.train_data import (BucketBatchSampler, IndexDataset, Item, PixelDataset, assign_buckets, cache_latents,
                              cache_text, orientation_time_ids, prepare_item)

logger = logging.getLogger(__name__)

TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
EVAL_TIMESTEPS = 4  # fixed timesteps per held-out image, spread over the schedule
EVAL_IMAGES = 8  # training images used for the fixed-noise loss when nothing is held out


class TrainingError(UserError):
    """A problem that stops training with a clear message instead of a traceback."""


# ----------------------------------------------------------------------------- checks before work


def check_args(args: argparse.Namespace) -> None:
    """Flag combinations that cannot work, refused before anything is loaded."""
    check_model_source(args.pretrained_model_name_or_path, "--pretrained_model_name_or_path")
    if args.enable_xformers_memory_efficient_attention:
        from diffusers.utils.import_utils import is_xformers_available
        if not is_xformers_available():
            raise TrainingError("--enable_xformers_memory_efficient_attention: xformers is not installed "
                                "(PyTorch's built-in SDPA attention is used by default and needs nothing)")
    if args.optimizer == "adamw8bit":
        _require("bitsandbytes", "--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes")
    if args.optimizer == "prodigy":
        _require("prodigyopt", "--optimizer prodigy needs prodigyopt: pip install prodigyopt")
    for tracker in _trackers(args.report_to):
        _require(tracker, f"--report_to {args.report_to} needs {tracker}: pip install {tracker}")
    if args.resolution < 8 or args.resolution % 8:
        raise TrainingError(f"--resolution {args.resolution} must be a positive multiple of 8 (the VAE's "
                            f"downscale factor)")
    if not 0.0 <= args.validation_split < 1.0:
        raise TrainingError("--validation_split must be in [0, 1)")
    if not 0.0 <= args.caption_dropout < 1.0:
        raise TrainingError("--caption_dropout must be in [0, 1)")
    if args.save_kohya and args.use_dora:
        raise TrainingError("--save_kohya cannot be combined with --use_dora: the kohya format has no exact "
                            "equivalent of PEFT's DoRA magnitudes")
    if args.push_to_hub:
        from utils.hub_publish import check_hub_target
        if not args.hub_model_id:
            raise TrainingError("--push_to_hub needs --hub_model_id namespace/name")
        check_hub_target(args.hub_model_id)


def _require(module: str, message: str) -> None:
    import importlib.util
    if importlib.util.find_spec(module) is None:
        raise TrainingError(message)


def _trackers(report_to: str) -> list[str]:
    return {"none": [], "all": ["tensorboard", "wandb"]}.get(report_to, [report_to])


def split_examples(examples: list[Example], validation_split: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out a fixed, seeded share of the images for the validation loss (at least one if asked)."""
    if validation_split <= 0:
        return examples, []
    count = max(1, round(len(examples) * validation_split))
    if count >= len(examples):
        raise TrainingError(f"--validation_split {validation_split} leaves no training images "
                            f"out of {len(examples)}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:count])
    return ([e for i, e in enumerate(examples) if i not in held_out],
            [e for i, e in enumerate(examples) if i in held_out])


# ----------------------------------------------------------------------------- model set-up


def lora_config(args: argparse.Namespace, target_modules: list[str]):
    from peft import LoraConfig
    return LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target_modules,
        init_lora_weights="gaussian" if args.init_lora_weights == "gaussian" else True,
        use_dora=args.use_dora,
        use_rslora=args.use_rslora,
    )


def inject_lora(components, args: argparse.Namespace) -> list[torch.nn.Parameter]:
    """Add LoRA adapters (trainable, fp32) to the UNet and, if asked, both text encoders."""
    from diffusers.training_utils import cast_training_params

    models = [components.unet]
    components.unet.add_adapter(lora_config(args, args.lora_target_modules))
    if args.train_text_encoder:
        for encoder in components.text_encoders:
            encoder.add_adapter(lora_config(args, TEXT_ENCODER_TARGETS))
        models += components.text_encoders
    cast_training_params(models, dtype=torch.float32)
    if args.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            for encoder in components.text_encoders:
                encoder.gradient_checkpointing_enable()
    if args.enable_xformers_memory_efficient_attention:
        components.unet.enable_xformers_memory_efficient_attention()
    return [p for model in models for p in model.parameters() if p.requires_grad]


def make_optimizer(args: argparse.Namespace, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    kwargs = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    if args.optimizer == "adamw8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, **kwargs)
    if args.optimizer == "prodigy":
        import prodigyopt
        return prodigyopt.Prodigy(params, lr=args.learning_rate, betas=kwargs["betas"],
                                  weight_decay=args.adam_weight_decay)
    return torch.optim.AdamW(params, **kwargs)


# ----------------------------------------------------------------------------- the loss


@dataclass
class Batch:
    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR+1) for v."""
    from diffusers.training_utils import compute_snr
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def denoising_loss(unet, noise_scheduler, batch: Batch, noise: torch.Tensor, timesteps: torch.Tensor,
                   snr_gamma: float | None = None) -> torch.Tensor:
    """Mean squared error of the UNet's prediction against the scheduler's target."""
    noisy = noise_scheduler.add_noise(batch.latents, noise, timesteps)
    prediction = unet(
        noisy, timesteps, batch.prompt_embeds,
        added_cond_kwargs={"text_embeds": batch.pooled, "time_ids": batch.time_ids},
        return_dict=False,
    )[0]
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(batch.latents, noise, timesteps)
    else:
        target = noise
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma:
        per_sample = per_sample * min_snr_weights(noise_scheduler, timesteps, snr_gamma)
    return per_sample.mean()


@dataclass
class BatchMaker:
    """Turns a batch of dataset indices into model inputs, from the cache or by encoding on the fly."""

    components: object
    items: list[Item]
    args: argparse.Namespace
    weight_dtype: torch.dtype
    device: torch.device
    latent_cache: object = None
    text_cache: dict | None = None

    def __call__(self, loader_batch: dict) -> Batch:
        indices = loader_batch["index"].tolist()
        count = len(indices)
        flips = (torch.rand(count) < 0.5) if self.args.random_flip else torch.zeros(count, dtype=torch.bool)
        vae = self.components.vae
        if self.latent_cache is not None:
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
            params = torch.stack([self.latent_cache.parameters[i][int(f)] for i, f in zip(indices, flips)])
            latents = DiagonalGaussianDistribution(params.to(self.device)).sample()
            ids = torch.stack([self.latent_cache.time_ids[i][int(f)] for i, f in zip(indices, flips)])
        else:
            pixels = loader_batch["pixels"].clone()
            pixels[flips] = pixels[flips].flip(-1)
            latents = vae_latent_distribution(vae, pixels).sample()
            ids = loader_batch["time_ids"][torch.arange(count), flips.long()]
        latents = scale_latents(vae, latents.float()).to(self.weight_dtype).contiguous()
        captions = [self.items[i].example.caption for i in indices]
        embeds, pooled = self.encode(captions)
        if self.args.caption_dropout > 0:
            # Dropped captions get zero embeddings: SDXL's unconditional input at inference
            # (force_zeros_for_empty_prompt), which classifier-free guidance contrasts with.
            keep = (torch.rand(count) >= self.args.caption_dropout).to(self.device)
            embeds = embeds * keep[:, None, None].to(embeds.dtype)
            pooled = pooled * keep[:, None].to(pooled.dtype)
        return Batch(latents, embeds.to(self.weight_dtype), pooled.to(self.weight_dtype),
                     ids.to(self.device, self.weight_dtype))

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text_cache is not None:
            embeds = torch.stack([self.text_cache[c][0] for c in captions]).to(self.device)
            pooled = torch.stack([self.text_cache[c][1] for c in captions]).to(self.device)
            return embeds, pooled
        return encode_prompts(self.components.tokenizers, self.components.text_encoders, captions)


def sample_noise(latents: torch.Tensor, noise_offset: float) -> torch.Tensor:
    # randn with an explicit shape: randn_like's draws depend on the tensor's memory layout,
    # which differs between cached and freshly encoded latents.
    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1,
                                                   device=latents.device, dtype=latents.dtype)
    return noise


# ----------------------------------------------------------------------------- fixed-noise evaluation


@dataclass
class EvalSet:
    """Fixed (latent, noise, timestep, conditioning) tuples: the same every time it is measured."""

    batches: list[tuple[Batch, torch.Tensor, torch.Tensor]] = field(default_factory=list)


@torch.no_grad()
def build_eval_set(components, items: list[Item], args: argparse.Namespace, weight_dtype: torch.dtype,
                   device: torch.device) -> EvalSet:
    generator = torch.Generator().manual_seed(args.seed + 1)
    steps = components.noise_scheduler.config.num_train_timesteps
    timesteps = torch.linspace(0, steps - 1, EVAL_TIMESTEPS * 2 + 1)[1::2].round().long()
    eval_set = EvalSet()
    for item in items:
        prepared = prepare_item(item, center_crop=True)
        distribution = vae_latent_distribution(components.vae, prepared.pixels[None])
        latents = scale_latents(components.vae, distribution.mean.float()).repeat(EVAL_TIMESTEPS, 1, 1, 1)
        embeds, pooled = encode_prompts(components.tokenizers, components.text_encoders, [item.example.caption])
        ids = orientation_time_ids(prepared)[0][None].repeat(EVAL_TIMESTEPS, 1)
        noise = torch.randn(latents.shape, generator=generator)
        batch = Batch(latents.to(device, weight_dtype), embeds.repeat(EVAL_TIMESTEPS, 1, 1).to(device, weight_dtype),
                      pooled.repeat(EVAL_TIMESTEPS, 1).to(device, weight_dtype), ids.to(device, weight_dtype))
        eval_set.batches.append((batch, noise.to(device, weight_dtype), timesteps.to(device)))
    return eval_set


@torch.no_grad()
def evaluate(unet, noise_scheduler, eval_set: EvalSet) -> float | None:
    if not eval_set.batches:
        return None
    was_training = unet.training
    unet.eval()
    losses = [denoising_loss(unet, noise_scheduler, batch, noise, t).item() for batch, noise, t in eval_set.batches]
    unet.train(was_training)
    return sum(losses) / len(losses)


# ----------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything the training loop works with, set up by ``prepare_run``."""

    args: argparse.Namespace
    accelerator: object
    run_dir: Path
    components: object
    models: list
    params: list
    optimizer: object
    lr_scheduler: object
    dataloader: object
    sampler: BucketBatchSampler
    batch_maker: BatchMaker
    eval_set: EvalSet
    state: object
    epoch_log: object  # logs/training_log.csv, the original's: one row per epoch
    step_log: object  # logs/training_steps.csv: one row per optimizer step
    num_epochs: int
    nonfinite_in_a_row: int = 0

    @property
    def unet(self):
        return self.models[0]


def train(args: argparse.Namespace) -> Path:
    """Run a full training; return the run directory."""
    check_args(args)
    examples = load_training_examples(args)
    run = prepare_run(args, examples)
    try:
        with StopRequest() as stop:
            train_loop(run, stop)
    except torch.cuda.OutOfMemoryError as error:
        raise TrainingError(out_of_memory_message(args, run.run_dir)) from error
    run_files.finish(run.accelerator, args, run.run_dir, run.state, run.models)
    run.accelerator.end_training()
    if args.push_to_hub and run.accelerator.is_main_process:
        from utils.hub_publish import push_run_to_hub
        push_run_to_hub(run.run_dir, args.hub_model_id, private=args.hub_private)
    return run.run_dir


def prepare_run(args: argparse.Namespace, examples: list[Example]) -> Run:
    """Load the model, add LoRA, cache, build data, optimizer and schedule; resume if asked."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import ProjectConfiguration, parse_flag_from_env, set_seed
    from diffusers.optimization import get_scheduler

    train_examples, held_out = split_examples(examples, args.validation_split, args.seed)
    mixed_precision = resolve_mixed_precision(args.mixed_precision)
    # The CPU flag Accelerator reads too: without it, a multi-process CPU launch becomes N separate runs.
    run_dir = run_files.open_run_dir(PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")), args)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=_trackers(args.report_to) or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / args.logging_dir)),
    )
    logger.info("Run directory: %s", run_dir)
    set_seed(args.seed)
    weight_dtype = DTYPES[mixed_precision]
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    components = load_components(args.pretrained_model_name_or_path, args.revision, args.variant,
                                 weight_dtype, args.pretrained_vae_model_name_or_path, args.allow_pickle)
    if args.prediction_type:
        components.noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    device = accelerator.device
    for module in [components.unet, components.vae, *components.text_encoders]:
        module.to(device)
    params = inject_lora(components, args)

    items = assign_buckets(train_examples, args.resolution, not args.no_buckets, args.seed)
    eval_items = assign_buckets(held_out or train_examples[:EVAL_IMAGES], args.resolution, False, args.seed)
    eval_set = build_eval_set(components, eval_items, args, weight_dtype, device)
    batch_maker = BatchMaker(components, items, args, weight_dtype, device)
    if args.cache:
        fill_caches(batch_maker, items, args, accelerator)

    sampler = BucketBatchSampler([item.bucket for item in items], args.train_batch_size, args.seed)
    dataset = IndexDataset(len(items)) if args.cache else PixelDataset(items, args.center_crop)
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),  # keeps the global RNG untouched for resume
    )
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer(args, params)
    steps_per_epoch = math.ceil(math.ceil(len(dataloader) / accelerator.num_processes)
                                / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    if args.lr_warmup_steps >= max_train_steps:
        logger.warning("--lr_warmup_steps %d is not below the %d training steps: the learning rate never "
                       "leaves warm-up", args.lr_warmup_steps, max_train_steps)
    # accelerate steps a prepared scheduler once per process per optimizer step.
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes)
    trained = [components.unet] + (components.text_encoders if args.train_text_encoder else [])
    prepared = accelerator.prepare(*trained, optimizer, dataloader, lr_scheduler)
    models, (optimizer, dataloader, lr_scheduler) = list(prepared[:len(trained)]), prepared[len(trained):]
    components.unet = models[0]
    if args.train_text_encoder:
        components.text_encoders = models[1:]
    run_files.register_checkpoint_hooks(accelerator, args)

    state = run_files.TrainState(max_train_steps=max_train_steps, steps_per_epoch=steps_per_epoch)
    state.dataset_info = {"num_train_images": len(items),
                          "tag_frequency": run_files.tag_frequency([i.example.caption for i in items])}
    if args.resume_from_checkpoint:
        run_files.resume(accelerator, args, run_dir, state)
    run_files.write_experiment_config(accelerator, run_dir, args, state, len(items), len(held_out), mixed_precision)
    if accelerator.is_main_process and _trackers(args.report_to):
        accelerator.init_trackers("sdxl_lora", config=run_files.tracker_config(args))
    epoch_log, step_log = run_files.open_logs(run_dir, args, accelerator.is_main_process, state.global_step)
    logger.info("%d training images (%d held out), %d optimizer steps, batch %d x %d accumulation x %d processes",
                len(items), len(held_out), max_train_steps, args.train_batch_size,
                args.gradient_accumulation_steps, accelerator.num_processes)
    return Run(args, accelerator, run_dir, components, models, params, optimizer, lr_scheduler, dataloader,
               sampler, batch_maker, eval_set, state, epoch_log, step_log, math.ceil(max_train_steps / steps_per_epoch))


def fill_caches(batch_maker: BatchMaker, items: list[Item], args: argparse.Namespace, accelerator) -> None:
    components = batch_maker.components
    model_id = f"{args.pretrained_model_name_or_path}|{args.pretrained_vae_model_name_or_path}|{args.revision}"
    cache_dir = run_files.cache_dir(args) if args.cache_latents_to_disk else None
    with accelerator.main_process_first():
        batch_maker.latent_cache = cache_latents(items, components.vae, args.center_crop, args.random_flip,
                                                 model_id, cache_dir)
    if not args.train_text_encoder:
        batch_maker.text_cache = cache_text([i.example.caption for i in items], components.tokenizers,
                                            components.text_encoders)
    release_encoders(components, args, accelerator)


def train_loop(run: Run, stop: StopRequest) -> None:
    """Epochs are 0-based, as in the original. A step that ends an epoch is checkpointed (or stopped at)
    only after the epoch's own work (log row, best_model, checkpoint_epoch_N): a resumable state then
    never lies between an epoch's last step and its end-of-epoch files."""
    state, accelerator, args = run.state, run.accelerator, run.args
    if state.global_step == 0:
        state.initial_eval_loss = evaluate(run.unet, run.components.noise_scheduler, run.eval_set)
    progress = tqdm(total=state.max_train_steps, initial=state.global_step, desc="Training",
                    disable=not accelerator.is_local_main_process)
    for epoch in range(state.global_step // state.steps_per_epoch, run.num_epochs):
        if state.global_step >= state.max_train_steps:  # resumed from the last step's checkpoint
            break
        for model in run.models:
            model.train()
        skip = (state.global_step - epoch * state.steps_per_epoch) * args.gradient_accumulation_steps
        loader = accelerator.skip_first_batches(run.dataloader, skip) if skip > 0 else run.dataloader
        if skip == 0:
            state.epoch_losses = []  # on a mid-epoch resume they come from the checkpoint
        run.sampler.use_epoch(epoch)
        epoch_end = min((epoch + 1) * state.steps_per_epoch, state.max_train_steps)
        deferred = False
        window: list[torch.Tensor] = []
        window_images: list[int] = []
        for loader_batch in loader:
            window.append(train_micro_step(run, loader_batch))
            window_images += loader_batch["index"].tolist()
            if not accelerator.sync_gradients:
                continue
            local_loss = torch.stack(window).mean()
            step_loss = accelerator.gather(local_loss[None]).mean().item()
            logger.debug("process %d step %d images %s loss %.6f", accelerator.process_index, state.global_step + 1,
                         window_images, local_loss.item())
            window, window_images = [], []
            state.global_step += 1
            if math.isfinite(step_loss):
                state.epoch_losses.append(step_loss)
            learning_rate = run.lr_scheduler.get_last_lr()[0]
            run.step_log.append(epoch, state.global_step, step_loss, learning_rate)
            accelerator.log({"train_loss": step_loss, "lr": learning_rate}, step=state.global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{learning_rate:.2e}")
            deferred = state.global_step >= epoch_end
            if not deferred:
                checkpoint_or_stop(run, stop, progress)
            if state.global_step >= state.max_train_steps:
                break
        eval_loss = evaluate(run.unet, run.components.noise_scheduler, run.eval_set)
        run_files.end_of_epoch(accelerator, args, run.run_dir, state, epoch, run.lr_scheduler.get_last_lr()[0],
                               eval_loss, run.epoch_log, run.components, run.models)
        if deferred:
            checkpoint_or_stop(run, stop, progress)
        if state.global_step >= state.max_train_steps:
            break
    progress.close()


def checkpoint_or_stop(run: Run, stop: StopRequest, progress) -> None:
    """After an optimizer step: the resumable state every --checkpointing_steps, and the stop on a signal."""
    if run.args.checkpointing_steps and run.state.global_step % run.args.checkpointing_steps == 0:
        run_files.save_checkpoint(run.accelerator, run.args, run.run_dir, run.state)
    if stop_requested(stop, run.accelerator):
        progress.close()
        stop_now(run, stop)


def train_micro_step(run: Run, loader_batch: dict) -> torch.Tensor:
    """Forward and backward of one batch; at an accumulation boundary, the optimizer step
    (skipped, and counted, when the loss or the gradient is not finite)."""
    args, accelerator, scheduler = run.args, run.accelerator, run.components.noise_scheduler
    with accelerator.accumulate(*run.models):
        batch = run.batch_maker(loader_batch)
        noise = sample_noise(batch.latents, args.noise_offset)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch.latents.shape[0],),
                                  device=batch.latents.device).long()
        loss = denoising_loss(run.unet, scheduler, batch, noise, timesteps, args.snr_gamma)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            norm = accelerator.clip_grad_norm_(run.params, args.max_grad_norm if args.max_grad_norm > 0 else math.inf)
            if not step_is_finite(run, loss, norm):
                run.optimizer.zero_grad(set_to_none=True)  # parameters without gradients are not updated
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def step_is_finite(run: Run, loss: torch.Tensor, grad_norm) -> bool:
    """Count steps in a row whose loss or gradient is NaN/Inf; stop training after too many.

    With fp16 loss scaling an infinite gradient alone is the scaler's business (it skips the
    step and lowers the scale); a non-finite loss never is.
    """
    finite_loss = bool(torch.isfinite(run.accelerator.gather(loss.detach()[None])).all())
    norm = float(grad_norm) if grad_norm is not None else 0.0
    scaler_handles_it = run.accelerator.scaler is not None
    if finite_loss and (math.isfinite(norm) or scaler_handles_it):
        run.nonfinite_in_a_row = 0
        return True
    run.nonfinite_in_a_row += 1
    run.state.skipped_steps += 1
    logger.warning("Step %d skipped: non-finite %s (%d in a row)", run.state.global_step + 1,
                   "loss" if not finite_loss else "gradient", run.nonfinite_in_a_row)
    if run.nonfinite_in_a_row >= run.args.max_nonfinite_steps:
        raise TrainingError(nonfinite_message(run))
    return False


def nonfinite_message(run: Run) -> str:
    args = run.args
    checkpoints = run_files.checkpoints_of(run.run_dir)
    last = f" The last good resumable state is {checkpoints[-1]}." if checkpoints else ""
    return (f"training stopped at step {run.state.global_step + 1}: {run.nonfinite_in_a_row} steps in a row had a "
            f"NaN/Inf loss or gradient, and no weights were updated or saved from them. Likely causes: the SDXL VAE "
            f"overflowing in fp16 (use --mixed_precision bf16, or --pretrained_vae_model_name_or_path "
            f"madebyollin/sdxl-vae-fp16-fix), or a learning rate too high for this setup (--learning_rate "
            f"{args.learning_rate:g}; try 1e-4 or lower).{last}")


def out_of_memory_message(args: argparse.Namespace, run_dir: Path) -> str:
    checkpoints = run_files.checkpoints_of(run_dir)
    last = f" The last checkpoint, {checkpoints[-1]}, is intact." if checkpoints else ""
    return (f"out of GPU memory at --resolution {args.resolution}, --train_batch_size {args.train_batch_size}. "
            "Ways to fit: a smaller --train_batch_size (with --gradient_accumulation_steps to keep the effective "
            "batch), a lower --resolution, --gradient_checkpointing (on by default), --optimizer adamw8bit, "
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
    checkpoint = run_files.save_checkpoint(run.accelerator, run.args, run.run_dir, run.state)
    run_files.save_model_folder(run.accelerator, run.run_dir / "interrupted_model", run.models, run.args,
                                run.state, "interrupted_model_info.json", {"step": run.state.global_step})
    run.accelerator.end_training()
    command = run_files.command_line()
    if "--resume_from_checkpoint" not in command:
        command += f" --resume_from_checkpoint {checkpoint}"
    raise TrainingInterrupted(
        f"stopped at step {run.state.global_step} of {run.state.max_train_steps}; state saved in {checkpoint}, "
        f"current LoRA in {run.run_dir / 'interrupted_model'}.\nResume with:\n  python {command}",
        stop.signal_number or 15)


def release_encoders(components, args: argparse.Namespace, accelerator) -> None:
    """After caching, the VAE (and the text encoders, unless trained) leave the accelerator."""
    if accelerator.device.type == "cpu":
        return
    components.vae.to("cpu")
    if not args.train_text_encoder:
        for encoder in components.text_encoders:
            encoder.to("cpu")
    torch.cuda.empty_cache()
