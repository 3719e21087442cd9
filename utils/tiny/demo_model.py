"""The demo's small models: an SDXL-topology pipeline and a CLIP, shaped to learn procedural scenes on a CPU.

Both use the real diffusers/transformers classes and are saved with ``save_pretrained``, so every script
loads them exactly as it loads ``stabilityai/stable-diffusion-xl-base-1.0`` and
``openai/clip-vit-large-patch14``. Their pretrained weights live in ``models/tiny_scenes/`` (made by
``python -m utils.pretrain_demo_model``); this module only defines their shape.

The pipeline draws 64 x 64 images: a VAE with a 4x downscale (16 x 16 x 4 latents), a three-level UNet
with cross-attention and SDXL's ``text_time`` added conditioning, and two small CLIP text encoders (the
second with a projection) whose hidden states are concatenated, as in SDXL.
"""

from __future__ import annotations

from pathlib import Path

import torch

from utils.tiny.clip import build_clip
from utils.tiny.scenes import CAPTION_WORDS
from utils.tiny.sdxl import WORDS, build_tokenizer_files, sdxl_pipeline, text_encoders

ROOT = Path(__file__).resolve().parents[2]
DEMO_MODELS_DIR = ROOT / "models" / "tiny_scenes"
DEMO_SDXL_DIR = DEMO_MODELS_DIR / "sdxl"
DEMO_CLIP_DIR = DEMO_MODELS_DIR / "clip"
RESOLUTION = 64
TEXT_HIDDEN = 32  # the width of both text encoders (text_encoders' width)
POOLED_DIM = 32
CLIP_IMAGE_SIZE = 64


def demo_words() -> list[str]:
    """Every word of the captions and prompts, each a whole-word token of the demo's tokenizers."""
    return list(dict.fromkeys([*WORDS, *CAPTION_WORDS]))


def demo_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE files of both tokenizers: every byte, plus one token per word of the captions and prompts."""
    return build_tokenizer_files(demo_words())


def _demo_unet():
    """A three-level UNet with cross-attention on both encoders and SDXL's text_time added conditioning."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 96),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        transformer_layers_per_block=1,
        attention_head_dim=8,
        cross_attention_dim=2 * TEXT_HIDDEN,  # both encoders' hidden states, concatenated as in SDXL
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + POOLED_DIM,  # six time ids + pooled projection
        norm_num_groups=32,
    )


def _demo_vae():
    """A VAE with two downsamplings: 64 px images, 16 x 16 latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=RESOLUTION,
        scaling_factor=1.0,  # set from the latents' spread after the VAE is trained
    )


def build_demo_sdxl(seed: int = 0):
    """A randomly initialised StableDiffusionXLPipeline of the demo's shape, deterministic for ``seed``."""
    vocab, merges = demo_vocabulary()
    torch.manual_seed(seed)  # built in this order (UNet, VAE, text encoders): the weights of earlier versions
    unet = _demo_unet()
    vae = _demo_vae()
    encoders = text_encoders(vocab, intermediate_size=4 * TEXT_HIDDEN)
    return sdxl_pipeline(vocab, merges, encoders, unet, vae)


def build_demo_clip(seed: int = 0):
    """A randomly initialised ``(CLIPModel, CLIPProcessor)`` of the demo's shape (64 px images, the demo words)."""
    return build_clip(demo_words(), image_size=CLIP_IMAGE_SIZE, width=64, vision_layers=3, seed=seed)
