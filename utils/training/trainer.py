"""The LoRA training run behind train_sdxl_lora.py.

Order of work: check everything cheap (flags, dataset) -> settings made once (run folder, resume point,
learning rate) -> load SDXL frozen -> inject LoRA with PEFT -> cache latents/embeddings -> train with
accelerate -> write the original's run-directory layout as it goes.

    settings.py     the flags plus what is derived from them       setup.py        prepare_run: model, data, optimizer
    model_inputs.py batches to model inputs                         loss.py         the denoising loss
    evaluation.py   the fixed-noise validation loss                 caching.py      latent and text caches
    loop.py         the training loop, non-finite guard, stops      epochs.py       end-of-epoch files, final_model
    run_dir.py      the run folder's name                           checkpoints.py  resumable state
    lora_folders.py LoRA folders                                    loss_log.py     the CSV loss logs
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from utils.data.listing import load_training_examples
from utils.data.regularisation import load_reg_examples
from utils.training.epochs import finish
from utils.training.interrupts import StopRequest
from utils.training.loop import out_of_memory_message, train_loop
from utils.training.settings import RunSettings, TrainingError, distributed_state
from utils.training.setup import check_args, prepare_run
from utils.training.timeline import Timeline

__all__ = ["TrainingError", "is_main_process", "train"]


def train(args: argparse.Namespace) -> Path:
    """Run a full training; return the run directory."""
    timeline = Timeline()
    check_args(args)
    with timeline.phase("dataset check"):
        examples, dataset_type = _load_examples(args)
        reg_examples = load_reg_examples(args, report_here=is_main_process()) if args.reg_data_dir else []
    settings = RunSettings.make(args, dataset_type)
    run = prepare_run(settings, examples, timeline, reg_examples)
    try:
        with StopRequest() as stop:
            train_loop(run, stop)
    except torch.cuda.OutOfMemoryError as error:
        raise TrainingError(out_of_memory_message(settings)) from error
    finish(run)
    if run.accelerator.is_main_process:
        run.timeline.write(settings.run_dir / settings.args.logging_dir / "timings.json")
    run.accelerator.end_training()
    if settings.args.push_to_hub and run.accelerator.is_main_process:
        from utils.hub.publish import push_run_to_hub
        push_run_to_hub(settings.run_dir, settings.args.hub_model_id, private=settings.args.hub_private)
    return settings.run_dir


def _load_examples(args: argparse.Namespace) -> tuple[list, str]:
    """The checked training examples and the resolved dataset type (issue 19: one report per run)."""
    return load_training_examples(args, report_here=is_main_process())


def is_main_process() -> bool:
    """Whether this is the main process of the launch, known before the Accelerator exists (issue 19)."""
    return distributed_state().is_main_process
