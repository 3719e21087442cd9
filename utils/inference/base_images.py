"""Base-model images saved by an earlier call, found again so a comparison need not make them twice.

Two ways to find them in a base-results folder: by metadata (the same prompt, seeds, settings, base model
and generator device: the images are then exactly the ones this call would make), or the original's way,
by file-name prefix ``base_prompt{k}_*.png`` (used when base inference is not asked for).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict
from pathlib import Path

from PIL import Image

from utils.data.images import open_all
from utils.inference.flags import GenerationSettings, seeds_for

logger = logging.getLogger(__name__)


def find_reusable_base(base_dir: Path, prompt: str, seeds: list[int], settings: GenerationSettings,
                       base_model: str, device: str = "cpu") -> list[Image.Image] | None:
    """Base images saved earlier for exactly this prompt, these seeds, settings and generator device, if any."""
    if not base_dir.is_dir():
        return None
    for meta_path in sorted(base_dir.glob("metadata_prompt*_*.json"), reverse=True):
        meta = _read_metadata(meta_path)
        if meta is None:
            continue
        same = (meta.get("prompt") == prompt and meta.get("seeds") == seeds
                and meta.get("settings") == asdict(settings) and meta.get("base_model") == base_model
                and meta.get("generator_device", "cpu") == device)
        files = [base_dir / name for name in meta.get("base_images", [])]
        if same and files and all(f.is_file() for f in files):
            logger.info("Reusing base images for '%s' from %s", prompt[:40], base_dir)
            return open_all(files)
    return None


def _read_metadata(path: Path) -> dict | None:
    """A saved metadata file, or None (with a warning naming it) when it cannot be read as a JSON object:
    reuse only saves time, so a damaged file means the base images are generated again."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        logger.warning("%s: not readable metadata (%s); its base images are not reused", path, error)
        return None
    if not isinstance(meta, dict):
        logger.warning("%s: metadata is not a JSON object; its base images are not reused", path)
        return None
    return meta


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
    return open_all(files[:num_images])


def base_images_ready(base_dir: Path, prompts: list[str], num_images: int, seed: int,
                      settings: GenerationSettings, base_model: str, device: str) -> bool:
    """True when ``base_dir`` holds reusable base images (matched by metadata) for every prompt."""
    return all(find_reusable_base(base_dir, prompt, seeds_for(k, num_images, seed), settings, base_model, device)
               for k, prompt in enumerate(prompts))


def say_missing_base(missing: list[int], base_results_dir: Path | None, want_grid: bool) -> None:
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
