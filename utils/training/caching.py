"""Caching (the default): every image encoded once with the VAE, in both orientations when
``--random_flip`` is on, and every caption once with both text encoders; optionally kept on disk
(``--cache_latents_to_disk``) for later runs. The cache stores the VAE's latent *distribution*, so a
latent is still sampled afresh each step, exactly as without the cache."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from utils.core.atomic import replace_file
from utils.core.sdxl import encode_prompts, vae_latent_distribution
from utils.training.batches import Item, latent_mask, orientation_time_ids, prepare_item, prepare_mask
from utils.training.model_inputs import caption_text, shuffles

logger = logging.getLogger(__name__)


def latent_cache_dir(args) -> Path:
    """--cache_latents_to_disk: the folder shared by the runs of one --output_dir."""
    return Path(args.output_dir) / ".latent_cache"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def latent_cache_key(item: Item, model_id: str, center_crop: bool, masks: bool = False) -> str:
    """Changes whenever the image content, model, bucket or crop would change the latents; with ``masks``
    (--masked_loss) also the mask's content, so a file cached without its mask is never read for one."""
    parts = [_file_digest(item.example.image_path), model_id, item.bucket, center_crop, item.crop_seed]
    if masks:
        source = item.example.mask_path
        parts.append(["mask", "none" if source is None else "alpha" if source == item.example.image_path
                      else _file_digest(source)])
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


@dataclass
class LatentCache:
    """Per item: VAE distribution parameters (2, 2C, h, w) for both orientations, and time ids (2, 6);
    with --masked_loss the loss masks at latent size (2, h, w), row 1 mirrored."""

    parameters: list[torch.Tensor]
    time_ids: list[torch.Tensor]
    masks: list[torch.Tensor] | None = None


@torch.no_grad()
def cache_latents(items: list[Item], vae, center_crop: bool, flip: bool, model_id: str,
                  cache_dir: Path | None = None, masks: bool = False) -> LatentCache:
    cache = LatentCache([], [], [] if masks else None)
    for item in tqdm(items, desc="Caching latents", leave=False):
        # The key reads the whole image file: computed only when a disk cache is kept.
        path = cache_dir / f"{latent_cache_key(item, model_id, center_crop, masks)}.safetensors" if cache_dir else None
        if path is not None and path.is_file():
            stored = load_file(str(path))
        else:
            stored = _encode(item, vae, center_crop, flip, masks)
            if path is not None:
                replace_file(path, lambda temporary: save_file(stored, str(temporary)))
        cache.parameters.append(stored["parameters"])
        cache.time_ids.append(stored["time_ids"])
        if masks:
            cache.masks.append(stored["masks"])
    return cache


def _encode(item: Item, vae, center_crop: bool, flip: bool, masks: bool) -> dict[str, torch.Tensor]:
    """One item's cache entry: latent distribution and time ids of both orientations (and its mask)."""
    prepared = prepare_item(item, center_crop)
    pixels = torch.stack([prepared.pixels, prepared.pixels.flip(-1)] if flip else [prepared.pixels])
    params = vae_latent_distribution(vae, pixels).parameters.float().cpu()
    if not flip:
        params = torch.cat([params, params])  # row 1 is never used without flips
    stored = {"parameters": params.contiguous(), "time_ids": orientation_time_ids(prepared)}
    if masks:
        mask = latent_mask(prepare_mask(item, center_crop), tuple(params.shape[-2:]))
        stored["masks"] = torch.stack([mask, mask.flip(-1)]).contiguous()
    return stored


@torch.no_grad()
def cache_text(captions: list[str], tokenizers: list,
               text_encoders: list) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Caption -> (prompt_embeds (77, D), pooled (P,)), computed once per distinct caption."""
    cache = {}
    for caption in tqdm(sorted(set(captions)), desc="Caching text embeddings", leave=False):
        embeds, pooled = encode_prompts(tokenizers, text_encoders, [caption])
        cache[caption] = (embeds[0].float().cpu(), pooled[0].float().cpu())
    return cache


def fill_caches(batch_maker, items: list[Item], args, accelerator) -> None:
    """Fill the BatchMaker's latent (and, unless the text encoders train, text) cache; then release the encoders."""
    components = batch_maker.components
    model_id = (f"{args.pretrained_model_name_or_path}|{args.pretrained_vae_model_name_or_path}"
                f"|{args.revision}")
    folder = latent_cache_dir(args) if args.cache_latents_to_disk else None
    with accelerator.main_process_first():
        batch_maker.latent_cache = cache_latents(items, components.vae, args.center_crop, args.random_flip,
                                                 model_id, folder, args.masked_loss)
    if shuffles(args) and not args.train_text_encoder:
        logger.info("Text embeddings are not cached: --shuffle_caption changes the captions at every step "
                    "(the latents stay cached)")
    elif not args.train_text_encoder:
        captions = [caption_text(i.example.caption, args) for i in items]
        with accelerator.main_process_first():
            batch_maker.text_cache = cached_text(captions, components, model_id, folder)
    release_encoders(components, args, accelerator)


def cached_text(captions: list[str], components, model_id: str, cache_dir: Path | None) -> dict:
    """The text-embedding cache, read from ``cache_dir`` when an earlier run (e.g. of the same sweep)
    wrote it for the same model and captions, else computed (and written there)."""
    distinct = sorted(set(captions))
    key = hashlib.sha256(json.dumps([model_id, distinct]).encode()).hexdigest()[:32]
    path = cache_dir / f"text_{key}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        stored = load_file(str(path))
        logger.info("Text embeddings read from %s", path)
        return {c: (stored["embeds"][i], stored["pooled"][i]) for i, c in enumerate(distinct)}
    cache = cache_text(distinct, components.tokenizers, components.text_encoders)
    if path is not None:
        stored = {"embeds": torch.stack([cache[c][0] for c in distinct]).contiguous(),
                  "pooled": torch.stack([cache[c][1] for c in distinct]).contiguous()}
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(path, lambda temporary: save_file(stored, str(temporary)))
    return cache


def release_encoders(components, args, accelerator) -> None:
    """After caching, the VAE (and the text encoders, unless trained) leave the accelerator."""
    if accelerator.device.type == "cpu":
        return
    components.vae.to("cpu")
    if not args.train_text_encoder:
        for encoder in components.text_encoders:
            encoder.to("cpu")
    torch.cuda.empty_cache()
