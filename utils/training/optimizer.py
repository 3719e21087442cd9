"""The optimizer over the adapter weights (with LoRA+'s two learning rates when asked) and its
learning-rate schedule."""

from __future__ import annotations

import argparse
import logging

import torch

logger = logging.getLogger(__name__)


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


def make_scheduler(args: argparse.Namespace, optimizer, max_train_steps: int, num_processes: int):
    """The --lr_scheduler over the run's optimizer steps, with --lr_warmup_steps."""
    from diffusers.optimization import get_scheduler

    if args.lr_warmup_steps >= max_train_steps:
        logger.warning("--lr_warmup_steps %d is not below the %d training steps: the learning rate never "
                       "leaves warm-up", args.lr_warmup_steps, max_train_steps)
    # accelerate steps a prepared scheduler once per process per optimizer step.
    return get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * num_processes,
                         num_training_steps=max_train_steps * num_processes)
