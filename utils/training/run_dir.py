"""The run directory of a training: its name, its config and its LoRA folders.

The loss logs are in loss_log.py, the end-of-epoch policy in epochs.py, resumable checkpoints in
checkpoints.py.

    {output_dir}/{YYYYmmdd_HHMMSS}_{dataset_type}_r{rank}_a{alpha}_lr{lr}[_N]/
        experiment_config.json           every flag + experiment_name and timestamp (the original's)
        logs/training_log.csv            the original's: one row per epoch (0-based), loss = the epoch's mean
        logs/training_steps.csv          the same columns, one row per optimizer step (an addition)
        logs/loss_curve.png, tensorboard events
        best_model/ (+ best_model_info.json)
        checkpoint_epoch_{E}/ (+ checkpoint_info.json), E the 0-based epoch, saved when (E + 1) % save_steps == 0
        final_model/ (+ final_model_info.json)
        checkpoints/checkpoint-{step}/   resumable accelerate state
        validation/epoch_{N}_{k}.png     N counts finished epochs
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from utils.core.atomic import write_json, write_text
from utils.core.names import CONFIG_FILE, RUN_STAMP_FORMAT, SDXL_BASE_MODEL_VERSION
from utils.core.secrets import mask_argv
from utils.lora.files import save_lora
from utils.training.config_file import RUN_CONFIG_FILE, config_toml
from utils.training.ema import RAW_WEIGHT_NAME, weights_of


@dataclass
class TrainState:
    max_train_steps: int
    steps_per_epoch: int
    global_step: int = 0
    best_metric: float = math.inf
    best_epoch: int = 0
    initial_eval_loss: float | None = None
    last_eval_loss: float | None = None
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient
    epoch_losses: list = field(default_factory=list)  # finite step losses of the current epoch so far
    dataset_info: dict = field(default_factory=dict)  # image count and caption tag frequencies
    speed_info: dict = field(default_factory=dict)  # resolved speed settings (checkpointing, evaluation plan)


# ----------------------------------------------------------------------------- naming


def run_name(args: argparse.Namespace, dataset_type: str, now: datetime | None = None) -> str:
    """The run folder's name, from the resolved dataset type and the flags as given (the learning rate
    before --scale_lr)."""
    stamp = (now or datetime.now()).strftime(RUN_STAMP_FORMAT)
    return f"{stamp}_{dataset_type}_r{args.lora_rank}_a{args.lora_alpha}_lr{args.learning_rate}"


def create_unique_dir(parent: Path, name: str) -> Path:
    """mkdir is atomic, so two runs starting in the same second get different folders."""
    parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        candidate = parent / (name if attempt == 1 else f"{name}_{attempt}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"{parent}: could not create a unique run directory for {name}")


def cache_dir(args: argparse.Namespace) -> Path:
    return Path(args.output_dir) / ".latent_cache"


# ----------------------------------------------------------------------------- config


def command_line(argv: list[str] | None = None) -> str:
    """The command that started this process, with the values of secret flags replaced by '***'."""
    argv = list(sys.argv if argv is None else argv)
    return " ".join([Path(argv[0]).name, *mask_argv(argv[1:])])


def tracker_config(settings) -> dict:
    """Trackers accept only scalars and strings."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in settings.as_config().items()}


def run_timestamp(run_dir: Path) -> str:
    """The run's start as the original wrote it (``YYYYmmdd_HHMMSS``), read from the folder's name."""
    stamp = run_dir.name[:len("YYYYmmdd_HHMMSS")]
    try:
        datetime.strptime(stamp, RUN_STAMP_FORMAT)
        return stamp
    except ValueError:
        return datetime.now().strftime(RUN_STAMP_FORMAT)


def write_experiment_config(accelerator, settings, state: TrainState, num_images: int, num_held_out: int,
                            mixed_precision: str) -> None:
    """experiment_config.json: every flag (derived values resolved), the original's experiment_name and
    timestamp, and the facts of this run."""
    if not accelerator.is_main_process:
        return
    import diffusers
    import peft

    run_dir = settings.run_dir
    config = settings.as_config()
    config.update(experiment_name=run_dir.name, timestamp=run_timestamp(run_dir))
    config.update(
        num_train_images=num_images,
        num_held_out_images=num_held_out,
        images_seen_per_epoch=state.dataset_info.get("images_per_epoch", num_images),  # issue 19: kohya repeats
        dataset_folders=state.dataset_info.get("folders", []),
        **state.dataset_info.get("regularisation", {}),  # --reg_data_dir: listed, used, seen per epoch
        max_train_steps=state.max_train_steps,
        steps_per_epoch=state.steps_per_epoch,
        effective_batch_size=settings.train_batch_size * settings.gradient_accumulation_steps
        * accelerator.num_processes,
        num_processes=accelerator.num_processes,
        resolved_mixed_precision=mixed_precision,
        lora_scale=settings.lora_alpha / (math.sqrt(settings.lora_rank) if settings.use_rslora
                                          else settings.lora_rank),
        command=command_line(),
        versions={"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__},
    )
    config.update(state.speed_info)  # issue 15: resolved gradient checkpointing and evaluation plan
    write_json(run_dir / CONFIG_FILE, config)
    write_text(run_dir / RUN_CONFIG_FILE, config_toml(settings.args))


# ----------------------------------------------------------------------------- model folders


def unwrapped(accelerator, models: list) -> tuple:
    models = [accelerator.unwrap_model(m) for m in models]
    return models[0], (models[1:] or None)


def save_model_folder(accelerator, folder: Path, models: list, settings, state: TrainState, info_name: str | None,
                      info: dict, ema=None) -> None:
    """Write a LoRA folder (diffusers format) and, beside the weights, its info JSON. With ``ema`` the folder's
    model is the moving average, and the raw weights are kept beside it (``raw_lora_weights.safetensors``)."""
    if not accelerator.is_main_process:
        return
    unet, text_encoders = unwrapped(accelerator, models)
    metadata = lora_metadata(settings, state)
    copies = []
    if settings.save_kohya or settings.lora_type != "lora":  # LoHa/LoKr: the copy other tools read
        from utils.lora.lycoris_files import save_kohya_copy
        copies.append(lambda staging: save_kohya_copy(staging, unet.config, title=folder.parent.name))
    info = {**info, "lora_type": settings.lora_type, "adapter_weights": "ema" if ema is not None else "raw"}
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.raw.") as raw_dir:
        if ema is not None:
            raw = save_lora(Path(raw_dir) / "raw", unet, text_encoders, {**metadata, "adapter_weights": "raw"})
            copies.append(lambda staging: shutil.copyfile(raw, staging / RAW_WEIGHT_NAME))
            info.update(raw_weights_file=RAW_WEIGHT_NAME, ema_decay=settings.ema_decay)
        with weights_of(ema):
            save_lora(folder, unet, text_encoders, training_metadata={**metadata, "adapter_weights": info[
                "adapter_weights"]}, extra_files=lambda staging: [copy(staging) for copy in copies])
    if info_name:
        write_json(folder / info_name, info)


def lora_metadata(settings, state: TrainState) -> dict:
    """Facts about the training stored in the LoRA file's header (no secrets, no local paths but the model's)."""
    return {
        "base_model": settings.pretrained_model_name_or_path,
        "base_model_version": SDXL_BASE_MODEL_VERSION,
        "num_train_images": state.dataset_info.get("num_train_images"),
        "tag_frequency": state.dataset_info.get("tag_frequency"),
        "epoch": math.ceil(state.global_step / state.steps_per_epoch),
        "max_train_steps": state.max_train_steps,
        "train_batch_size": settings.train_batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "lr_scheduler": settings.lr_scheduler,
        "optimizer": settings.optimizer,
        "mixed_precision": settings.mixed_precision,
        "seed": settings.seed,
        "noise_offset": settings.noise_offset,
        "snr_gamma": settings.snr_gamma,
        "lora_target_modules": settings.lora_target_modules,
        "training_command": command_line(),
        "lora_rank": settings.lora_rank,
        "lora_alpha": settings.lora_alpha,
        "use_rslora": settings.use_rslora,
        "use_dora": settings.use_dora,
        "lora_type": settings.lora_type,
        "lokr_factor": settings.lokr_factor if settings.lora_type == "lokr" else None,
        "lokr_decompose_both": settings.lokr_decompose_both if settings.lora_type == "lokr" else None,
        "loraplus_lr_ratio": settings.loraplus_lr_ratio,
        "use_ema": settings.use_ema,
        "resolution": settings.resolution,
        "learning_rate": settings.learning_rate,
        "steps": state.global_step,
        "train_text_encoder": settings.train_text_encoder,
    }


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """How often each comma-separated tag appears in the captions (kohya's ss_tag_frequency)."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in {t.strip() for t in caption.split(",") if t.strip()}:
            counts[tag] = counts.get(tag, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
