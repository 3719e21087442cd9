"""experiment_config.json and config.toml of a run: every flag (derived values resolved, secrets out), the
run's name and timestamp and the facts of the run; the command line that started it; and what the run
trains on, in numbers (images, repeats per epoch, regularisation images, caption tags), kept in the run's
state for experiment_config.json, the LoRA file's metadata and the dataset line of the log."""

from __future__ import annotations

import math
import sys
from datetime import datetime
from pathlib import Path

import torch

from utils.core.atomic import write_json, write_text
from utils.core.layout import RUN_STAMP_FORMAT, run_stamp
from utils.core.secrets import mask_argv
from utils.data.records import folder_counts
from utils.training.config_file import RUN_CONFIG_FILE, config_toml


def command_line(argv: list[str] | None = None) -> str:
    """The command that started this process, with the values of secret flags replaced by '***'."""
    argv = list(sys.argv if argv is None else argv)
    return " ".join([Path(argv[0]).name, *mask_argv(argv[1:])])


def tracker_config(settings) -> dict:
    """Trackers accept only scalars and strings."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in settings.as_config().items()}


def write_experiment_config(accelerator, settings, state, num_images: int, num_held_out: int,
                            mixed_precision: str) -> None:
    """experiment_config.json: every flag (derived values resolved), the original's experiment_name and
    timestamp (the run folder's, or now for a folder named otherwise), and the facts of this run
    (``settings``: the run's ``RunSettings``, ``state`` its ``TrainState``)."""
    if not accelerator.is_main_process:
        return
    import diffusers
    import peft

    layout = settings.layout
    config = settings.as_config()
    config.update(experiment_name=layout.root.name,
                  timestamp=run_stamp(layout.root) or datetime.now().strftime(RUN_STAMP_FORMAT))
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
    write_json(layout.config, config)
    write_text(layout.root / RUN_CONFIG_FILE, config_toml(settings.args))


# ----------------------------------------------------------------------------- what the run trains on


def dataset_info(items: list, num_reg_listed: int = 0) -> dict:
    """The numbers of the run's items (training and regularisation); ``num_reg_listed``: the usable
    regularisation images before kohya's balancing chose the ones used."""
    train = [item.example for item in items if not item.example.is_reg]
    reg = [item.example for item in items if item.example.is_reg]
    folders = folder_counts(train)  # kohya repeats per folder
    reg_per_epoch = sum(example.repeats for example in reg)
    return {"num_train_images": len(train),
            "images_per_epoch": sum(folder.images_per_epoch for folder in folders) + reg_per_epoch,
            "folders": [folder.as_dict() for folder in folders],
            "tag_frequency": tag_frequency([example.caption for example in train]),
            "regularisation": {"num_reg_images": num_reg_listed, "num_reg_images_used": len(reg),
                               "reg_images_per_epoch": reg_per_epoch}}


def dataset_line(info: dict, num_held_out: int, max_train_steps: int, prior_loss_weight: float) -> str:
    """The run's one log line about its data and steps (the batch layout is added by the caller)."""
    reg = info["regularisation"]
    mixed = ""
    if reg["num_reg_images"]:
        mixed = (f" ({reg['reg_images_per_epoch']} of them regularisation images: {reg['num_reg_images_used']} of "
                 f"{reg['num_reg_images']} used, prior loss weight {prior_loss_weight:g})")
    return (f"{info['num_train_images']} training images ({num_held_out} held out), {info['images_per_epoch']} seen "
            f"per epoch{mixed}, {max_train_steps} optimizer steps")


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """How often each comma-separated tag appears in the captions (kohya's ss_tag_frequency)."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in {t.strip() for t in caption.split(",") if t.strip()}:
            counts[tag] = counts.get(tag, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
