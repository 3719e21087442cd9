"""experiment_config.json and config.toml of a run: every flag (derived values resolved, secrets out), the
run's name and timestamp and the facts of the run; and the command line that started it."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from utils.core.atomic import write_json, write_text
from utils.core.names import CONFIG_FILE
from utils.core.secrets import mask_argv
from utils.training.config_file import RUN_CONFIG_FILE, config_toml
from utils.training.run_dir import run_timestamp
from utils.training.state import TrainState


def command_line(argv: list[str] | None = None) -> str:
    """The command that started this process, with the values of secret flags replaced by '***'."""
    argv = list(sys.argv if argv is None else argv)
    return " ".join([Path(argv[0]).name, *mask_argv(argv[1:])])


def tracker_config(settings) -> dict:
    """Trackers accept only scalars and strings."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in settings.as_config().items()}


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
        images_seen_per_epoch=state.dataset_info.get("images_per_epoch", num_images),  # kohya repeats counted
        dataset_folders=state.dataset_info.get("folders", []),
        **state.dataset_info.get("regularisation", {}),  # --reg_data_dir: listed, used, seen per epoch
        max_train_steps=state.max_train_steps,
        steps_per_epoch=state.steps_per_epoch,
        effective_batch_size=settings.args.train_batch_size * settings.args.gradient_accumulation_steps
        * accelerator.num_processes,
        num_processes=accelerator.num_processes,
        resolved_mixed_precision=mixed_precision,
        lora_scale=settings.args.lora_alpha / (math.sqrt(settings.args.lora_rank) if settings.args.use_rslora
                                          else settings.args.lora_rank),
        command=command_line(),
        versions={"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__},
    )
    config.update(state.speed_info)  # the resolved gradient checkpointing and evaluation plan
    write_json(run_dir / CONFIG_FILE, config)
    write_text(run_dir / RUN_CONFIG_FILE, config_toml(settings.args))
