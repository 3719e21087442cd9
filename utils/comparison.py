"""Base vs LoRA generation with one pipeline in memory and the same seeds for both.

Image i of prompt k uses seed + k * num_images + i. Base images come first
(before any adapter is loaded) or are reused from an earlier run's folder when
its metadata shows the same prompt, seeds and settings; then the LoRA is loaded
as a named adapter at the requested scale and the same seeds are run again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from utils.atomic import write_json
from utils.errors import UserError
from utils.grids import comparison_grid

logger = logging.getLogger(__name__)

ADAPTER_NAME = "style"


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


def generate(pipe, prompt: str, seeds: list[int], settings: GenerationSettings) -> list[Image.Image]:
    """One image per seed, each from its own generator, so any image can be reproduced alone."""
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
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
        if not (candidate / "pytorch_lora_weights.safetensors").is_file() and len(files) == 1:
            return str(candidate), {"weight_name": files[0].name, "use_safetensors": True}
        return str(candidate), {"use_safetensors": True}
    if path.count("/") == 1 and not path.startswith((".", "/")):
        return path, {"use_safetensors": not allow_pickle}  # a Hub repo id
    raise FileNotFoundError(f"{path}: LoRA folder or file not found")


def load_adapter(pipe, lora_path: str, scale: float, weight_name: str | None = None,
                 allow_pickle: bool = False) -> None:
    """Load a LoRA as a named adapter and set its scale (any value, 0 and 1 included)."""
    source, kwargs = resolve_lora_source(lora_path, allow_pickle)
    if weight_name:
        kwargs["weight_name"] = weight_name
    pipe.load_lora_weights(source, adapter_name=ADAPTER_NAME, **kwargs)
    pipe.set_adapters([ADAPTER_NAME], adapter_weights=[scale])


def find_reusable_base(base_dir: Path, prompt: str, seeds: list[int], settings: GenerationSettings,
                       base_model: str) -> list[Image.Image] | None:
    """Base images saved earlier for exactly this prompt, these seeds and these settings, if any."""
    for meta_path in sorted(base_dir.glob("metadata_prompt*_*.json"), reverse=True):
        meta = json.loads(meta_path.read_text())
        same = (meta.get("prompt") == prompt and meta.get("seeds") == seeds
                and meta.get("settings") == asdict(settings) and meta.get("base_model") == base_model)
        files = [base_dir / name for name in meta.get("base_images", [])]
        if same and files and all(f.is_file() for f in files):
            logger.info("Reusing base images for '%s' from %s", prompt[:40], base_dir)
            return [Image.open(f).convert("RGB") for f in files]
    return None


def run_comparison(pipe, prompts: list[str], lora_path: str | None, lora_scale: float, settings: GenerationSettings,
                   num_images: int, seed: int, output_dir: Path, base_model: str, run_base: bool = True,
                   base_results_dir: Path | None = None, create_grid: bool = True,
                   allow_pickle: bool = False) -> list[Path]:
    """Generate, save and (optionally) grid base and LoRA images for every prompt; return metadata paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    pipe.set_progress_bar_config(disable=True)
    records = []
    for k, prompt in enumerate(tqdm(prompts, desc="Base images")):
        seeds = seeds_for(k, num_images, seed)
        base = find_reusable_base(base_results_dir, prompt, seeds, settings, base_model) if base_results_dir else None
        if base is None and run_base:
            base = generate(pipe, prompt, seeds, settings)
        base_names = _save_all(base or [], output_dir, f"base_prompt{k}_{stamp}")
        records.append({"prompt": prompt, "seeds": seeds, "base": base, "base_images": base_names})
    if lora_path:
        load_adapter(pipe, lora_path, lora_scale, allow_pickle=allow_pickle)
        for k, record in enumerate(tqdm(records, desc="LoRA images")):
            record["lora"] = generate(pipe, record["prompt"], record["seeds"], settings)
            record["lora_images"] = _save_all(record["lora"], output_dir, f"lora_prompt{k}_{stamp}")
    metadata_paths = []
    for k, record in enumerate(records):
        grid_name = None
        if create_grid and record.get("base") and record.get("lora"):
            grid_name = f"comparison_grid_prompt{k}_{stamp}.png"
            comparison_grid(record["base"], record["lora"], record["prompt"],
                            f"LoRA x{lora_scale:g}").save(output_dir / grid_name)
        meta = {
            "prompt": record["prompt"], "seeds": record["seeds"], "settings": asdict(settings),
            "base_model": base_model, "lora_model_path": lora_path, "lora_scale": lora_scale,
            "base_images": record["base_images"], "lora_images": record.get("lora_images", []),
            "comparison_grid": grid_name, "timestamp": stamp,
        }
        path = output_dir / f"metadata_prompt{k}_{stamp}.json"
        write_json(path, meta)
        metadata_paths.append(path)
    return metadata_paths


def _save_all(images: list[Image.Image], folder: Path, stem: str) -> list[str]:
    names = []
    for i, image in enumerate(images):
        name = f"{stem}_{i}.png"
        image.save(folder / name)
        names.append(name)
    return names
