"""A tiny SDXL pipeline and a synthetic style dataset, built offline and in seconds (the command:
utils/make_tiny_sdxl.py).

The pipeline uses the real diffusers/transformers classes with the SDXL topology
(two CLIP text encoders, the second with a projection, ``text_time`` added
conditioning, a VAE with the 8x downscale, an Euler scheduler) so every code path
that loads, trains and runs SDXL can be exercised without downloading weights.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

logger = logging.getLogger(__name__)

# Words of the synthetic captions and the default prompts; each gets a whole-word BPE token.
WORDS = (
    "a an the of in on at with and under over near by from to for is its style ghibli studio "
    "landscape hills hill sky sun moon clouds cloud house village forest tree trees river lake sea "
    "field flowers meadow girl boy cat dog castle city town street train station mountain mountains "
    "sunset sunrise night evening morning warm soft pastel painted watercolor anime scene view "
    "small little big old quiet peaceful beautiful green blue golden pink orange purple red white "
    "light lights sunlit walking sitting flying floating wind grass path road bridge window roof "
    "summer spring autumn winter rain snow star stars photo blurry low quality distorted deformed "
    "ugly bad anatomy"
).split()

SYNTHETIC_SKIES = [
    ("golden", (250, 205, 120)),
    ("pink", (246, 180, 190)),
    ("blue", (140, 190, 240)),
    ("orange", (250, 170, 110)),
    ("purple", (185, 160, 220)),
    ("white", (235, 235, 225)),
]
# Sizes differ on purpose: wide, tall and square frames exercise aspect buckets.
SYNTHETIC_SIZES = [(192, 128), (128, 192), (160, 160), (224, 128), (128, 128), (176, 144)]


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-to-printable-character table of byte-level BPE (the CLIP convention)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def build_tokenizer_files(words: tuple[str, ...] | list[str] = WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary and merge list: every byte character, plus one token per word in ``words``."""
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    for char in _bytes_to_unicode().values():
        add(char)
    for char in _bytes_to_unicode().values():
        add(char + "</w>")
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            rule = (current, piece)
            if rule not in merges:
                merges.append(rule)
            current = current + piece
            add(current)
    add("<|startoftext|>")
    add("<|endoftext|>")
    return vocab, merges


def text_encoders(vocab: dict[str, int], intermediate_size: int = 64) -> tuple:
    """Two 3-layer CLIP text encoders of width 32, the second with a projection, as SDXL pairs them."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text_config = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=intermediate_size,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act="gelu",
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    return CLIPTextModel(CLIPTextConfig(**text_config)), CLIPTextModelWithProjection(CLIPTextConfig(**text_config))


def _tiny_unet():
    """A two-level UNet with SDXL's text_time added conditioning and cross-attention on both encoders."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        transformer_layers_per_block=(1, 1),
        attention_head_dim=(2, 4),
        cross_attention_dim=64,  # hidden size of text encoder 1 + text encoder 2, as in SDXL
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids + pooled projection
        norm_num_groups=32,
    )


def _tiny_vae():
    """A VAE with SDXL's 8x downscale and scaling factor."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=0.13025,  # SDXL's VAE scaling factor
    )


def sdxl_pipeline(vocab: dict[str, int], merges: list[tuple[str, str]], encoders: tuple, unet, vae):
    """A StableDiffusionXLPipeline of the given models, with SDXL's two tokenizers and Euler scheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77),
        tokenizer_2=CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="!"),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def build_tiny_sdxl(seed: int = 0):
    """Return a randomly initialised tiny StableDiffusionXLPipeline, deterministic for ``seed``."""
    vocab, merges = build_tokenizer_files()
    torch.manual_seed(seed)  # the models are built in this order, so the weights stay those of earlier versions
    encoders = text_encoders(vocab)
    unet = _tiny_unet()
    return sdxl_pipeline(vocab, merges, encoders, unet, _tiny_vae())


def save_tiny_sdxl(model_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny pipeline and save it with ``save_pretrained``; loadable with ``from_pretrained``."""
    model_dir = Path(model_dir)
    build_tiny_sdxl(seed).save_pretrained(model_dir)
    logger.info("Tiny SDXL pipeline saved to %s", model_dir)
    return model_dir


def _synthetic_image(index: int, size: tuple[int, int], rng: np.random.Generator) -> tuple[Image.Image, str]:
    """A soft 'painted landscape': sky gradient, sun, rolling hills, blurred like watercolour."""
    width, height = size
    sky_name, sky = SYNTHETIC_SKIES[index % len(SYNTHETIC_SKIES)]
    top = np.array(sky, dtype=np.float32)
    bottom = np.array((250, 245, 230), dtype=np.float32)
    ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    pixels = (top * (1 - ramp) + bottom * ramp) * np.ones((1, width, 1), dtype=np.float32)
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    sun_x, sun_y = rng.uniform(0.15, 0.85) * width, rng.uniform(0.1, 0.35) * height
    radius = 0.08 * min(width, height)
    draw.ellipse((sun_x - radius, sun_y - radius, sun_x + radius, sun_y + radius), fill=(255, 240, 200))
    subjects = ["hills", "village", "forest", "meadow", "river", "house"]
    subject = subjects[index % len(subjects)]
    for layer, green in enumerate(((120, 175, 110), (85, 145, 90), (60, 115, 75))):
        base = height * (0.55 + 0.13 * layer)
        phase = rng.uniform(0, 2 * np.pi)
        xs = np.arange(0, width + 8, 8)
        ys = base + 0.06 * height * np.sin(xs / width * 2 * np.pi * (1 + layer) + phase)
        draw.polygon([(0, height)] + list(zip(xs.tolist(), ys.tolist())) + [(width, height)], fill=green)
    if subject in ("village", "house"):
        x0, y0 = rng.uniform(0.2, 0.7) * width, 0.6 * height
        draw.rectangle((x0, y0, x0 + 0.12 * width, y0 + 0.1 * height), fill=(240, 230, 210))
        draw.polygon([(x0 - 4, y0), (x0 + 0.06 * width, y0 - 0.08 * height), (x0 + 0.12 * width + 4, y0)],
                     fill=(190, 80, 60))
    image = image.filter(ImageFilter.GaussianBlur(1.2))
    caption = f"a peaceful {subject} under a {sky_name} sky, soft pastel painted landscape in ghibli style"
    return image, caption


def make_synthetic_dataset(dataset_dir: str | os.PathLike, num_images: int = 12, seed: int = 0,
                           size: tuple[int, int] | None = None) -> Path:
    """Write a synthetic style dataset in the ghibli layout: ``images/`` and ``captions.json``.

    Images come in a few small sizes, or all at ``size`` (width, height) when given."""
    dataset_dir = Path(dataset_dir)
    (dataset_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    captions = {}
    for index in range(num_images):
        image, caption = _synthetic_image(index, size or SYNTHETIC_SIZES[index % len(SYNTHETIC_SIZES)], rng)
        name = f"ghibli_{index:03d}.png"
        image.save(dataset_dir / "images" / name)
        captions[name] = caption
    (dataset_dir / "captions.json").write_text(json.dumps(captions, indent=2, ensure_ascii=False))
    logger.info("Synthetic dataset with %d images written to %s", num_images, dataset_dir)
    return dataset_dir


def make_synthetic_product_dataset(dataset_dir: str | os.PathLike, num_images: int = 4, seed: int = 0) -> Path:
    """Write a synthetic dataset in the product layout: ``captions.json``
    ``{"id": {"product": file, "prompt": text}}``, ``products/{product}`` and ``styled/{id}.png``."""
    dataset_dir = Path(dataset_dir)
    (dataset_dir / "products").mkdir(parents=True, exist_ok=True)
    (dataset_dir / "styled").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    captions = {}
    for index in range(num_images):
        styled, caption = _synthetic_image(index, SYNTHETIC_SIZES[index % len(SYNTHETIC_SIZES)], rng)
        product = Image.new("RGB", (96, 96), "white")
        ImageDraw.Draw(product).rectangle((24, 16, 72, 80), fill=SYNTHETIC_SKIES[index % len(SYNTHETIC_SKIES)][1])
        image_id, product_name = f"item_{index:03d}", f"product_{index:03d}.jpg"
        product.save(dataset_dir / "products" / product_name)
        styled.save(dataset_dir / "styled" / f"{image_id}.png")
        captions[image_id] = {"product": product_name, "prompt": caption}
    (dataset_dir / "captions.json").write_text(json.dumps(captions, indent=2, ensure_ascii=False))
    logger.info("Synthetic product dataset with %d pairs written to %s", num_images, dataset_dir)
    return dataset_dir
