"""Loading SDXL components, precision choices, prompt encoding and SDXL size conditioning."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from utils.core.errors import UserError
from utils.core.model_source import check_base_model

logger = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_mixed_precision(requested: str, cuda_available: bool | None = None) -> str:
    """Return the mixed-precision mode the device supports, warning when it differs from the request."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if requested == "no" or cuda_available:
        if requested == "bf16" and cuda_available and not torch.cuda.is_bf16_supported():
            logger.warning("This GPU does not support bf16; using fp16 instead.")
            return "fp16"
        return requested
    logger.warning("--mixed_precision %s needs a CUDA device; none found, so training runs in fp32.", requested)
    return "no"


def resolve_variant(model: str, variant: str | None) -> str | None:
    """Keep ``variant`` only if a local model folder actually holds files of it.

    SDXL on the Hub ships ``*.fp16.safetensors``; local and community copies often
    don't, and asking for a missing variant would fail to load.
    """
    if not variant or not os.path.isdir(model):
        return variant
    marker = f".{variant}."
    if any(marker in name for _, _, files in os.walk(model) for name in files):
        return variant
    logger.warning("%s has no '%s' variant files; loading the regular weights.", model, variant)
    return None


def is_single_file(model: str) -> bool:
    return os.path.isfile(model)


@dataclass
class SDXLComponents:
    tokenizers: list
    text_encoders: list
    vae: Any
    unet: Any
    noise_scheduler: Any


def load_components(model: str, revision: str | None = None, variant: str | None = None,
                    weight_dtype: torch.dtype = torch.float32, vae_model: str | None = None,
                    allow_pickle: bool = False, model_config: str | None = None) -> SDXLComponents:
    """Load the parts of an SDXL model needed for training, frozen, in ``weight_dtype``.

    ``model`` is a diffusers folder, a Hub id, or a single-file checkpoint (with ``model_config``, a local
    diffusers folder of the same architecture whose configs it uses). The VAE
    stays in fp32 unless a separate (fp16-safe) VAE is given: SDXL's own VAE
    overflows to NaN in fp16.
    """
    from diffusers import DDPMScheduler

    pipe = load_pipeline(model, revision=revision, variant=variant, vae_model=vae_model, allow_pickle=allow_pickle,
                         model_config=model_config)
    cast = [pipe.unet, pipe.text_encoder, pipe.text_encoder_2] + ([pipe.vae] if vae_model else [])
    for module in cast:
        if module.dtype != weight_dtype:
            module.to(weight_dtype)
    vae = pipe.vae
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    components = SDXLComponents(
        tokenizers=[pipe.tokenizer, pipe.tokenizer_2],
        text_encoders=[pipe.text_encoder, pipe.text_encoder_2],
        vae=vae,
        unet=pipe.unet,
        noise_scheduler=noise_scheduler,
    )
    for module in [components.vae, components.unet, *components.text_encoders]:
        module.requires_grad_(False)
    return components


def load_pipeline(model: str, revision: str | None = None, variant: str | None = None,
                  torch_dtype: torch.dtype = torch.float32, vae_model: str | None = None, allow_pickle: bool = False,
                  model_config: str | None = None):
    """Load a StableDiffusionXLPipeline from a folder, a Hub id or a single ``.safetensors`` file.

    A single file holds weights only; diffusers takes the configs (and tokenizers) from ``model_config``, a
    local diffusers SDXL folder, when given, and otherwise from the Hub or its cache.

    Pickle-based weights (.bin, .ckpt) can run code when loaded, so they are refused unless
    ``allow_pickle``.
    """
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    check_base_model(model, "model", model_config)
    safe_only = None if allow_pickle else True
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if vae_model:
        kwargs["vae"] = AutoencoderKL.from_pretrained(vae_model, dtype=torch_dtype, use_safetensors=safe_only)
    if is_single_file(model):
        if Path(model).suffix != ".safetensors" and not allow_pickle:
            raise UserError(f"{model} is a pickle-based checkpoint, which can run arbitrary code when loaded; "
                            "use a .safetensors file or pass --allow_pickle if you trust its source")
        if model_config:
            kwargs.update(config=str(model_config), local_files_only=True)
        return StableDiffusionXLPipeline.from_single_file(model, **kwargs)
    kwargs["use_safetensors"] = safe_only
    variant = resolve_variant(model, variant)
    try:
        return StableDiffusionXLPipeline.from_pretrained(model, revision=revision, variant=variant, **kwargs)
    except (OSError, ValueError) as error:
        if variant is None or "variant" not in str(error).lower():
            raise
        logger.warning("%s has no '%s' variant; loading the regular weights.", model, variant)
        return StableDiffusionXLPipeline.from_pretrained(model, revision=revision, **kwargs)


def tokenize(tokenizers: list, prompts: list[str]) -> list[torch.Tensor]:
    """Token ids for each tokenizer, padded and truncated to its maximum length."""
    return [
        tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        for tokenizer in tokenizers
    ]


def encode_tokens(text_encoders: list, token_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt encoding: penultimate hidden states of both encoders, concatenated, and the pooled
    projection of the second encoder."""
    hidden_states = []
    pooled = None
    for encoder, ids in zip(text_encoders, token_ids):
        output = encoder(ids.to(encoder.device), output_hidden_states=True)
        pooled = output[0]  # the last encoder's projected pooled output
        hidden_states.append(output.hidden_states[-2])
    prompt_embeds = torch.cat(hidden_states, dim=-1)
    return prompt_embeds, pooled.reshape(prompt_embeds.shape[0], -1)


def encode_prompts(tokenizers: list, text_encoders: list, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    return encode_tokens(text_encoders, tokenize(tokenizers, prompts))


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]) -> torch.Tensor:
    """SDXL micro-conditioning: (original h, w, crop top, left, target h, w)."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


def vae_latent_distribution(vae, pixel_values: torch.Tensor):
    """Encode images in [-1, 1] into the VAE's latent distribution."""
    return vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist


def latent_scaling(vae) -> tuple[float, float]:
    """(shift, factor) that take the VAE's latents to the UNet's scale: (latents - shift) * factor."""
    return getattr(vae.config, "shift_factor", None) or 0.0, vae.config.scaling_factor


def scale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    shift, factor = latent_scaling(vae)
    return (latents - shift) * factor
