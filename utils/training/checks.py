"""The flag checks made before anything is loaded: combinations that cannot work are refused with a
message that names the flag (the model source, optional packages, resolution, splits, adapters, style
options, the Hub target)."""

from __future__ import annotations

import argparse
from pathlib import Path

from utils.core.errors import TrainingError
from utils.core.model_source import check_base_model, check_model_source


def check_args(args: argparse.Namespace) -> None:
    """Flag combinations that cannot work, refused before anything is loaded."""
    check_base_model(args.pretrained_model_name_or_path, "--pretrained_model_name_or_path", args.model_config)
    if args.pretrained_vae_model_name_or_path:
        check_model_source(args.pretrained_vae_model_name_or_path, "--pretrained_vae_model_name_or_path")
    if args.enable_xformers_memory_efficient_attention:
        from diffusers.utils.import_utils import is_xformers_available
        if not is_xformers_available():
            raise TrainingError("--enable_xformers_memory_efficient_attention: xformers is not installed "
                                "(PyTorch's built-in SDPA attention is used by default and needs nothing)")
    if args.optimizer == "adamw8bit":
        _require("bitsandbytes", "--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes")
    if args.optimizer == "prodigy":
        _require("prodigyopt", "--optimizer prodigy needs prodigyopt: pip install prodigyopt")
    for tracker in trackers(args.report_to):
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


def trackers(report_to: str) -> list[str]:
    return {"none": [], "all": ["tensorboard", "wandb"]}.get(report_to, [report_to])


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
        from utils.core.prompt_file import read_prompt_file
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
