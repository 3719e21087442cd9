"""Base vs LoRA generation with one pipeline in memory and the same seeds for both.

Image i of prompt k uses seed + k * num_images + i, from a generator on the pipeline's device (as the
original, so a seed gives the original's images on CUDA). Files are numbered from 1 as the original's:
``base_prompt{k+1}_{ts}_{i+1}.png``, ``lora_prompt{k+1}_{ts}_{i+1}.png``,
``comparison_grid_prompt{k+1}_{ts}.png`` and ``metadata_prompt{k+1}_{ts}.json``.

Base images come first (before any adapter is loaded) or are reused from a base-results folder: from an
earlier run's metadata when it shows the same prompt, seeds, settings and generator device, else (when
base inference is not asked for) the original's way, by file-name prefix ``base_prompt{k+1}_*.png``.
Then the LoRA is loaded as a named adapter at the requested scale and the same seeds are run again.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from utils.core.atomic import write_json
from utils.core.errors import UserError
from utils.inference.grids import comparison_grid, save_image

logger = logging.getLogger(__name__)

ADAPTER_NAME = "style"
WEIGHTS_FILE = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class GenerationSettings:
    negative_prompt: str
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int


def pick_device(requested: str | None) -> str:
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {requested}: CUDA is not available on this machine")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def seeds_for(prompt_index: int, num_images: int, seed: int) -> list[int]:
    return [seed + prompt_index * num_images + i for i in range(num_images)]


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


PICKLE_WARNING = ("is a pickle-based file, which can run arbitrary code when loaded; convert it to .safetensors "
                  "or pass --allow_pickle if you trust its source")


def resolve_lora_source(path: str, allow_pickle: bool = False) -> tuple[str, dict]:
    """``load_lora_weights`` arguments for a folder, a single LoRA file, or a Hub id."""
    candidate = Path(path)
    if candidate.is_file():
        if candidate.suffix != ".safetensors" and not allow_pickle:
            raise UserError(f"{candidate} {PICKLE_WARNING}")
        return str(candidate.parent), {"weight_name": candidate.name, "use_safetensors": not allow_pickle}
    if candidate.is_dir():
        files = sorted(candidate.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{candidate}: no .safetensors LoRA file in this folder")
        if not (candidate / WEIGHTS_FILE).is_file() and len(files) == 1:
            return str(candidate), {"weight_name": files[0].name, "use_safetensors": True}
        return str(candidate), {"use_safetensors": True}
    if path.count("/") == 1 and not path.startswith((".", "/")):
        return path, {"use_safetensors": not allow_pickle}  # a Hub repo id
    raise FileNotFoundError(f"{path}: LoRA folder or file not found")


def newest_final_model(runs_dir: Path) -> Path | None:
    """``{runs_dir}/*/final_model`` holding LoRA weights, the one written last; None when there is none."""
    if not runs_dir.is_dir():
        return None
    found = [p / "final_model" for p in runs_dir.iterdir() if (p / "final_model" / WEIGHTS_FILE).is_file()]
    return max(found, key=lambda p: (p / WEIGHTS_FILE).stat().st_mtime, default=None)


def load_adapter(pipe, lora_path: str, scale: float, weight_name: str | None = None,
                 allow_pickle: bool = False) -> None:
    """Load a LoRA as a named adapter and set its scale (any value, 0 and 1 included)."""
    source, kwargs = resolve_lora_source(lora_path, allow_pickle)
    if weight_name:
        kwargs["weight_name"] = weight_name
    pipe.load_lora_weights(source, adapter_name=ADAPTER_NAME, **kwargs)
    pipe.set_adapters([ADAPTER_NAME], adapter_weights=[scale])


def find_reusable_base(base_dir: Path, prompt: str, seeds: list[int], settings: GenerationSettings,
                       base_model: str, device: str = "cpu") -> list[Image.Image] | None:
    """Base images saved earlier for exactly this prompt, these seeds, settings and generator device, if any."""
    if not base_dir.is_dir():
        return None
    for meta_path in sorted(base_dir.glob("metadata_prompt*_*.json"), reverse=True):
        meta = json.loads(meta_path.read_text())
        same = (meta.get("prompt") == prompt and meta.get("seeds") == seeds
                and meta.get("settings") == asdict(settings) and meta.get("base_model") == base_model
                and meta.get("generator_device", "cpu") == device)
        files = [base_dir / name for name in meta.get("base_images", [])]
        if same and files and all(f.is_file() for f in files):
            logger.info("Reusing base images for '%s' from %s", prompt[:40], base_dir)
            return [_open_rgb(f) for f in files]
    return None


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def find_base_by_prefix(base_dir: Path, prompt_number: int, num_images: int) -> list[Image.Image] | None:
    """The original's reuse: the first ``num_images`` files ``base_prompt{prompt_number}_*.png`` in name order."""
    if not base_dir.is_dir():
        return None
    prefix = f"base_prompt{prompt_number}_"
    files = sorted((p for p in base_dir.glob(f"{prefix}*.png") if p.name.startswith(prefix)),
                   key=lambda p: _natural_key(p.name))
    if len(files) < num_images:
        return None
    logger.info("Using base images %s from %s", ", ".join(p.name for p in files[:num_images]), base_dir)
    return [_open_rgb(f) for f in files[:num_images]]


def base_images_ready(base_dir: Path, prompts: list[str], num_images: int, seed: int,
                      settings: GenerationSettings, base_model: str, device: str) -> bool:
    """True when ``base_dir`` holds reusable base images (matched by metadata) for every prompt."""
    return all(find_reusable_base(base_dir, prompt, seeds_for(k, num_images, seed), settings, base_model, device)
               for k, prompt in enumerate(prompts))


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


def run_comparison(pipe, prompts: list[str], lora_path: str | None, lora_scale: float, settings: GenerationSettings,
                   num_images: int, seed: int, output_dir: Path, base_model: str, run_base: bool = True,
                   base_results_dir: Path | None = None, create_grid: bool = True,
                   allow_pickle: bool = False) -> list[Path]:
    """Generate, save and (optionally) grid base and LoRA images for every prompt; return metadata paths.

    ``run_base``: generate base images unless ``base_results_dir`` holds them for the same settings.
    Otherwise base images are taken from ``base_results_dir`` (matched by metadata, else by the original's
    file-name prefix); when none are there and a grid is asked for, they are generated for the grid.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    pipe.set_progress_bar_config(disable=True)
    want_grid = create_grid and bool(lora_path)
    records, missing = [], []
    for k, prompt in enumerate(tqdm(prompts, desc="Base images")):
        seeds = seeds_for(k, num_images, seed)
        base, was_missing = _base_for(pipe, k, prompt, seeds, settings, base_model, base_results_dir, run_base,
                                      make_if_missing=want_grid)
        if was_missing:
            missing.append(k + 1)
        base_names = _save_all(base or [], output_dir, f"base_prompt{k + 1}_{stamp}")
        records.append({"prompt": prompt, "seeds": seeds, "base": base, "base_images": base_names})
    _say_missing_base(missing, base_results_dir, want_grid)
    if create_grid and not lora_path:
        logger.warning("No comparison grids: there are no LoRA images to compare (no --lora_model_path)")
    if lora_path:
        load_adapter(pipe, lora_path, lora_scale, allow_pickle=allow_pickle)
        for k, record in enumerate(tqdm(records, desc="LoRA images")):
            record["lora"] = generate(pipe, record["prompt"], record["seeds"], settings)
            record["lora_images"] = _save_all(record["lora"], output_dir, f"lora_prompt{k + 1}_{stamp}")
    metadata_paths = []
    for k, record in enumerate(records):
        grid_name = None
        if create_grid and record.get("base") and record.get("lora"):
            grid_name = f"comparison_grid_prompt{k + 1}_{stamp}.png"
            save_image(comparison_grid(record["base"], record["lora"], f"Prompt {k + 1}: {record['prompt']}",
                                       f"LoRA x{lora_scale:g}"), output_dir / grid_name)
        path = output_dir / f"metadata_prompt{k + 1}_{stamp}.json"
        write_json(path, _metadata(k, record, settings, seed, lora_path, lora_scale, stamp, grid_name, base_model,
                                   generator_device(pipe)))
        metadata_paths.append(path)
    return metadata_paths


def _say_missing_base(missing: list[int], base_results_dir: Path | None, want_grid: bool) -> None:
    """One line for every prompt whose base images were not in the base-results folder."""
    if not missing:
        return
    where = base_results_dir or "(no --base_results_dir)"
    numbers = ", ".join(str(n) for n in missing)
    if want_grid:
        logger.warning("No saved base images for prompt(s) %s in %s: generated them for the comparison grid",
                       numbers, where)
    else:
        logger.warning("No saved base images for prompt(s) %s in %s: LoRA images only (pass "
                       "--run_base_inference to make them)", numbers, where)


def _metadata(k: int, record: dict, settings: GenerationSettings, seed: int, lora_path: str | None,
              lora_scale: float, stamp: str, grid_name: str | None, base_model: str, device: str) -> dict:
    """The original's keys (prompt_idx from 1), then this project's extra keys."""
    meta = {
        "prompt": record["prompt"], "prompt_idx": k + 1, "negative_prompt": settings.negative_prompt,
        "num_inference_steps": settings.num_inference_steps, "guidance_scale": settings.guidance_scale,
        "height": settings.height, "width": settings.width, "seed": seed, "lora_model_path": lora_path,
        "lora_scale": lora_scale, "timestamp": stamp, "base_model_images": record["base_images"],
        "lora_model_images": record.get("lora_images", []),
    }
    if grid_name:
        meta["comparison_grid"] = grid_name
    meta.update(seeds=record["seeds"], settings=asdict(settings), base_model=base_model, generator_device=device,
                base_images=record["base_images"], lora_images=record.get("lora_images", []))
    return meta


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _save_all(images: list[Image.Image], folder: Path, stem: str) -> list[str]:
    names = []
    for i, image in enumerate(images):
        name = f"{stem}_{i + 1}.png"
        image.save(folder / name)
        names.append(name)
    return names
