"""Checks of the style options (caption shuffling, timestep distribution, masked loss, regularisation
images), before anything is loaded."""

from __future__ import annotations

import argparse
from pathlib import Path

from utils.core.prompt_file import read_prompt_file
from utils.training.settings import TrainingError


class StyleOptionError(TrainingError):
    """A style option that cannot work as given."""


def check_style_args(args: argparse.Namespace) -> None:
    if args.keep_tokens < 0:
        raise StyleOptionError("--keep_tokens must not be negative")
    if args.shuffle_caption and not args.caption_separator:
        raise StyleOptionError("--caption_separator must not be empty")
    _check_timesteps(args)
    if args.prior_loss_weight < 0:
        raise StyleOptionError(f"--prior_loss_weight {args.prior_loss_weight} must not be negative")
    if args.reg_data_dir and not Path(args.reg_data_dir).is_dir():
        raise StyleOptionError(f"--reg_data_dir {args.reg_data_dir}: folder not found")
    if args.validation_prompts_file:
        read_prompt_file(args.validation_prompts_file)  # a bad file fails here, not at the first epoch's end


def _check_timesteps(args: argparse.Namespace) -> None:
    if args.timestep_bias_strategy != "none" and args.timestep_sampling != "uniform":
        raise StyleOptionError(f"--timestep_bias_strategy {args.timestep_bias_strategy} reweights uniform "
                               f"sampling; it does not go with --timestep_sampling {args.timestep_sampling}")
    if args.timestep_bias_multiplier <= 0:
        raise StyleOptionError("--timestep_bias_multiplier must be positive (1.0 means no bias)")
    if not 0.0 < args.timestep_bias_portion <= 1.0:
        raise StyleOptionError("--timestep_bias_portion must be in (0, 1]")
    if args.timestep_bias_strategy == "range" and not 0 <= args.timestep_bias_begin < args.timestep_bias_end <= 1000:
        raise StyleOptionError(f"--timestep_bias_begin {args.timestep_bias_begin} and --timestep_bias_end "
                               f"{args.timestep_bias_end}: need 0 <= begin < end <= 1000")
    if args.logit_std <= 0:
        raise StyleOptionError("--logit_std must be positive")
