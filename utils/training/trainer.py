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

from utils.training import run_dir as run_files
from utils.core.errors import UserError
from utils.ghibli_datasets import Example, folder_counts, load_training_examples
from utils.training.interrupts import StopRequest, TrainingInterrupted
from utils.training.speed import (EvalPlan, StepLosses, StepRecord, Timeline, choose_gradient_checkpointing, estimate_activation_bytes, eval_timesteps, plan_evaluation, read_interval)
from utils.core.sdxl import (DTYPES, check_model_source, encode_prompts, load_components, resolve_mixed_precision, scale_latents, vae_latent_distribution)
from utils.training.batches import (BucketBatchSampler, IndexDataset, Item, PixelDataset, assign_buckets, cache_latents, cache_text, orientation_time_ids, prepare_item)

logger = logging.getLogger(__name__)

TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
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
        from utils.hub.publish import check_hub_target
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
    if args.enable_xformers_memory_efficient_attention:
        components.unet.enable_xformers_memory_efficient_attention()
    return [p for model in models for p in model.parameters() if p.requires_grad]


def set_gradient_checkpointing(components, args: argparse.Namespace, device: torch.device,
                               weight_dtype: torch.dtype) -> bool:
    """Decide (forced by a flag, or auto from the device and free memory) and apply; log the choice."""
    free = activations = None
    if args.gradient_checkpointing == "auto" and device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        activations = estimate_activation_bytes(components.unet.config, args.resolution, args.train_batch_size,
                                                weight_dtype, lora_config(args, args.lora_target_modules))
    enabled, reason = choose_gradient_checkpointing(args.gradient_checkpointing, device.type, free, activations)
    logger.info("Gradient checkpointing %s: %s", "on" if enabled else "off", reason)
    if enabled:
        components.unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            for encoder in components.text_encoders:
                encoder.gradient_checkpointing_enable()
    return enabled


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
    # Fused: one kernel per step, and it can skip a step on the device (see skip_on_device).
    fused = all(p.device.type in ("cuda", "cpu") and p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW(params, fused=fused, **kwargs)


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
            latents = DiagonalGaussianDistribution(self.to_device(params)).sample()
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
            embeds = self.to_device(torch.stack([self.text_cache[c][0] for c in captions]))
            pooled = self.to_device(torch.stack([self.text_cache[c][1] for c in captions]))
            return embeds, pooled
        return encode_prompts(self.components.tokenizers, self.components.text_encoders, captions)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Host-to-GPU copies from pinned memory, asynchronous: a pageable copy would wait for the GPU."""
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)


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
    """Fixed (latent, noise, timestep, conditioning) triples, in batches: the same every time it is measured."""

    batches: list[tuple[Batch, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    plan: EvalPlan = field(default_factory=lambda: EvalPlan(0, 0, 0, 0.0))


@torch.no_grad()
def build_eval_set(components, items: list[Item], plan: EvalPlan, args: argparse.Namespace, weight_dtype: torch.dtype,
                   device: torch.device) -> EvalSet:
    """``plan.samples`` triples: images in turn, one timestep each spread over the schedule, seeded noise."""
    eval_set = EvalSet(plan=plan)
    if not plan.every_epochs or not items:
        return eval_set
    generator = torch.Generator().manual_seed(args.seed + 1)
    timesteps = eval_timesteps(plan.samples, components.noise_scheduler.config.num_train_timesteps)
    encoded = {}
    for index in sorted({k % len(items) for k in range(plan.samples)}):
        item = items[index]
        prepared = prepare_item(item, center_crop=True)
        distribution = vae_latent_distribution(components.vae, prepared.pixels[None])
        embeds, pooled = encode_prompts(components.tokenizers, components.text_encoders, [item.example.caption])
        encoded[index] = (scale_latents(components.vae, distribution.mean.float())[0], embeds[0], pooled[0],
                          orientation_time_ids(prepared)[0])
    triples = [encoded[k % len(items)] for k in range(plan.samples)]
    chunk = max(1, 4 * args.train_batch_size)
    for start in range(0, plan.samples, chunk):
        part = triples[start:start + chunk]
        latents = torch.stack([t[0] for t in part])
        noise = torch.randn(latents.shape, generator=generator)
        batch = Batch(*(torch.stack([t[i] for t in part]).to(device, weight_dtype) for i in range(4)))
        eval_set.batches.append((batch, noise.to(device, weight_dtype), timesteps[start:start + chunk].to(device)))
    return eval_set


@torch.no_grad()
def evaluate(unet, noise_scheduler, eval_set: EvalSet) -> float | None:
    """Mean loss over the triples, batched, without gradients, in the compute dtype (the prepared model's
    autocast); one host read at the end."""
    if not eval_set.batches:
        return None
    was_training = unet.training
    unet.eval()
    total = sum(denoising_loss(unet, noise_scheduler, batch, noise, t) * len(t) for batch, noise, t in eval_set.batches)
    unet.train(was_training)
    return float(total) / sum(len(t) for *_, t in eval_set.batches)


def evaluate_base(run) -> float | None:
    """The loss before training, measured with the adapters off: LoRA starts as the identity (B = 0),
    so this equals the loss at step 0 without costing set-up time before the first step."""
    unet = run.accelerator.unwrap_model(run.unet)
    unet.disable_adapters()
    try:
        return evaluate(run.unet, run.components.noise_scheduler, run.eval_set)
    finally:
        unet.enable_adapters()


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
    timeline: Timeline = field(default_factory=Timeline)
    nonfinite_in_a_row: int = 0
    gradient_checkpointing: bool = False

    @property
    def unet(self):
        return self.models[0]


def train(args: argparse.Namespace) -> Path:
    """Run a full training; return the run directory."""
    timeline = Timeline()
    check_args(args)
    with timeline.phase("dataset check"):
        examples = load_training_examples(args, report_here=is_main_process())  # issue 19: one report per run
    run = prepare_run(args, examples, timeline)
    try:
        with StopRequest() as stop:
            train_loop(run, stop)
    except torch.cuda.OutOfMemoryError as error:
        raise TrainingError(out_of_memory_message(args, run.run_dir)) from error
    run_files.finish(run.accelerator, args, run.run_dir, run.state, run.models)
    if run.accelerator.is_main_process:
        run.timeline.write(run.run_dir / args.logging_dir / "timings.json")
    run.accelerator.end_training()
    if args.push_to_hub and run.accelerator.is_main_process:
        from utils.hub.publish import push_run_to_hub
        push_run_to_hub(run.run_dir, args.hub_model_id, private=args.hub_private)
    return run.run_dir


def is_main_process() -> bool:
    """Whether this is the main process of the launch, known before the Accelerator exists (issue 19)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).is_main_process


def prepare_run(args: argparse.Namespace, examples: list[Example], timeline: Timeline | None = None) -> Run:
    """Load the model, add LoRA, cache, build data, optimizer and schedule; resume if asked.

    Each phase is timed (logged at INFO with the first step); nothing that the first step does not need
    runs before it (the loss before training is measured at the end, with the adapters off)."""
    timeline = timeline or Timeline()
    with timeline.phase("imports"):
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

    with timeline.phase("model loading"):
        components = load_components(args.pretrained_model_name_or_path, args.revision, args.variant,
                                     weight_dtype, args.pretrained_vae_model_name_or_path, args.allow_pickle)
        if args.prediction_type:
            components.noise_scheduler.register_to_config(prediction_type=args.prediction_type)
        device = accelerator.device
        for module in [components.unet, components.vae, *components.text_encoders]:
            module.to(device)
    with timeline.phase("LoRA"):
        params = inject_lora(components, args)

    items = assign_buckets(train_examples, args.resolution, not args.no_buckets, args.seed)
    plan = evaluation_plan(args, sum(getattr(i.example, "repeats", 1) for i in items), accelerator.num_processes)
    logger.info("Evaluation: %s", plan.describe())
    with timeline.phase("evaluation set"):
        eval_items = assign_buckets(held_out or train_examples[:EVAL_IMAGES], args.resolution, False, args.seed)
        eval_set = build_eval_set(components, eval_items, plan, args, weight_dtype, device)
    batch_maker = BatchMaker(components, items, args, weight_dtype, device)
    if args.cache:
        with timeline.phase("caching"):
            fill_caches(batch_maker, items, args, accelerator)
    gradient_checkpointing = set_gradient_checkpointing(components, args, device, weight_dtype)

    sampler = BucketBatchSampler([item.bucket for item in items], args.train_batch_size, args.seed,
                                 repeats=[item.example.repeats for item in items])  # issue 19: kohya repeats
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
    with timeline.phase("accelerate prepare"):
        prepared = accelerator.prepare(*trained, optimizer, dataloader, lr_scheduler)
    models, (optimizer, dataloader, lr_scheduler) = list(prepared[:len(trained)]), prepared[len(trained):]
    components.unet = models[0]
    if args.train_text_encoder:
        components.text_encoders = models[1:]
    run_files.register_checkpoint_hooks(accelerator, args)

    state = run_files.TrainState(max_train_steps=max_train_steps, steps_per_epoch=steps_per_epoch)
    state.speed_info = {"resolved_gradient_checkpointing": gradient_checkpointing,
                        "eval_loss_plan": {"every_epochs": plan.every_epochs, "samples": plan.samples,
                                           "measurements": plan.measurements, "share_of_training": plan.share}}
    folders = folder_counts([item.example for item in items])  # issue 19: kohya repeats per folder
    state.dataset_info = {"num_train_images": len(items),
                          "images_per_epoch": sum(folder.images_per_epoch for folder in folders),
                          "folders": [folder.as_dict() for folder in folders],
                          "tag_frequency": run_files.tag_frequency([i.example.caption for i in items])}
    if args.resume_from_checkpoint:
        with timeline.phase("resume"):
            run_files.resume(accelerator, args, run_dir, state)
    run_files.write_experiment_config(accelerator, run_dir, args, state, len(items), len(held_out), mixed_precision)
    if accelerator.is_main_process and _trackers(args.report_to):
        accelerator.init_trackers("sdxl_lora", config=run_files.tracker_config(args))
    epoch_log, step_log = run_files.open_logs(run_dir, args, accelerator.is_main_process, state.global_step)
    if accelerator.is_main_process:  # issue 19: the dataset summary once per run
        logger.info("%d training images (%d held out), %d seen per epoch, %d optimizer steps, batch %d x %d "
                    "accumulation x %d processes", len(items), len(held_out), state.dataset_info["images_per_epoch"],
                    max_train_steps, args.train_batch_size, args.gradient_accumulation_steps,
                    accelerator.num_processes)
    return Run(args, accelerator, run_dir, components, models, params, optimizer, lr_scheduler, dataloader,
               sampler, batch_maker, eval_set, state, epoch_log, step_log, math.ceil(max_train_steps / steps_per_epoch),
               timeline=timeline, gradient_checkpointing=gradient_checkpointing)


def evaluation_plan(args: argparse.Namespace, num_items: int, num_processes: int) -> EvalPlan:
    """The fixed-noise loss's cadence and size for this run's planned training compute."""
    batches = math.ceil(num_items / args.train_batch_size)
    steps_per_epoch = math.ceil(math.ceil(batches / num_processes) / args.gradient_accumulation_steps)
    steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    effective_batch = args.train_batch_size * args.gradient_accumulation_steps * num_processes
    return plan_evaluation(steps * effective_batch, math.ceil(steps / steps_per_epoch), args.eval_loss_epochs,
                           args.eval_loss_samples)


def fill_caches(batch_maker: BatchMaker, items: list[Item], args: argparse.Namespace, accelerator) -> None:
    components = batch_maker.components
    model_id = f"{args.pretrained_model_name_or_path}|{args.pretrained_vae_model_name_or_path}|{args.revision}"
    cache_dir = run_files.cache_dir(args) if args.cache_latents_to_disk else None
    with accelerator.main_process_first():
        batch_maker.latent_cache = cache_latents(items, components.vae, args.center_crop, args.random_flip,
                                                 model_id, cache_dir)
    if not args.train_text_encoder:
        captions = [i.example.caption for i in items]
        with accelerator.main_process_first():
            batch_maker.text_cache = cached_text(captions, components, model_id, cache_dir)
    release_encoders(components, args, accelerator)


def cached_text(captions: list[str], components, model_id: str, cache_dir: Path | None) -> dict:
    """The text-embedding cache, read from ``cache_dir`` when an earlier run (e.g. of the same sweep)
    wrote it for the same model and captions, else computed (and written there)."""
    import hashlib
    import json

    from safetensors.torch import load_file, save_file

    from utils.core.atomic import replace_file

    distinct = sorted(set(captions))
    key = hashlib.sha256(json.dumps([model_id, distinct]).encode()).hexdigest()[:32]
    path = cache_dir / f"text_{key}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        stored = load_file(str(path))
        logger.info("Text embeddings read from %s", path)
        return {c: (stored["embeds"][i], stored["pooled"][i]) for i, c in enumerate(distinct)}
    cache = cache_text(distinct, components.tokenizers, components.text_encoders)
    if path is not None:
        stored = {"embeds": torch.stack([cache[c][0] for c in distinct]).contiguous(),
                  "pooled": torch.stack([cache[c][1] for c in distinct]).contiguous()}
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(path, lambda temporary: save_file(stored, str(temporary)))
    return cache


def train_loop(run: Run, stop: StopRequest) -> None:
    """Epochs are 0-based, as in the original. A step that ends an epoch is checkpointed (or stopped at)
    only after the epoch's own work (log row, best_model, checkpoint_epoch_N): a resumable state then
    never lies between an epoch's last step and its end-of-epoch files.

    Step losses stay on the device and are read every few steps (``StepLosses``), and wherever the loop
    needs them: at an epoch's end, before a checkpoint, on a stop."""
    state, accelerator, args = run.state, run.accelerator, run.args
    losses = StepLosses(read_interval(accelerator.device.type))
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
        record_losses(run, losses, progress)
        eval_loss = None
        if run.eval_set.plan.after_epoch(epoch, run.num_epochs - 1):
            eval_loss = evaluate(run.unet, run.components.noise_scheduler, run.eval_set)
        run_files.end_of_epoch(accelerator, args, run.run_dir, state, epoch, run.lr_scheduler.get_last_lr()[0],
                               eval_loss, run.epoch_log, run.components, run.models,
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
    if run.nonfinite_in_a_row >= run.args.max_nonfinite_steps:
        raise TrainingError(nonfinite_message(run))


def checkpoint_or_stop(run: Run, stop: StopRequest, progress, losses: StepLosses) -> None:
    """After an optimizer step: the resumable state every --checkpointing_steps, and the stop on a signal.
    With several processes the stop flag is exchanged only when the losses are read (no sync per step)."""
    checkpoint = run.args.checkpointing_steps and run.state.global_step % run.args.checkpointing_steps == 0
    if checkpoint:
        record_losses(run, losses, progress)
        run_files.save_checkpoint(run.accelerator, run.args, run.run_dir, run.state)
    exchange = run.accelerator.num_processes == 1 or not losses.pending
    if exchange and stop_requested(stop, run.accelerator):
        record_losses(run, losses, progress)
        progress.close()
        stop_now(run, stop)


def train_micro_step(run: Run, loader_batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of one batch; at an accumulation boundary, the optimizer step, skipped when
    the loss or the gradient is not finite. Returns (loss, skipped) as device tensors: nothing here waits
    for the device, unless the optimizer cannot skip a step by itself (see skip_on_device)."""
    args, accelerator, scheduler = run.args, run.accelerator, run.components.noise_scheduler
    skipped = torch.zeros((), dtype=torch.bool, device=accelerator.device)
    with accelerator.accumulate(*run.models):
        batch = run.batch_maker(loader_batch)
        noise = sample_noise(batch.latents, args.noise_offset)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch.latents.shape[0],),
                                  device=batch.latents.device).long()
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
