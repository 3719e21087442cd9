"""SDXL-topology pipelines with random weights for the benchmarks: tiny, small (CPU) and full-size.

``sdxl`` is SDXL base 1.0's public architecture (the values of its ``unet/config.json`` etc., the
same as ``shared/sdxl-base-1.0-config``), so step times and FLOP counts on a GPU are true without
downloading weights. ``small`` keeps that topology (block types, depths, attention layout, both text
encoders, the 8x VAE) at a quarter of the width, so a step costs about 1/16 of the FLOPs and runs on a
CPU in seconds. Weight values do not change speed, so random ones serve.
"""

from __future__ import annotations

import argparse
import contextlib
import logging

import torch

logger = logging.getLogger(__name__)

MODELS = ("tiny", "small", "sdxl")
DEFAULT_RESOLUTION = {"tiny": 128, "small": 256, "sdxl": 1024}

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32, act_fn="silu",
)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4, norm_num_groups=32, act_fn="silu", sample_size=1024, scaling_factor=0.13025,
    force_upcast=True,
)
SDXL_TEXT_ENCODER = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         projection_dim=768)
SDXL_TEXT_ENCODER_2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                           projection_dim=1280)
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")


def _quarter(config: dict, keys: tuple[str, ...]) -> dict:
    scaled = dict(config)
    for key in keys:
        value = config[key]
        scaled[key] = tuple(v // 4 for v in value) if isinstance(value, tuple) else value // 4
    return scaled


def small_configs() -> tuple[dict, dict, dict, dict]:
    """SDXL's configs at a quarter of the width, same depth and layout (UNet, VAE, text encoders)."""
    unet = _quarter(SDXL_UNET, ("block_out_channels", "addition_time_embed_dim"))
    text_1 = _quarter(SDXL_TEXT_ENCODER, ("hidden_size", "intermediate_size", "projection_dim"))
    text_2 = _quarter(SDXL_TEXT_ENCODER_2, ("hidden_size", "intermediate_size", "projection_dim"))
    unet.update(cross_attention_dim=text_1["hidden_size"] + text_2["hidden_size"],
                projection_class_embeddings_input_dim=6 * unet["addition_time_embed_dim"] + text_2["projection_dim"],
                norm_num_groups=16)  # 80 channels are not divisible by 32 groups
    vae = _quarter(SDXL_VAE, ("block_out_channels",))
    vae.update(sample_size=256)
    return unet, vae, text_1, text_2


def build_pipeline(model: str, device: str | torch.device = "cpu", seed: int = 0,
                   weight_dtype: torch.dtype = torch.float32):
    """A StableDiffusionXLPipeline with random weights, created directly on ``device``.

    The UNet and text encoders are created in ``weight_dtype`` (no fp32 copy of a full-size UNet
    ever exists), the VAE in fp32.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from utils.tiny.sdxl import build_tiny_sdxl, build_tokenizer_files

    if model not in MODELS:
        raise ValueError(f"unknown model '{model}' (choose from {', '.join(MODELS)})")
    torch.manual_seed(seed)
    if model == "tiny":
        pipe = build_tiny_sdxl(seed).to(device)
        for module in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
            module.to(weight_dtype)
        return pipe
    if model == "small":
        unet_config, vae_config, text_1, text_2 = small_configs()
    else:
        unet_config, vae_config, text_1, text_2 = SDXL_UNET, SDXL_VAE, SDXL_TEXT_ENCODER, SDXL_TEXT_ENCODER_2
    vocab, merges = build_tokenizer_files()
    ids = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
               pad_token_id=vocab["<|endoftext|>"])
    # The real vocabulary size for sdxl (its embedding memory counts); the offline tokenizer's for small.
    vocab_size = {} if model == "sdxl" else {"vocab_size": len(vocab)}
    with torch.device(device):  # parameters are created and initialised on the device itself
        vae = AutoencoderKL(**vae_config)
        with _default_dtype(weight_dtype):
            unet = UNet2DConditionModel(**unet_config)
            text_encoder = CLIPTextModel(CLIPTextConfig(**{**text_1, **ids, **vocab_size}))
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**text_2, **ids, **vocab_size}))
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77),
        tokenizer_2=CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="!"),
        unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), force_zeros_for_empty_prompt=True,
    )


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe_model(model: str) -> str:
    """One line on a benchmark model: what it is and its parameter counts (built on the meta device)."""
    pipe = build_pipeline(model, "meta")
    sizes = [count_parameters(m) / 1e6 for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)]
    kind = {"tiny": "the tests' tiny SDXL", "small": "SDXL topology at 1/4 width, same depth",
            "sdxl": "SDXL base 1.0 architecture, full size"}[model]
    return (f"{kind}; random weights; parameters: UNet {sizes[0]:.1f} M, VAE {sizes[1]:.1f} M, "
            f"text encoders {sizes[2]:.1f} M + {sizes[3]:.1f} M")


def check_resolution(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """The benchmarks' --resolution must be a multiple of 64 (the UNet's downscale at this depth)."""
    if args.resolution is not None and args.resolution % 64:
        parser.error(f"--resolution {args.resolution} must be a multiple of 64")
    return args
