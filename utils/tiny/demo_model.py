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

from utils.make_tiny_sdxl import WORDS, build_tokenizer_files
from utils.scenes import CAPTION_WORDS

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODELS_DIR = ROOT / "models" / "tiny_scenes"
DEMO_SDXL_DIR = DEMO_MODELS_DIR / "sdxl"
DEMO_CLIP_DIR = DEMO_MODELS_DIR / "clip"
RESOLUTION = 64
TEXT_HIDDEN = 32
POOLED_DIM = 32
CLIP_IMAGE_SIZE = 64
# CLIP's own normalisation constants (those of the OpenAI checkpoints).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def demo_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE files of both tokenizers: every byte, plus one token per word of the captions and prompts."""
    words = list(dict.fromkeys([*WORDS, *CAPTION_WORDS]))
    return build_tokenizer_files(words)


def build_demo_sdxl(seed: int = 0):
    """A randomly initialised StableDiffusionXLPipeline of the demo's shape, deterministic for ``seed``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab, merges = demo_vocabulary()
    torch.manual_seed(seed)
    text_config = dict(
        vocab_size=len(vocab), hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN, num_attention_heads=4,
        num_hidden_layers=3, max_position_embeddings=77, projection_dim=POOLED_DIM, hidden_act="gelu",
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    unet = UNet2DConditionModel(
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
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),  # two downsamplings: 64 px images, 16 x 16 latents
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=RESOLUTION,
        scaling_factor=1.0,  # set from the latents' spread after the VAE is trained
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_config)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_config)),
        tokenizer=CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77),
        tokenizer_2=CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="!"),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def build_demo_clip(seed: int = 0):
    """A randomly initialised ``(CLIPModel, CLIPProcessor)`` of the demo's shape (64 px images, the demo words)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab, merges = demo_vocabulary()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": CLIP_IMAGE_SIZE}, crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE},
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        ),
        vision_config=dict(
            hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3,
            image_size=CLIP_IMAGE_SIZE, patch_size=8,
        ),
        projection_dim=64,
    )
    torch.manual_seed(seed)
    return CLIPModel(config), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
