"""The adapters PEFT adds to the frozen SDXL: the config from the flags (LoRA, LoHa or LoKr) and its
injection into the UNet and, with --train_text_encoder, both text encoders."""

from __future__ import annotations

import argparse

import torch

TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


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
