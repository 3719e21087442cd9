"""A batch of dataset indices turned into the UNet's inputs (``Batch``): latents from the cache or the
VAE, caption embeddings from the cache or the text encoders, SDXL's time ids, and the optional loss mask
and per-image loss weights. Captions are varied as kohya sd-scripts does it (``caption_text``): split at
``--caption_separator``, the first ``--keep_tokens`` pieces kept in front, the rest shuffled
(``--shuffle_caption``), joined with ", ", and ``--caption_prefix`` (e.g. a trigger word) put in front.

Flags read: ``BatchMaker`` --random_flip, --caption_dropout, --masked_loss, --prior_loss_weight and the caption
flags; ``caption_text`` --shuffle_caption, --keep_tokens, --caption_separator, --caption_prefix."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from utils.core.sdxl import encode_prompts, latent_scaling, vae_latent_distribution
from utils.training.batches import Item, latent_mask


@dataclass
class Batch:
    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor
    mask: torch.Tensor | None = None  # --masked_loss: (B, 1, h, w) in [0, 1] at latent size
    loss_weights: torch.Tensor | None = None  # (B,): --prior_loss_weight for regularisation images, else 1


@dataclass
class BatchMaker:
    """Turns a batch of dataset indices into model inputs, from the cache or by encoding on the fly."""

    components: object
    items: list[Item]
    args: argparse.Namespace  # the flags
    weight_dtype: torch.dtype
    device: torch.device
    latent_cache: object = None
    text_cache: dict | None = None

    def __post_init__(self) -> None:
        self.has_reg = any(item.example.is_reg for item in self.items)
        self.latent_shift, self.latent_factor = latent_scaling(self.components.vae)  # read once, not per batch

    def __call__(self, loader_batch: dict) -> Batch:
        indices = loader_batch["index"].tolist()
        count = len(indices)
        flips = (torch.rand(count) < 0.5) if self.args.random_flip else torch.zeros(count, dtype=torch.bool)
        vae = self.components.vae
        if self.latent_cache is not None:
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
            params = torch.stack([self.latent_cache.parameters[i][int(f)] for i, f in zip(indices, flips)])
            latents = DiagonalGaussianDistribution(self.to_device(params)).sample()
            ids = torch.stack([self.latent_cache.time_ids[i][int(f)] for i, f in zip(indices, flips)])
        else:
            pixels = loader_batch["pixels"].clone()
            pixels[flips] = pixels[flips].flip(-1)
            latents = vae_latent_distribution(vae, pixels).sample()
            ids = loader_batch["time_ids"][torch.arange(count), flips.long()]
        latents = ((latents.float() - self.latent_shift) * self.latent_factor).to(self.weight_dtype).contiguous()
        captions = [caption_text(self.items[i].example.caption, self.args) for i in indices]
        embeds, pooled = self.encode(captions)
        if self.args.caption_dropout > 0:
            # Dropped captions get zero embeddings: SDXL's unconditional input at inference
            # (force_zeros_for_empty_prompt), which classifier-free guidance contrasts with.
            keep = (torch.rand(count) >= self.args.caption_dropout).to(self.device)
            embeds = embeds * keep[:, None, None].to(embeds.dtype)
            pooled = pooled * keep[:, None].to(pooled.dtype)
        return Batch(latents, embeds.to(self.weight_dtype), pooled.to(self.weight_dtype),
                     ids.to(self.device, self.weight_dtype), self.masks(indices, flips, loader_batch, latents),
                     self.loss_weights(indices))

    def masks(self, indices: list[int], flips: torch.Tensor, loader_batch: dict,
              latents: torch.Tensor) -> torch.Tensor | None:
        """--masked_loss: the batch's masks (B, 1, h, w) at latent size, mirrored where the image is."""
        if not self.args.masked_loss:
            return None
        if self.latent_cache is not None:
            masks = torch.stack([self.latent_cache.masks[i][int(f)] for i, f in zip(indices, flips)])
        else:
            pixels = loader_batch["mask"].clone()
            pixels[flips] = pixels[flips].flip(-1)
            masks = latent_mask(pixels, tuple(latents.shape[-2:]))
        return self.to_device(masks[:, None].contiguous())

    def loss_weights(self, indices: list[int]) -> torch.Tensor | None:
        """(B,): --prior_loss_weight for regularisation images, 1 for the others; None without them."""
        if not self.has_reg:
            return None
        weight = float(self.args.prior_loss_weight)
        return self.to_device(torch.tensor([weight if self.items[i].example.is_reg else 1.0 for i in indices]))

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text_cache is not None:
            embeds = self.to_device(torch.stack([self.text_cache[c][0] for c in captions]))
            pooled = self.to_device(torch.stack([self.text_cache[c][1] for c in captions]))
            return embeds, pooled
        return encode_prompts(self.components.tokenizers, self.components.text_encoders, captions)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Host-to-GPU copies from pinned memory, asynchronous: a pageable copy would wait for the GPU."""
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)


# ----------------------------------------------------------------------------- captions


def shuffles(args) -> bool:
    """Whether captions change from step to step (then their text embeddings cannot be cached)."""
    return bool(args.shuffle_caption)


def caption_text(caption: str, args, generator: torch.Generator | None = None, shuffle: bool = True) -> str:
    """The caption a step trains on. Without shuffling it is fixed (the prefix, if any, added); with it,
    the order of the tokens after the kept ones is drawn from ``generator`` (default: torch's global one,
    which a resumed run restores). ``shuffle=False``: the fixed form (the fixed-noise loss uses it)."""
    separator, prefix = args.caption_separator, args.caption_prefix
    if shuffle and shuffles(args):
        tokens = [token.strip() for token in caption.strip().split(separator)]
        keep = max(0, args.keep_tokens)
        fixed, free = tokens[:keep], tokens[keep:]
        order = torch.randperm(len(free), generator=generator).tolist()
        caption = ", ".join(fixed + [free[i] for i in order])
    if prefix:
        caption = f"{prefix} {caption}"
    return caption
