"""The run directory of a training: its name, config, CSV logs, model folders, checkpoints and resume.

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
import csv
import json
import logging
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from utils.core.atomic import write_json
from utils.lora.files import save_lora

logger = logging.getLogger(__name__)

SECRET_ARGS = {"hub_token", "token"}
CHECKPOINT_PREFIX = "checkpoint-"
EPOCH_LOG = "training_log.csv"  # the original's per-epoch log
STEP_LOG = "training_steps.csv"  # one row per optimizer step
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"  # the original's, in the logs and info files
RUN_STAMP_FORMAT = "%Y%m%d_%H%M%S"  # the original's, in the run folder's name and experiment_config.json


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


def run_name(args: argparse.Namespace, now: datetime | None = None) -> str:
    stamp = (now or datetime.now()).strftime(RUN_STAMP_FORMAT)
    return f"{stamp}_{args.dataset_type}_r{args.lora_rank}_a{args.lora_alpha}_lr{args.learning_rate}"


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


def open_run_dir(distributed_state, args: argparse.Namespace) -> Path:
    """The resumed run's folder, or a new unique one; the same path on every process."""
    from accelerate.utils import broadcast_object_list

    holder = [None]
    if distributed_state.is_main_process:
        checkpoint = find_checkpoint(args)
        args.resume_checkpoint_path = str(checkpoint) if checkpoint else None
        if checkpoint:
            run_dir = checkpoint.parent.parent
        else:
            run_dir = create_unique_dir(Path(args.output_dir), run_name(args))
        holder = [(str(run_dir), args.resume_checkpoint_path)]
    run_dir_text, args.resume_checkpoint_path = broadcast_object_list(holder)[0]
    return Path(run_dir_text)


def cache_dir(args: argparse.Namespace) -> Path:
    return Path(args.output_dir) / ".latent_cache"


# ----------------------------------------------------------------------------- config and log


def public_args(args: argparse.Namespace) -> dict:
    """The flags as a JSON-safe dict, secrets removed."""
    return {k: v for k, v in vars(args).items() if k not in SECRET_ARGS}


def command_line(argv: list[str] | None = None) -> str:
    """The command that started this process, with the values of secret flags replaced by '***'."""
    argv = list(sys.argv if argv is None else argv)
    shown, hide_next = [Path(argv[0]).name], False
    for arg in argv[1:]:
        flag = arg.split("=", 1)[0].lstrip("-")
        if hide_next:
            shown.append("***")
        elif flag in SECRET_ARGS and "=" in arg:
            shown.append(arg.split("=", 1)[0] + "=***")
        else:
            shown.append(arg)
        hide_next = flag in SECRET_ARGS and "=" not in arg and not hide_next
    return " ".join(shown)


def tracker_config(args: argparse.Namespace) -> dict:
    """Trackers accept only scalars and strings."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in public_args(args).items()}


def run_timestamp(run_dir: Path) -> str:
    """The run's start as the original wrote it (``YYYYmmdd_HHMMSS``), read from the folder's name."""
    stamp = run_dir.name[:len("YYYYmmdd_HHMMSS")]
    try:
        datetime.strptime(stamp, RUN_STAMP_FORMAT)
        return stamp
    except ValueError:
        return datetime.now().strftime(RUN_STAMP_FORMAT)


def write_experiment_config(accelerator, run_dir: Path, args, state: TrainState, num_images: int,
                            num_held_out: int, mixed_precision: str) -> None:
    if not accelerator.is_main_process:
        return
    import diffusers
    import peft

    config = public_args(args)
    config.update(experiment_name=run_dir.name, timestamp=run_timestamp(run_dir))
    config.update(
        num_train_images=num_images,
        num_held_out_images=num_held_out,
        images_seen_per_epoch=state.dataset_info.get("images_per_epoch", num_images),  # issue 19: kohya repeats
        dataset_folders=state.dataset_info.get("folders", []),
        max_train_steps=state.max_train_steps,
        steps_per_epoch=state.steps_per_epoch,
        effective_batch_size=args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes,
        num_processes=accelerator.num_processes,
        resolved_mixed_precision=mixed_precision,
        lora_scale=args.lora_alpha / (math.sqrt(args.lora_rank) if args.use_rslora else args.lora_rank),
        command=command_line(),
        versions={"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__},
    )
    config.update(state.speed_info)  # issue 15: resolved gradient checkpointing and evaluation plan
    write_json(run_dir / "experiment_config.json", config)


class CsvLog:
    """A CSV log under ``logs/`` with the original's columns, written by the main process a row at a time.

    ``training_log.csv`` gets one row per epoch, ``training_steps.csv`` one per optimizer step. On resume,
    rows written after the checkpoint's step belong to the lost future and are dropped, so the run
    writes each of them again exactly once.
    """

    FIELDS = ["epoch", "step", "loss", "learning_rate", "timestamp"]

    def __init__(self, path: Path, enabled: bool, keep_until_step: int = 0):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.read(path) if path.exists() else []
        rows = [row for row in rows if int(row["step"]) <= keep_until_step]
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    @staticmethod
    def read(path: Path) -> list[dict]:
        with open(path, newline="") as handle:
            return [row for row in csv.DictReader(handle) if row.get("step")]

    def append(self, epoch: int, step: int, loss: float, learning_rate: float) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as handle:
            csv.writer(handle).writerow([epoch, step, loss, learning_rate, log_timestamp()])


def log_timestamp() -> str:
    return datetime.now().strftime(TIMESTAMP_FORMAT)


def open_logs(run_dir: Path, args: argparse.Namespace, enabled: bool, keep_until_step: int) -> tuple[CsvLog, CsvLog]:
    """(per-epoch log, per-step log) of the run, cut back to ``keep_until_step``."""
    folder = run_dir / args.logging_dir
    return (CsvLog(folder / EPOCH_LOG, enabled, keep_until_step), CsvLog(folder / STEP_LOG, enabled, keep_until_step))


def plot_losses(run_dir: Path, args: argparse.Namespace) -> None:
    from utils.inference.grids import find_loss_log, plot_loss_curve

    log = find_loss_log(run_dir / args.logging_dir)
    if log is not None:
        plot_loss_curve(log, run_dir / args.logging_dir / "loss_curve.png")


# ----------------------------------------------------------------------------- model folders


def unwrapped(accelerator, models: list) -> tuple:
    models = [accelerator.unwrap_model(m) for m in models]
    return models[0], (models[1:] or None)


def save_model_folder(accelerator, folder: Path, models: list, args, state: TrainState, info_name: str | None,
                      info: dict) -> None:
    """Write a LoRA folder (diffusers format) and, beside the weights, its info JSON."""
    if not accelerator.is_main_process:
        return
    unet, text_encoders = unwrapped(accelerator, models)
    kohya_copy = None
    if args.save_kohya:
        from utils.lora.kohya import save_kohya_copy
        kohya_copy = lambda staging: save_kohya_copy(staging, unet.config, title=folder.parent.name)  # noqa: E731
    save_lora(folder, unet, text_encoders, training_metadata=lora_metadata(args, state), extra_files=kohya_copy)
    if info_name:
        write_json(folder / info_name, info)


def lora_metadata(args: argparse.Namespace, state: TrainState) -> dict:
    """Facts about the training stored in the LoRA file's header (no secrets, no local paths but the model's)."""
    return {
        "base_model": args.pretrained_model_name_or_path,
        "base_model_version": "sdxl_base_v1-0",
        "num_train_images": state.dataset_info.get("num_train_images"),
        "tag_frequency": state.dataset_info.get("tag_frequency"),
        "epoch": math.ceil(state.global_step / state.steps_per_epoch),
        "max_train_steps": state.max_train_steps,
        "train_batch_size": args.train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "lr_scheduler": args.lr_scheduler,
        "optimizer": args.optimizer,
        "mixed_precision": args.mixed_precision,
        "seed": args.seed,
        "noise_offset": args.noise_offset,
        "snr_gamma": args.snr_gamma,
        "lora_target_modules": args.lora_target_modules,
        "training_command": command_line(),
        "lora_rank": args.lora_rank,
        "lora_alpha": args.lora_alpha,
        "use_rslora": args.use_rslora,
        "use_dora": args.use_dora,
        "resolution": args.resolution,
        "learning_rate": args.learning_rate,
        "steps": state.global_step,
        "train_text_encoder": args.train_text_encoder,
    }


def end_of_epoch(accelerator, args, run_dir: Path, state: TrainState, epoch: int, learning_rate: float,
                 eval_loss: float | None, epoch_log: CsvLog, components, models: list,
                 select_by: str = "eval_loss") -> None:
    """After epoch ``epoch`` (0-based): the original's log row, best_model/ and checkpoint_epoch_{epoch}/,
    then the loss plot and validation images.

    best_model: with ``select_by`` 'eval_loss' only epochs that measured the fixed-noise loss compete;
    with 'train_loss' (evaluation off), the original's rule, the lowest mean training loss."""
    losses = state.epoch_losses
    train_loss = sum(losses) / len(losses) if losses else math.nan
    if eval_loss is not None:
        state.last_eval_loss = eval_loss
    metric_name = select_by
    metric = (eval_loss if eval_loss is not None else math.nan) if select_by == "eval_loss" else train_loss
    logger.info("epoch %d: mean train loss %.5f, fixed-noise eval loss %s", epoch, train_loss,
                f"{eval_loss:.5f}" if eval_loss is not None else "n/a")
    if eval_loss is not None:
        accelerator.log({"eval_loss": eval_loss}, step=state.global_step)
    timestamp = log_timestamp()
    epoch_log.append(epoch, state.global_step, train_loss, learning_rate)
    extra = {"step": state.global_step, "train_loss": train_loss, "eval_loss": eval_loss}
    if math.isfinite(metric) and metric < state.best_metric:
        state.best_metric, state.best_epoch = metric, epoch
        info = {"epoch": epoch, "loss": train_loss, "learning_rate": learning_rate, "timestamp": timestamp,
                **extra, "selected_by": metric_name}
        save_model_folder(accelerator, run_dir / "best_model", models, args, state, "best_model_info.json", info)
    if args.save_steps and (epoch + 1) % args.save_steps == 0:
        info = {"epoch": epoch, "global_step": state.global_step, "loss": train_loss, "learning_rate": learning_rate,
                "timestamp": timestamp, **extra}
        save_model_folder(accelerator, run_dir / f"checkpoint_epoch_{epoch}", models, args, state,
                          "checkpoint_info.json", info)
        if accelerator.is_main_process:
            plot_losses(run_dir, args)
    if args.validation_prompt and (epoch + 1) % args.validation_epochs == 0:
        from utils.training.validation import log_validation_images
        log_validation_images(accelerator, args, run_dir, components, models, epoch + 1, state.global_step)


def finish(accelerator, args, run_dir: Path, state: TrainState, models: list) -> None:
    accelerator.wait_for_everyone()
    save_model_folder(accelerator, run_dir / "final_model", models, args, state, "final_model_info.json",
                      {"step": state.global_step, "initial_eval_loss": state.initial_eval_loss,
                       "final_eval_loss": state.last_eval_loss, "best_epoch": state.best_epoch,
                       "skipped_nonfinite_steps": state.skipped_steps})
    if accelerator.is_main_process:
        plot_losses(run_dir, args)
        logger.info("Finished: %s", run_dir / "final_model")


# ----------------------------------------------------------------------------- resumable checkpoints


def register_checkpoint_hooks(accelerator, args: argparse.Namespace) -> None:
    """accelerate's save_state/load_state keep only the LoRA weights of the trained models, not whole UNets."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    def name_of(index: int) -> str:
        return ["unet", "text_encoder", "text_encoder_2"][index]

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for index, model in enumerate(models):
                lora = get_peft_model_state_dict(accelerator.unwrap_model(model))
                save_file({k: v.contiguous() for k, v in lora.items()},
                          os.path.join(output_dir, f"lora_{name_of(index)}.safetensors"))
        weights.clear()

    def load_hook(models, input_dir):
        for index, model in enumerate(list(models)):
            lora = load_file(os.path.join(input_dir, f"lora_{name_of(index)}.safetensors"))
            result = set_peft_model_state_dict(accelerator.unwrap_model(model), lora)
            if getattr(result, "unexpected_keys", None):
                raise RuntimeError(f"{input_dir}: unexpected LoRA keys {result.unexpected_keys[:3]}")
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def checkpoints_of(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a half-written one has no training_state.json)."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / "training_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def find_checkpoint(args: argparse.Namespace) -> Path | None:
    """Resolve --resume_from_checkpoint: a checkpoint folder, a run folder, or 'latest'."""
    wanted = args.resume_from_checkpoint
    if not wanted:
        return None
    if wanted != "latest":
        path = Path(wanted)
        if (path / "training_state.json").is_file():
            return path
        if checkpoints_of(path):
            return checkpoints_of(path)[-1]
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no training_state.json) or run folder")
    suffix = run_name(args)[len("YYYYmmdd_HHMMSS"):]
    runs = [p for p in Path(args.output_dir).glob(f"*{suffix}*") if p.is_dir() and checkpoints_of(p)]
    if not runs:
        logger.warning("--resume_from_checkpoint latest: no checkpoint in %s for this configuration; "
                       "starting a new run", args.output_dir)
        return None
    newest = max((checkpoints_of(run)[-1] for run in runs), key=lambda p: p.stat().st_mtime)
    return newest


def save_checkpoint(accelerator, args, run_dir: Path, state: TrainState) -> Path:
    """accelerate state (LoRA, optimizer, scheduler, RNG) written to a temp folder, renamed when complete."""
    final = run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{state.global_step}"
    staging = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()  # every process has written its part (its RNG state) before the rename
    if accelerator.is_main_process:
        write_json(staging / "training_state.json", asdict(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        prune_checkpoints(run_dir, args.checkpoints_total_limit)
        logger.info("Saved resumable state to %s", final)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(run_dir: Path, limit: int | None) -> None:
    if not limit:
        return
    for old in checkpoints_of(run_dir)[:-limit]:
        shutil.rmtree(old, ignore_errors=True)


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """How often each comma-separated tag appears in the captions (kohya's ss_tag_frequency)."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in {t.strip() for t in caption.split(",") if t.strip()}:
            counts[tag] = counts.get(tag, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def resume(accelerator, args, run_dir: Path, state: TrainState) -> None:
    path = args.resume_checkpoint_path
    if not path:
        return
    saved = json.loads((Path(path) / "training_state.json").read_text())
    if saved["steps_per_epoch"] != state.steps_per_epoch:
        raise RuntimeError(f"{path}: saved with {saved['steps_per_epoch']} steps per epoch, this run has "
                           f"{state.steps_per_epoch}; resume with the same dataset, batch size and processes")
    accelerator.load_state(path)
    for key in ("global_step", "best_metric", "best_epoch", "initial_eval_loss", "last_eval_loss", "skipped_steps"):
        setattr(state, key, saved[key])
    state.epoch_losses = list(saved.get("epoch_losses", []))
    logger.info("Resumed from %s at step %d", path, state.global_step)
