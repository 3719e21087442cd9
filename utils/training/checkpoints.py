"""Resumable checkpoints: ``checkpoints/checkpoint-{step}/`` (accelerate state with the LoRA weights, the
optimizer, the scheduler and the RNGs, plus training_state.json), written atomically, and resume.

``save_checkpoint`` reads the run's layout, its state and ``--checkpoints_total_limit``; ``resume`` the
checkpoint to load; ``resume_point`` the flags that name the run (--resume_from_checkpoint, --output_dir,
the rank, alpha and learning rate)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from utils.core.layout import CHECKPOINT_LORA_FILES, CONFIG_FILE, FINAL_MODEL, TRAINING_STATE_FILE, RunLayout, run_name

logger = logging.getLogger(__name__)

RESTORED = ("global_step", "best_metric", "best_epoch", "initial_eval_loss", "last_eval_loss", "skipped_steps")


def register_checkpoint_hooks(accelerator) -> None:
    """accelerate's save_state/load_state keep only the LoRA weights of the trained models, not whole UNets."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for index, model in enumerate(models):
                lora = get_peft_model_state_dict(accelerator.unwrap_model(model))
                save_file({k: v.contiguous() for k, v in lora.items()},
                          os.path.join(output_dir, CHECKPOINT_LORA_FILES[index]))
        weights.clear()

    def load_hook(models, input_dir):
        for index, model in enumerate(list(models)):
            lora = load_file(os.path.join(input_dir, CHECKPOINT_LORA_FILES[index]))
            result = set_peft_model_state_dict(accelerator.unwrap_model(model), lora)
            if getattr(result, "unexpected_keys", None):
                raise RuntimeError(f"{input_dir}: unexpected LoRA keys {result.unexpected_keys[:3]}")
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def checkpoints_of(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a half-written one has no training_state.json)."""
    folder = RunLayout(run_dir).checkpoints
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir()
             if RunLayout.checkpoint_step(p) is not None and (p / TRAINING_STATE_FILE).is_file()]
    return sorted(found, key=RunLayout.checkpoint_step)


def resume_point(args: argparse.Namespace, dataset_type: str) -> tuple[Path | None, Path | None]:
    """(run folder to train in, checkpoint to load) for --resume_from_checkpoint: a checkpoint folder, a run
    folder, or 'latest' (the newest checkpoint of a run of this configuration in --output_dir). A run folder
    without a checkpoint (one stopped before its first) is trained again from the start in place, so one
    configuration never gets a second folder; (None, None): a new run."""
    wanted = args.resume_from_checkpoint
    if not wanted:
        return None, None
    if wanted != "latest":
        path = Path(wanted)
        if (path / TRAINING_STATE_FILE).is_file():
            return path.parent.parent, path
        found = checkpoints_of(path)
        if found:
            return path, found[-1]
        if (path / CONFIG_FILE).is_file() or (path.is_dir() and path.parent.resolve() == Path(args.output_dir).resolve()):
            logger.warning("%s has no resumable checkpoint yet; training it again from the start", path)
            return path, None
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no training_state.json) or run folder")
    suffix = run_name(dataset_type, args.lora_rank, args.lora_alpha, args.learning_rate)[len("YYYYmmdd_HHMMSS"):]
    runs = [p for p in Path(args.output_dir).glob(f"*{suffix}*") if p.is_dir() and not p.name.startswith(".")]
    with_state = [p for p in runs if checkpoints_of(p)]
    if with_state:
        newest = max((checkpoints_of(run)[-1] for run in with_state), key=lambda p: p.stat().st_mtime)
        return newest.parent.parent, newest
    unfinished = [p for p in runs if not (p / FINAL_MODEL).is_dir()]
    if unfinished:
        run_dir = max(unfinished, key=lambda p: p.stat().st_mtime)
        logger.warning("--resume_from_checkpoint latest: %s stopped before its first checkpoint; training it "
                       "again from the start in that folder", run_dir)
        return run_dir, None
    logger.warning("--resume_from_checkpoint latest: no checkpoint in %s for this configuration; "
                   "starting a new run", args.output_dir)
    return None, None


def save_checkpoint(accelerator, layout: RunLayout, state, ema=None, total_limit: int | None = None,
                    write_state=None) -> Path:
    """accelerate state (LoRA, optimizer, scheduler, RNG) and ``state`` (a ``TrainState``) as
    training_state.json, written to a temp folder and renamed when complete; then only the newest
    ``total_limit`` checkpoints are kept. ``write_state(folder)`` writes the accelerate state instead of
    ``accelerator.save_state`` (a run of a pack: its own, in the same files)."""
    final = layout.checkpoint(state.global_step)
    staging = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    (write_state or accelerator.save_state)(str(staging))
    accelerator.wait_for_everyone()  # every process has written its part (its RNG state) before the rename
    if accelerator.is_main_process:
        if ema is not None:
            ema.save(staging)
        # Plain writes: the folder's rename below makes the whole checkpoint appear at once.
        (staging / TRAINING_STATE_FILE).write_text(
            json.dumps(asdict(state), indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        prune_checkpoints(layout.root, total_limit)
        logger.info("Saved resumable state to %s", final)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(run_dir: Path, limit: int | None) -> None:
    if not limit:
        return
    for old in checkpoints_of(run_dir)[:-limit]:
        shutil.rmtree(old, ignore_errors=True)


def resume(accelerator, path: Path | None, state, ema=None, load_state=None) -> None:
    """Load the checkpoint at ``path`` (if any) into the prepared objects and ``state`` (a ``TrainState``);
    ``load_state(folder)`` instead of ``accelerator.load_state`` (a run of a pack: into its own objects)."""
    if not path:
        return
    saved = json.loads((path / TRAINING_STATE_FILE).read_text())
    if saved["steps_per_epoch"] != state.steps_per_epoch:
        raise RuntimeError(f"{path}: saved with {saved['steps_per_epoch']} steps per epoch, this run has "
                           f"{state.steps_per_epoch}; resume with the same dataset, batch size and processes")
    (load_state or accelerator.load_state)(str(path))
    for key in RESTORED:
        setattr(state, key, saved[key])
    state.epoch_losses = list(saved.get("epoch_losses", []))
    if ema is not None:
        _resume_ema(ema, path)
    logger.info("Resumed from %s at step %d", path, state.global_step)


def _resume_ema(ema, path: Path) -> None:
    """The saved moving average, or (a checkpoint of a run without --use_ema) one starting from its weights."""
    from utils.training.adapters import EMA_FILE, AdapterEMA
    if (path / EMA_FILE).is_file():
        ema.load(path)
        return
    logger.warning("%s: no %s (saved without --use_ema); the moving average starts from the resumed weights",
                   path, EMA_FILE)
    ema.shadow = AdapterEMA(ema.params, ema.decay).shadow
