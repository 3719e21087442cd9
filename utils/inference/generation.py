"""Base vs LoRA generation with one pipeline in memory and the same seeds for both.

Image i of prompt k uses seed + k * num_images + i, from a generator on the pipeline's device (so a seed
gives the same images as the original script on CUDA). Files are numbered from 1:
``base_prompt{k+1}_{ts}_{i+1}.png``, ``lora_prompt{k+1}_{ts}_{i+1}.png``,
``comparison_grid_prompt{k+1}_{ts}.png`` and ``metadata_prompt{k+1}_{ts}.json``.

Base images come first (before any adapter is loaded) or are reused from a base-results folder: from an
earlier run's metadata when it shows the same prompt, seeds, settings and generator device, else (when
base inference is not asked for) by file-name prefix ``base_prompt{k+1}_*.png``.
Then the LoRA is loaded as a named adapter at the requested scale and the same seeds are run again.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from utils.core.atomic import save_image, write_json
from utils.core.names import RUN_STAMP_FORMAT
from utils.inference.base_images import find_base_by_prefix, find_reusable_base, say_missing_base
from utils.inference.flags import GenerationSettings, seeds_for
from utils.inference.grids import comparison_grid
from utils.inference.pipeline import load_adapter

logger = logging.getLogger(__name__)


def generator_device(pipe) -> str:
    """The device type the random generators live on: the pipeline's ('cuda' or 'cpu')."""
    return torch.device(pipe.device).type


def generate(pipe, prompt: str, seeds: list[int], settings: GenerationSettings) -> list[Image.Image]:
    """One image per seed, each from its own generator on the pipeline's device, so any image can be
    reproduced alone."""
    generators = [torch.Generator(device=pipe.device).manual_seed(s) for s in seeds]
    return pipe(
        prompt=[prompt] * len(seeds),
        negative_prompt=[settings.negative_prompt] * len(seeds) if settings.negative_prompt else None,
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
        height=settings.height,
        width=settings.width,
        generator=generators,
    ).images


def _base_for(pipe, k: int, prompt: str, seeds: list[int], settings: GenerationSettings, base_model: str,
              base_results_dir: Path | None, run_base: bool, make_if_missing: bool) -> tuple[list | None, bool]:
    """(base images or None, whether they were missing from ``base_results_dir``) for prompt k."""
    base = None
    if base_results_dir:
        base = find_reusable_base(base_results_dir, prompt, seeds, settings, base_model, generator_device(pipe))
        if base is None and not run_base:
            base = find_base_by_prefix(base_results_dir, k + 1, len(seeds))
    missing = base is None and not run_base
    if base is None and (run_base or make_if_missing):
        base = generate(pipe, prompt, seeds, settings)
    return base, missing


def run_comparison(pipe, prompts: list[str], lora_path: str | None, lora_scale: float,
                   settings: GenerationSettings | list[GenerationSettings], num_images: int, seed: int,
                   output_dir: Path, base_model: str, run_base: bool = True, base_results_dir: Path | None = None,
                   create_grid: bool = True, allow_pickle: bool = False,
                   first_seeds: list[int | None] | None = None) -> list[Path]:
    """Generate, save and (optionally) grid base and LoRA images for every prompt; return metadata paths.

    ``run_base``: generate base images unless ``base_results_dir`` holds them for the same settings.
    Otherwise base images are taken from ``base_results_dir`` (matched by metadata, else by the original's
    file-name prefix); when none are there and a grid is asked for, they are generated for the grid.
    ``settings``: one for all prompts, or one per prompt; ``first_seeds``: per prompt, the seed of its
    first image (the others follow it), or None for the usual seeds.
    """
    per_prompt = settings if isinstance(settings, list) else [settings] * len(prompts)
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime(RUN_STAMP_FORMAT)
    pipe.set_progress_bar_config(disable=True)
    want_grid = create_grid and bool(lora_path)
    records, missing = [], []
    for k, prompt in enumerate(tqdm(prompts, desc="Base images")):
        given = first_seeds[k] if first_seeds else None
        seeds = seeds_for(k, num_images, seed) if given is None else [given + i for i in range(num_images)]
        base, was_missing = _base_for(pipe, k, prompt, seeds, per_prompt[k], base_model, base_results_dir, run_base,
                                      make_if_missing=want_grid)
        if was_missing:
            missing.append(k + 1)
        base_names = _save_all(base or [], output_dir, f"base_prompt{k + 1}_{stamp}")
        records.append({"prompt": prompt, "seeds": seeds, "base": base, "base_images": base_names})
    say_missing_base(missing, base_results_dir, want_grid)
    if create_grid and not lora_path:
        logger.warning("No comparison grids: there are no LoRA images to compare (no --lora_model_path)")
    if lora_path:
        load_adapter(pipe, lora_path, lora_scale, allow_pickle=allow_pickle)
        for k, record in enumerate(tqdm(records, desc="LoRA images")):
            record["lora"] = generate(pipe, record["prompt"], record["seeds"], per_prompt[k])
            record["lora_images"] = _save_all(record["lora"], output_dir, f"lora_prompt{k + 1}_{stamp}")
    metadata_paths = []
    for k, record in enumerate(records):
        grid_name = None
        if create_grid and record.get("base") and record.get("lora"):
            grid_name = save_comparison_grid(record["base"], record["lora"], record["prompt"], lora_scale,
                                             output_dir, k, stamp).name
        meta = original_metadata(k, record["prompt"], per_prompt[k], record["seeds"][0] if first_seeds else seed, lora_path, lora_scale, stamp,
                                 record["base_images"], record.get("lora_images", []), grid_name)
        meta.update(seeds=record["seeds"], settings=asdict(per_prompt[k]), base_model=base_model,
                    generator_device=generator_device(pipe), base_images=record["base_images"],
                    lora_images=record.get("lora_images", []))
        metadata_paths.append(write_metadata(meta, output_dir, k, stamp))
    return metadata_paths


def save_comparison_grid(base: list[Image.Image], lora: list[Image.Image], prompt: str, lora_scale: float,
                         output_dir: Path, k: int, stamp: str) -> Path:
    """Write the base-vs-LoRA grid of prompt k (from 0) as the original's ``comparison_grid_prompt{k+1}_{stamp}.png``;
    return its path."""
    path = output_dir / f"comparison_grid_prompt{k + 1}_{stamp}.png"
    save_image(comparison_grid(base, lora, f"Prompt {k + 1}: {prompt}", f"LoRA x{lora_scale:g}"), path)
    return path


def original_metadata(k: int, prompt: str, settings: GenerationSettings, seed: int, lora_path: str | None,
                      lora_scale: float, stamp: str, base_images: list[str], lora_images: list[str],
                      grid_name: str | None) -> dict:
    """The original's metadata keys, in its order (prompt_idx from 1; comparison_grid only with a grid)."""
    meta = {
        "prompt": prompt, "prompt_idx": k + 1, "negative_prompt": settings.negative_prompt,
        "num_inference_steps": settings.num_inference_steps, "guidance_scale": settings.guidance_scale,
        "height": settings.height, "width": settings.width, "seed": seed, "lora_model_path": lora_path,
        "lora_scale": lora_scale, "timestamp": stamp, "base_model_images": base_images,
        "lora_model_images": lora_images,
    }
    if grid_name:
        meta["comparison_grid"] = grid_name
    return meta


def write_metadata(meta: dict, output_dir: Path, k: int, stamp: str) -> Path:
    """Write the metadata of prompt k (from 0) as the original's ``metadata_prompt{k+1}_{stamp}.json``; return
    its path."""
    path = output_dir / f"metadata_prompt{k + 1}_{stamp}.json"
    write_json(path, meta)
    return path


def _save_all(images: list[Image.Image], folder: Path, stem: str) -> list[str]:
    names = []
    for i, image in enumerate(images):
        name = f"{stem}_{i + 1}.png"
        image.save(folder / name)
        names.append(name)
    return names
