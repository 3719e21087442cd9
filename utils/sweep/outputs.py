"""What inference_sdxl_ghibli.py (or the sweep's ``generate``) left in a folder, read back from its metadata."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from utils.sweep.records import SweepError, read_json


@dataclass
class Generation:
    """What one inference_sdxl_ghibli.py call left in its folder (its newest call there)."""

    folder: Path
    lora_path: Path | None
    prompts: list[str]
    seeds: list[list[int]]
    base: list[list[Path]]
    lora: list[list[Path]]
    settings: dict | None = None
    base_model: str | None = None


def read_generation(folder: Path) -> Generation | None:
    """The newest set of metadata_prompt{k}_{ts}.json in ``folder``, or None when there is none."""
    by_stamp: dict[str, dict[int, dict]] = {}
    for path in folder.glob("metadata_prompt*_*.json"):
        match = re.fullmatch(r"metadata_prompt(\d+)_(.+)\.json", path.name)
        if match:
            by_stamp.setdefault(match.group(2), {})[int(match.group(1))] = read_json(path)
    if not by_stamp:
        return None
    stamp = max(by_stamp)
    metas = by_stamp[stamp]
    if sorted(metas) != list(range(1, len(metas) + 1)):
        raise SweepError(f"{folder}: metadata files of {stamp} are incomplete (prompts {sorted(metas)})")
    ordered = [metas[k] for k in sorted(metas)]
    lora = ordered[0].get("lora_model_path")
    return Generation(
        folder=folder, lora_path=Path(lora) if lora else None, prompts=[m["prompt"] for m in ordered],
        seeds=[m.get("seeds") or [] for m in ordered],
        base=[[folder / n for n in m.get("base_images", [])] for m in ordered],
        lora=[[folder / n for n in m.get("lora_images", [])] for m in ordered],
        settings=ordered[0].get("settings"), base_model=ordered[0].get("base_model"),
    )


def lora_generations(inference_dir: Path, folders: list[str] | None = None) -> list[Generation]:
    """Every subfolder of ``inference_dir`` (or those named in ``folders``) that holds LoRA images,
    checked to share prompts and seeds."""
    if not inference_dir.is_dir():
        raise SweepError(f"{inference_dir}: folder not found")
    found = []
    chosen = [inference_dir / name for name in folders] if folders else inference_dir.iterdir()
    for folder in sorted(p for p in chosen if p.is_dir()):
        generation = read_generation(folder)
        if generation and generation.lora_path and all(generation.lora):
            found.append(generation)
    if not found:
        raise SweepError(f"{inference_dir}: no LoRA images found (no metadata_prompt*.json with lora_images)")
    reference = found[0]
    for generation in found[1:]:
        if generation.prompts != reference.prompts or generation.seeds != reference.seeds:
            raise SweepError(f"{generation.folder}: generated with other prompts or seeds than "
                             f"{reference.folder}; compare runs only on the same prompts and seeds")
    return found


def base_images(generations: list[Generation]) -> list[list[Path]]:
    for generation in generations:
        if all(generation.base):
            return generation.base
    raise SweepError(f"{generations[0].folder.parent}: no base images saved (run with --run_base_inference)")
