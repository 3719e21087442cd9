"""Whether a training step fits in GPU memory without gradient checkpointing: the activations it keeps for
the backward, counted on the meta device, and the choice (forced by a flag, or automatic) made from them and applied to the models."""

from __future__ import annotations

import argparse
import logging

import torch

from utils.training.adapters import lora_config

logger = logging.getLogger(__name__)

GIB = 1024 ** 3
ACTIVATION_MARGIN = 1.3  # allocator fragmentation, the backward's transient buffers, the loss
FIXED_MARGIN = 1 * GIB  # CUDA context growth, cuDNN/cuBLAS workspaces


def estimate_activation_bytes(unet_config, resolution: int, batch_size: int, dtype: torch.dtype,
                              lora_config=None) -> int:
    """Bytes autograd keeps for the backward of one training step without checkpointing.

    The UNet is built on the meta device (no memory, no compute) and every tensor saved for the
    backward pass is counted as the forward runs, at batch 1 and 2: their difference is one sample's
    activations (weights saved for the backward, already in memory, cancel out).
    """
    one, two = (_saved_bytes(unet_config, resolution, batch, dtype, lora_config) for batch in (1, 2))
    return (two - one) * batch_size


def _saved_bytes(unet_config, resolution: int, batch_size: int, dtype: torch.dtype, lora_config) -> int:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config).to(dtype)
    unet.requires_grad_(False)
    if lora_config is not None:
        unet.add_adapter(lora_config)
        for name, parameter in unet.named_parameters():
            if "lora_" in name:
                parameter.data = parameter.data.float()
                parameter.requires_grad_(True)
    latent = resolution // 8
    pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    meta = {"device": "meta", "dtype": dtype}
    latents = torch.zeros(batch_size, unet.config.in_channels, latent, latent, **meta)
    embeds = torch.zeros(batch_size, 77, unet.config.cross_attention_dim, **meta)
    conditions = {"text_embeds": torch.zeros(batch_size, pooled_dim, **meta),
                  "time_ids": torch.zeros(batch_size, 6, **meta)}
    timesteps = torch.full((batch_size,), 500, device="meta")
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        unet(latents, timesteps, embeds, added_cond_kwargs=conditions, return_dict=False)[0].float().mean()
    return total


def choose_gradient_checkpointing(setting, device_type: str, free_bytes: int | None = None,
                                  activation_bytes: int | None = None) -> tuple[bool, str]:
    """(on?, why). ``setting`` is True/False (forced by a flag) or 'auto'."""
    if setting is True:
        return True, "forced on by --gradient_checkpointing"
    if setting is False:
        return False, "forced off by --no-gradient_checkpointing"
    if device_type != "cuda":
        return False, (f"auto: off on {device_type.upper()} (memory is not the limit there; checkpointing would "
                       f"recompute activations, about 1.4-1.55x the time per step)")
    needed = int(activation_bytes * ACTIVATION_MARGIN) + FIXED_MARGIN
    numbers = f"estimated {activation_bytes / GIB:.1f} GiB of activations, {free_bytes / GIB:.1f} GiB free"
    if needed <= free_bytes:
        return False, f"auto: off, the step fits without it ({numbers})"
    return True, f"auto: on, the step would not fit without it ({numbers})"


def set_gradient_checkpointing(components, args: argparse.Namespace, device: torch.device,
                               weight_dtype: torch.dtype, copies: int = 1) -> bool:
    """Decide (forced by a flag, or auto from the device and free memory) and apply; log the choice. ``copies``:
    the batch is trained that many times over (a pack of runs)."""
    free = activations = None
    if args.gradient_checkpointing == "auto" and device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        activations = estimate_activation_bytes(components.unet.config, args.resolution,
                                                args.train_batch_size * copies, weight_dtype,
                                                lora_config(args, args.lora_target_modules))
    enabled, reason = choose_gradient_checkpointing(args.gradient_checkpointing, device.type, free, activations)
    logger.info("Gradient checkpointing %s: %s", "on" if enabled else "off", reason)
    if enabled:
        components.unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            for encoder in components.text_encoders:
                encoder.gradient_checkpointing_enable()
    return enabled
