"""Pretraining of the demo's base model and its CLIP on procedural scenes (the command:
utils/pretrain_demo_model.py, whose help describes the four stages), on a CPU, reproducibly from a seed.

The base model never sees the Ghibli-like look: that is what the demo's LoRA has to learn.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from utils.core.sdxl import encode_tokens, time_ids, tokenize
from utils.tiny.demo_model import RESOLUTION, build_demo_clip, build_demo_sdxl
from utils.tiny.scenes import caption, render, scene_set

logger = logging.getLogger("pretrain_demo_model")

STAGES = ("vae", "unet", "decoder", "clip")
PREVIEW_PROMPTS = [
    "a small house by a lake under the sun",
    "a village on green hills at sunset",
    "a forest near the mountains under the sun",
    "a small house on green hills at night under the moon",
]


def to_tensor(images: list) -> torch.Tensor:
    """PIL images -> float tensor (N, 3, H, W) in [-1, 1]."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def make_scenes(count: int, seed: int, style: str) -> tuple[torch.Tensor, list[str]]:
    scenes = scene_set(count, seed)
    images = [render(scene, style, RESOLUTION) for scene in tqdm(scenes, desc=f"{style} scenes", leave=False)]
    captions = [caption(scene, style, index) for index, scene in enumerate(scenes)]
    return to_tensor(images), captions


def cosine_lr(optimizer: torch.optim.Optimizer, base_lr: float, step: int, total: int, warmup: int) -> None:
    scale = step / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    for group in optimizer.param_groups:
        group["lr"] = base_lr * scale


def random_batch(generator: torch.Generator, count: int, batch_size: int) -> torch.Tensor:
    return torch.randint(0, count, (batch_size,), generator=generator)


def _fit_steps(model, optimizer: torch.optim.Optimizer, loss_of: Callable[[int], torch.Tensor], steps: int,
               desc: str, warmup: int, digits: int = 4) -> float:
    """``steps`` optimizer steps on ``loss_of(step)`` under a warm-up and cosine learning rate, with a progress
    bar; ``model`` ends in eval mode and frozen. Returns the last loss."""
    base_lr = optimizer.param_groups[0]["lr"]
    bar = tqdm(range(steps), desc=desc)
    loss_value = math.nan
    for step in bar:
        cosine_lr(optimizer, base_lr, step, steps, warmup=warmup)
        loss = loss_of(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = float(loss)
        bar.set_postfix(loss=f"{loss_value:.{digits}f}")
    model.eval().requires_grad_(False)
    return loss_value


def _flipped_batch(pixels: torch.Tensor, generator: torch.Generator, batch_size: int, step: int) -> torch.Tensor:
    """A random batch, mirrored on every other step."""
    batch = pixels[random_batch(generator, len(pixels), batch_size)]
    return batch.flip(-1) if step % 2 else batch


def train_vae(vae, pixels: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int) -> float:
    """Reconstruction (MSE + L1) plus a small KL term, on random flipped batches."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()

    def loss_of(step: int) -> torch.Tensor:
        batch = _flipped_batch(pixels, generator, batch_size, step)
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(reconstruction, batch) + 0.5 * F.l1_loss(reconstruction, batch)
        return loss + 1e-6 * posterior.kl().mean()

    return _fit_steps(vae, optimizer, loss_of, steps, "VAE", warmup=50)


def image_gradients(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return images[..., 1:, :] - images[..., :-1, :], images[..., :, 1:] - images[..., :, :-1]


def train_decoder(vae, pixels: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int) -> float:
    """Sharpen the decoder on scenes of both looks with the encoder frozen (the latent space, and so the UNet,
    stay valid): pixel loss plus an L1 loss on image gradients, which brings back edges and outlines. Like
    SDXL's VAE, it has to draw any look the UNet asks for, including the one the LoRA learns."""
    generator = torch.Generator().manual_seed(seed + 1)
    decoder = [vae.decoder, vae.post_quant_conv]
    params = [p for module in decoder for p in module.parameters()]
    for module in decoder:
        module.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def loss_of(step: int) -> torch.Tensor:
        batch = _flipped_batch(pixels, generator, batch_size, step)
        with torch.no_grad():
            latents = vae.encode(batch).latent_dist.sample(generator=generator)
        reconstruction = vae.decode(latents).sample
        loss = F.mse_loss(reconstruction, batch) + 0.5 * F.l1_loss(reconstruction, batch)
        for made, real in zip(image_gradients(reconstruction), image_gradients(batch)):
            loss = loss + F.l1_loss(made, real)
        return loss

    return _fit_steps(vae, optimizer, loss_of, steps, "VAE decoder", warmup=20)


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Unscaled latent means of all images."""
    chunks = [vae.encode(pixels[i:i + batch_size]).latent_dist.mean for i in range(0, len(pixels), batch_size)]
    return torch.cat(chunks)


def train_unet(pipe, latents: torch.Tensor, captions: list[str], steps: int, batch_size: int, lr: float,
               seed: int, caption_dropout: float = 0.1, ema_decay: float = 0.998) -> float:
    """Denoising (epsilon, min-SNR-5 weighted) of photo latents; the UNet and both text encoders learn."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel, compute_snr

    generator = torch.Generator().manual_seed(seed)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    unet, encoders = pipe.unet, [pipe.text_encoder, pipe.text_encoder_2]
    token_ids = tokenize([pipe.tokenizer, pipe.tokenizer_2], captions)
    params = [p for module in (unet, *encoders) for p in module.parameters()]
    for module in (unet, *encoders):
        module.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    ema = EMAModel(unet.parameters(), decay=ema_decay)
    conditioning = time_ids((RESOLUTION, RESOLUTION), (0, 0), (RESOLUTION, RESOLUTION)).repeat(batch_size, 1)
    bar = tqdm(range(steps), desc="UNet")
    smoothed = math.nan
    for step in bar:
        cosine_lr(optimizer, lr, step, steps, warmup=100)
        index = random_batch(generator, len(latents), batch_size)
        clean = latents[index]
        if step % 2:
            clean = clean.flip(-1)
        prompt_embeds, pooled = encode_tokens(encoders, [ids[index] for ids in token_ids])
        keep = (torch.rand(batch_size, generator=generator) >= caption_dropout).float()
        prompt_embeds, pooled = prompt_embeds * keep[:, None, None], pooled * keep[:, None]  # empty prompt = zeros
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        prediction = unet(noisy, timesteps, prompt_embeds,
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": conditioning}).sample
        snr = compute_snr(scheduler, timesteps)
        weights = torch.clamp(snr, max=5.0) / snr
        loss = (F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.step(unet.parameters())
        smoothed = float(loss) if math.isnan(smoothed) else 0.98 * smoothed + 0.02 * float(loss)
        bar.set_postfix(loss=f"{smoothed:.4f}")
    ema.copy_to(unet.parameters())
    for module in (unet, *encoders):
        module.eval().requires_grad_(False)
    return smoothed


def _soft_targets(picked: list[int], captions: list[str], styles: list[str], style_weight: float) -> torch.Tensor:
    """``1 - style_weight`` of the target mass on the pairs with the same caption (several images can share
    one), the rest spread over the pairs of the same look."""
    same = torch.tensor([[captions[i] == captions[j] for j in picked] for i in picked], dtype=torch.float32)
    look = torch.tensor([[styles[i] == styles[j] for j in picked] for i in picked], dtype=torch.float32)
    return ((1 - style_weight) * same / same.sum(dim=1, keepdim=True)
            + style_weight * look / look.sum(dim=1, keepdim=True))


def train_clip(model, processor, pixels: torch.Tensor, captions: list[str], styles: list[str], steps: int,
               batch_size: int, lr: float, seed: int, style_weight: float) -> float:
    """Symmetric InfoNCE between image and caption embeddings (the CLIP objective), with soft targets:
    ``1 - style_weight`` of the target mass on the pairs with the same caption, the rest spread over the pairs
    of the same look. The command's default, 0.8, makes the look the embedding's main axis, so the style similarity of
    one look varies little with what the scene shows; the caption share keeps prompt alignment meaningful."""
    generator = torch.Generator().manual_seed(seed)
    mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    tokens = processor.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()

    def loss_of(step: int) -> torch.Tensor:
        index = random_batch(generator, len(pixels), batch_size)
        images = (pixels[index] + 1) / 2
        if step % 2:
            images = images.flip(-1)
        output = model(input_ids=tokens.input_ids[index], attention_mask=tokens.attention_mask[index],
                       pixel_values=(images - mean) / std)
        targets = _soft_targets(index.tolist(), captions, styles, style_weight)
        return (F.cross_entropy(output.logits_per_image, targets)
                + F.cross_entropy(output.logits_per_text, targets)) / 2

    return _fit_steps(model, optimizer, loss_of, steps, "CLIP", warmup=50, digits=3)


def forget_load_paths(folder: Path) -> None:
    """Drop the ``_name_or_path`` that diffusers copies from the folder a continued run loaded: the committed
    configs name no folder of the machine that made them."""
    for config in folder.rglob("*.json"):
        data = json.loads(config.read_text())
        if isinstance(data, dict) and data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def save_preview(pipe, path: Path, seed: int) -> None:
    """The base model's pictures for the preview prompts: one row per prompt, three seeds."""
    from PIL import Image

    columns = 3
    sheet = Image.new("RGB", (columns * RESOLUTION, len(PREVIEW_PROMPTS) * RESOLUTION))
    for row, prompt in enumerate(PREVIEW_PROMPTS):
        generator = torch.Generator().manual_seed(seed + row)
        images = pipe(prompt, num_images_per_prompt=columns, height=RESOLUTION, width=RESOLUTION,
                      num_inference_steps=20, guidance_scale=5.0, generator=generator).images
        for column, image in enumerate(images):
            sheet.paste(image, (column * RESOLUTION, row * RESOLUTION))
    sheet.save(path)


def pretrain(args: argparse.Namespace) -> dict:
    started = time.time()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    output = Path(args.output_dir)
    stages = set(args.stages)
    if "vae" in stages or "unet" in stages:
        pipe = build_demo_sdxl(args.seed)
    else:  # later stages only: continue from the saved pipeline
        from diffusers import StableDiffusionXLPipeline
        pipe = StableDiffusionXLPipeline.from_pretrained(output / "sdxl", torch_dtype=torch.float32)
    clip_model, clip_processor = build_demo_clip(args.seed)

    photo, photo_captions = make_scenes(args.num_scenes, args.seed, "photo")
    ghibli, ghibli_captions = make_scenes(args.num_scenes // 2, args.seed + 1, "ghibli")
    info_path = output / "pretraining_info.json"
    info: dict = json.loads(info_path.read_text()) if info_path.is_file() and "vae" not in stages else {}
    info.update({"seed": args.seed, "num_scenes": args.num_scenes})

    if "vae" in stages:
        info["vae_loss"] = train_vae(pipe.vae, torch.cat([photo, ghibli]), args.vae_steps, args.vae_batch_size,
                                     args.vae_lr, args.seed)
        raw = encode_latents(pipe.vae, photo)
        scaling = float(1.0 / raw.std())
        pipe.vae.register_to_config(scaling_factor=scaling)
        info["vae_scaling_factor"] = scaling
    if "unet" in stages:
        latents = encode_latents(pipe.vae, photo) * pipe.vae.config.scaling_factor
        info["unet_loss"] = train_unet(pipe, latents, photo_captions, args.unet_steps, args.unet_batch_size,
                                       args.unet_lr, args.seed)
    if "decoder" in stages:
        info["decoder_loss"] = train_decoder(pipe.vae, torch.cat([photo, ghibli]), args.decoder_steps,
                                             args.vae_batch_size, args.decoder_lr, args.seed)
    if "clip" in stages:
        with torch.no_grad():  # the CLIP also sees what the VAE makes of the scenes, as generated images look
            both = torch.cat([photo[: len(ghibli)], ghibli])
            decoded = torch.cat([pipe.vae.decode(pipe.vae.encode(both[i:i + 64]).latent_dist.mean).sample.clamp(-1, 1)
                                 for i in range(0, len(both), 64)])
        styles = ["photo"] * len(ghibli) + ["ghibli"] * len(ghibli)
        info["clip_loss"] = train_clip(clip_model, clip_processor, torch.cat([both, decoded]),
                                       (photo_captions[: len(ghibli)] + ghibli_captions) * 2, styles * 2,
                                       args.clip_steps, args.clip_batch_size, args.clip_lr, args.seed,
                                       style_weight=args.clip_style_weight)

    output.mkdir(parents=True, exist_ok=True)
    save_preview(pipe, output / "preview.png", args.seed)
    pipe.to(torch.float16).save_pretrained(output / "sdxl")
    forget_load_paths(output / "sdxl")
    if "clip" in stages:
        clip_model.to(torch.float16).save_pretrained(output / "clip")
        clip_processor.save_pretrained(output / "clip")
    earlier = info.get("minutes", 0.0) if "vae" not in stages else 0.0
    info["minutes"] = round(earlier + (time.time() - started) / 60, 1)
    info["settings"] = {k: v for k, v in vars(args).items() if k not in ("output_dir", "threads")}
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    logger.info("Pretrained in %.1f min; saved to %s", info["minutes"], output)
    return info
