"""Setting up a training: flag checks before any work, the model with LoRA, the data, the optimizer and
schedule, accelerate, and the run's starting state (resumed if asked). ``prepare_run`` does it all."""

from __future__ import annotations

import argparse
import logging
import math
import random
from dataclasses import dataclass, field

import torch

from utils.core.sdxl import DTYPES, check_model_source, load_components, resolve_mixed_precision
from utils.data.records import Example
from utils.data.regularisation import balance
from utils.training.batches import BucketBatchSampler, IndexDataset, PixelDataset, assign_buckets
from utils.training.caching import fill_caches
from utils.training.dataset_info import dataset_info, dataset_line
from utils.training.checkpoints import register_checkpoint_hooks, resume
from utils.training.ema import AdapterEMA
from utils.training.evaluation import EvalPlan, EvalSet, build_eval_set, evaluation_plan
from utils.training.experiment_config import tracker_config, write_experiment_config
from utils.training.loss_log import CsvLog, open_logs
from utils.training.memory import choose_gradient_checkpointing, estimate_activation_bytes
from utils.training.model_inputs import BatchMaker
from utils.training.settings import RunSettings, TrainingError
from utils.training.style_checks import check_style_args
from utils.training.state import TrainState
from utils.training.timeline import Timeline

logger = logging.getLogger(__name__)

TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
EVAL_IMAGES = 8  # training images used for the fixed-noise loss when nothing is held out


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
    check_style_args(args)
    if args.save_kohya and args.use_dora:
        raise TrainingError("--save_kohya cannot be combined with --use_dora: the kohya format has no exact "
                            "equivalent of PEFT's DoRA magnitudes")
    check_adapter_args(args)
    if args.push_to_hub:
        from utils.hub.publish import check_hub_target
        if not args.hub_model_id:
            raise TrainingError("--push_to_hub needs --hub_model_id namespace/name")
        check_hub_target(args.hub_model_id)


def check_adapter_args(args: argparse.Namespace) -> None:
    """--lora_type, LoRA+ and EMA flags that cannot work together."""
    lycoris = args.lora_type != "lora"
    for flag, used in (("--use_dora", args.use_dora), ("--use_rslora", args.use_rslora),
                       ("--loraplus_lr_ratio", args.loraplus_lr_ratio is not None),
                       ("--lora_dropout", args.lora_dropout > 0)):
        if lycoris and used:
            raise TrainingError(f"{flag} applies to --lora_type lora only (LoHa/LoKr have no up/down pair "
                                f"of that kind), not to --lora_type {args.lora_type}")
    if args.loraplus_lr_ratio is not None and args.loraplus_lr_ratio <= 0:
        raise TrainingError(f"--loraplus_lr_ratio {args.loraplus_lr_ratio} must be positive")
    if args.lokr_factor == 0 or args.lokr_factor < -1:
        raise TrainingError(f"--lokr_factor {args.lokr_factor} must be -1 (automatic) or a positive size")
    if not 0.0 < args.ema_decay < 1.0:
        raise TrainingError(f"--ema_decay {args.ema_decay} must be in (0, 1)")
    if args.ema_update_every < 1:
        raise TrainingError(f"--ema_update_every {args.ema_update_every} must be at least 1")


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
    """PEFT's LoraConfig (or LoHaConfig/LoKrConfig for --lora_type) from the flags, for the target modules."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig
    if args.lora_type == "loha":
        return LoHaConfig(r=args.lora_rank, alpha=args.lora_alpha, target_modules=target_modules)
    if args.lora_type == "lokr":
        return LoKrConfig(r=args.lora_rank, alpha=args.lora_alpha, target_modules=target_modules,
                          decompose_factor=args.lokr_factor, decompose_both=args.lokr_decompose_both)
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


def loraplus_groups(models: list, params: list[torch.nn.Parameter], args: argparse.Namespace,
                    learning_rate: float | None = None) -> list:
    """The parameters, or with --loraplus_lr_ratio two groups: the up (lora_B) matrices at ratio x the rate.
    ``learning_rate``: the run's rate (after --scale_lr); by default --learning_rate."""
    if args.loraplus_lr_ratio is None:
        return params
    rate = args.learning_rate if learning_rate is None else learning_rate
    up = {id(p) for model in models for name, p in model.named_parameters() if ".lora_B." in name}
    return [{"params": [p for p in params if id(p) not in up], "lr": rate},
            {"params": [p for p in params if id(p) in up], "lr": rate * args.loraplus_lr_ratio}]


def make_optimizer(args: argparse.Namespace, params: list, learning_rate: float | None = None) -> torch.optim.Optimizer:
    """The --optimizer over the LoRA parameters (or parameter groups), at ``learning_rate`` (the run's rate,
    after --scale_lr; by default --learning_rate)."""
    rate = args.learning_rate if learning_rate is None else learning_rate
    kwargs = dict(lr=rate, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                  eps=args.adam_epsilon)
    if args.optimizer == "adamw8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, **kwargs)
    if args.optimizer == "prodigy":
        import prodigyopt
        return prodigyopt.Prodigy(params, lr=rate, betas=kwargs["betas"], weight_decay=args.adam_weight_decay)
    # Fused: one kernel per step, and it can skip a step on the device (see skip_on_device).
    flat = [p for group in params for p in group["params"]] if params and isinstance(params[0], dict) else params
    fused = all(p.device.type in ("cuda", "cpu") and p.dtype == torch.float32 for p in flat)
    return torch.optim.AdamW(params, fused=fused, **kwargs)


# ----------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything the training loop works with, set up by ``prepare_run``."""

    settings: RunSettings
    accelerator: object
    components: object
    models: list
    params: list
    optimizer: object
    lr_scheduler: object
    dataloader: object
    sampler: BucketBatchSampler
    batch_maker: BatchMaker
    eval_set: EvalSet
    state: TrainState
    num_epochs: int
    timeline: Timeline = field(default_factory=Timeline)
    gradient_checkpointing: bool = False
    epoch_log: CsvLog | None = None  # logs/training_log.csv, the original's: one row per epoch
    step_log: CsvLog | None = None  # logs/training_steps.csv: one row per optimizer step
    nonfinite_in_a_row: int = 0
    ema: AdapterEMA | None = None  # --use_ema: the moving average of the adapter weights

    @property
    def unet(self):
        return self.models[0]


def prepare_run(settings: RunSettings, examples: list[Example], timeline: Timeline | None = None,
                reg_examples: list[Example] = ()) -> Run:
    """Load the model, add LoRA, cache, build data, optimizer and schedule; resume if asked.
    ``reg_examples`` (--reg_data_dir) join the training items after kohya's balancing.

    Each phase is timed (logged at INFO with the first step); nothing that the first step does not need
    runs before it (the loss before training is measured at the end, with the adapters off)."""
    timeline = timeline or Timeline()
    with timeline.phase("imports"):
        import accelerate  # noqa: F401  (timed here; used below)
        import diffusers.optimization  # noqa: F401
    train_examples, held_out = split_examples(examples, settings.args.validation_split, settings.args.seed)
    mixed_precision = resolve_mixed_precision(settings.args.mixed_precision)
    weight_dtype = DTYPES[mixed_precision]
    accelerator = _accelerator(settings, mixed_precision)
    components, params = _load_models(settings, accelerator.device, weight_dtype, timeline)
    items = assign_buckets(train_examples + balance(train_examples, list(reg_examples)), settings.args.resolution,
                           not settings.args.no_buckets, settings.args.seed)
    plan = evaluation_plan(settings.args, sum(getattr(i.example, "repeats", 1) for i in items), accelerator.num_processes)
    logger.info("Evaluation: %s", plan.describe())
    with timeline.phase("evaluation set"):
        eval_items = assign_buckets(held_out or train_examples[:EVAL_IMAGES], settings.args.resolution, False,
                                    settings.args.seed)
        eval_set = build_eval_set(components, eval_items, plan, settings.args, weight_dtype, accelerator.device)
    batch_maker = BatchMaker(components, items, settings.args, weight_dtype, accelerator.device)
    if settings.args.cache:
        with timeline.phase("caching"):
            fill_caches(batch_maker, items, settings.args, accelerator)
    gradient_checkpointing = set_gradient_checkpointing(components, settings.args, accelerator.device, weight_dtype)
    sampler, dataloader = _loader(settings, items)
    groups = loraplus_groups([components.unet, *components.text_encoders], params, settings.args, settings.learning_rate)
    optimizer, lr_scheduler, steps_per_epoch, max_train_steps = _schedule(settings, groups, len(dataloader),
                                                                          accelerator.num_processes)
    with timeline.phase("accelerate prepare"):
        models, optimizer, dataloader, lr_scheduler = _prepare(accelerator, settings, components, optimizer,
                                                               dataloader, lr_scheduler)
    run = Run(settings, accelerator, components, models, params, optimizer, lr_scheduler, dataloader, sampler,
              batch_maker, eval_set, TrainState(max_train_steps=max_train_steps, steps_per_epoch=steps_per_epoch),
              math.ceil(max_train_steps / steps_per_epoch), timeline=timeline,
              gradient_checkpointing=gradient_checkpointing,
              ema=AdapterEMA(params, settings.args.ema_decay, settings.args.ema_update_every) if settings.args.use_ema else None)
    state_info = dataset_info(items, len(reg_examples))
    _start(run, state_info, held_out, plan, mixed_precision)
    return run


def _accelerator(settings: RunSettings, mixed_precision: str):
    """The Accelerator, logging into the run folder; the seed and TF32 set."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    run_dir = settings.run_dir
    accelerator = Accelerator(
        gradient_accumulation_steps=settings.args.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=_trackers(settings.args.report_to) or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / settings.args.logging_dir)),
    )
    logger.info("Run directory: %s", run_dir)
    set_seed(settings.args.seed)
    if settings.args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def _load_models(settings: RunSettings, device: torch.device, weight_dtype: torch.dtype, timeline: Timeline):
    """(components, trainable LoRA parameters): SDXL loaded frozen onto the device, LoRA injected."""
    with timeline.phase("model loading"):
        components = load_components(settings.args.pretrained_model_name_or_path, settings.args.revision, settings.args.variant,
                                     weight_dtype, settings.args.pretrained_vae_model_name_or_path, settings.args.allow_pickle)
        if settings.args.prediction_type:
            components.noise_scheduler.register_to_config(prediction_type=settings.args.prediction_type)
        for module in [components.unet, components.vae, *components.text_encoders]:
            module.to(device)
    with timeline.phase("LoRA"):
        params = inject_lora(components, settings.args)
    return components, params


def _loader(settings: RunSettings, items: list) -> tuple[BucketBatchSampler, torch.utils.data.DataLoader]:
    """Batches of one bucket each, in a seeded order; dataset indices when cached, else pixels."""
    sampler = BucketBatchSampler([item.bucket for item in items], settings.args.train_batch_size, settings.args.seed,
                                 repeats=[item.example.repeats for item in items])  # issue 19: kohya repeats
    dataset = (IndexDataset(len(items)) if settings.args.cache
               else PixelDataset(items, settings.args.center_crop, settings.args.masked_loss))
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=settings.args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(settings.args.seed),  # keeps the global RNG untouched for resume
    )
    return sampler, dataloader


def _schedule(settings: RunSettings, params: list, num_batches: int, num_processes: int):
    """(optimizer, learning-rate scheduler, steps per epoch, total optimizer steps)."""
    from diffusers.optimization import get_scheduler

    optimizer = make_optimizer(settings.args, params, settings.learning_rate)
    steps_per_epoch = math.ceil(math.ceil(num_batches / num_processes) / settings.args.gradient_accumulation_steps)
    max_train_steps = settings.args.max_train_steps or settings.args.num_train_epochs * steps_per_epoch
    if settings.args.lr_warmup_steps >= max_train_steps:
        logger.warning("--lr_warmup_steps %d is not below the %d training steps: the learning rate never "
                       "leaves warm-up", settings.args.lr_warmup_steps, max_train_steps)
    # accelerate steps a prepared scheduler once per process per optimizer step.
    lr_scheduler = get_scheduler(settings.args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=settings.args.lr_warmup_steps * num_processes,
                                 num_training_steps=max_train_steps * num_processes)
    return optimizer, lr_scheduler, steps_per_epoch, max_train_steps


def _prepare(accelerator, settings: RunSettings, components, optimizer, dataloader, lr_scheduler):
    """accelerate.prepare of the trained models and the training objects; checkpoints keep only LoRA."""
    trained = [components.unet] + (components.text_encoders if settings.args.train_text_encoder else [])
    prepared = accelerator.prepare(*trained, optimizer, dataloader, lr_scheduler)
    models, (optimizer, dataloader, lr_scheduler) = list(prepared[:len(trained)]), prepared[len(trained):]
    components.unet = models[0]
    if settings.args.train_text_encoder:
        components.text_encoders = models[1:]
    register_checkpoint_hooks(accelerator)
    return models, optimizer, dataloader, lr_scheduler


def _start(run: Run, info: dict, held_out: list, plan: EvalPlan, mixed_precision: str) -> None:
    """The run's starting state (resumed if asked), experiment_config.json, trackers and loss logs."""
    settings, accelerator, state = run.settings, run.accelerator, run.state
    state.speed_info = {"resolved_gradient_checkpointing": run.gradient_checkpointing,
                        "eval_loss_plan": {"every_epochs": plan.every_epochs, "samples": plan.samples,
                                           "measurements": plan.measurements, "share_of_training": plan.share}}
    state.dataset_info = info
    if settings.args.resume_from_checkpoint:
        with run.timeline.phase("resume"):
            resume(accelerator, settings, state, run.ema)
    write_experiment_config(accelerator, settings, state, info["num_train_images"], len(held_out), mixed_precision)
    if accelerator.is_main_process and _trackers(settings.args.report_to):
        accelerator.init_trackers("sdxl_lora", config=tracker_config(settings))
    run.epoch_log, run.step_log = open_logs(settings.run_dir, settings.args.logging_dir, accelerator.is_main_process,
                                            state.global_step)
    if accelerator.is_main_process:  # issue 19: the dataset summary once per run
        logger.info("%s, batch %d x %d accumulation x %d processes",
                    dataset_line(info, len(held_out), state.max_train_steps, settings.args.prior_loss_weight),
                    settings.args.train_batch_size, settings.args.gradient_accumulation_steps, accelerator.num_processes)
