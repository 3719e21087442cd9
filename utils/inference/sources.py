"""What an inference call loads, settled before anything is loaded: the LoRA (a run folder means its
final_model/, or best_model/ when asked), the base model (the flag; else the one the LoRA was trained on, as
its run or its file records it; else the original's default), and sizes and counts that can work.

No torch here: these run before SDXL is loaded, so a mistake costs a second, not a model load.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from utils.core.cli import derived
from utils.core.errors import UserError
from utils.core.layout import BEST_MODEL, CONFIG_FILE, FINAL_MODEL, LORA_WEIGHT_NAME
from utils.core.model_source import check_base_model, resolve_model_source
from utils.core.names import SDXL_BASE_ID

logger = logging.getLogger(__name__)


def is_run_folder(path: Path) -> bool:
    """A training run's folder: it has experiment_config.json or a final_model/ with LoRA weights."""
    return path.is_dir() and ((path / CONFIG_FILE).is_file() or (path / FINAL_MODEL / LORA_WEIGHT_NAME).is_file())


def lora_model_folder(path: str, use_best: bool = False, flag: str = "--lora_model_path") -> str:
    """The LoRA to load for ``path``: a run folder gives its final_model/ (best_model/ with ``use_best``);
    a model folder, a file or a Hub id stays as it is. A name that is none of these fails in one line."""
    folder = Path(path)
    if is_run_folder(folder) and not any(folder.glob("*.safetensors")):
        chosen = folder / (BEST_MODEL if use_best else FINAL_MODEL)
        if not chosen.is_dir():
            hint = "" if use_best else " (an interrupted run: pass its interrupted_model/ or a checkpoint_epoch_N/)"
            raise FileNotFoundError(f"{flag} {path}: a run folder without {chosen.name}/{hint}")
        logger.info("%s %s is a run folder: using its %s/", flag, path, chosen.name)
        return str(chosen)
    if use_best:
        raise UserError(f"--use_best_model: {flag} {path} is not a run folder (with experiment_config.json)")
    resolve_model_source(path, flag)
    return path


def recorded_base_model(lora_path: str | None) -> tuple[str, str] | None:
    """(base model, where it is recorded) for a LoRA trained by this project: its run's experiment_config.json,
    else the training facts in its .safetensors header; None when neither records one."""
    if not lora_path:
        return None
    path = Path(lora_path)
    if not path.exists():
        return None  # a Hub id: no run to read
    model_folder = path.parent if path.is_file() else path
    config = model_folder.parent / CONFIG_FILE
    if config.is_file():
        try:
            name = json.loads(config.read_text(encoding="utf-8")).get("pretrained_model_name_or_path")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            name = None
        if name:
            return str(name), str(config)
    weights = path if path.is_file() else model_folder / LORA_WEIGHT_NAME
    if weights.is_file() and weights.suffix == ".safetensors":
        from utils.lora.files import TRAINING_METADATA_KEY, read_metadata

        try:
            facts = json.loads(read_metadata(weights).get(TRAINING_METADATA_KEY) or "{}")
        except (OSError, ValueError):
            facts = {}
        if facts.get("base_model"):
            return str(facts["base_model"]), f"{weights}'s metadata"
    return None


def base_model_for(given: str | None, lora_path: str | None, flag: str = "--pretrained_model_name_or_path") -> str:
    """The base model to load, with one log line saying which and why: the flag when given; else the one the
    LoRA was trained on, when its run records one; else the original's default."""
    if given:
        logger.info("Base model %s (%s)", given, flag)
        return given
    recorded = recorded_base_model(lora_path)
    if recorded:
        logger.info("Base model %s: the one the LoRA was trained on (recorded in %s; %s overrides it)",
                    recorded[0], recorded[1], flag)
        return recorded[0]
    logger.info("Base model %s: the default (no %s, and no base model recorded for the LoRA)", SDXL_BASE_ID, flag)
    return SDXL_BASE_ID


def recorded_model_config(lora_path: str | None) -> str | None:
    """The --model_config the LoRA's run was trained with (a single-file base model's configs), if any."""
    if not lora_path or not Path(lora_path).exists():
        return None
    path = Path(lora_path)
    config = (path.parent if path.is_file() else path).parent / CONFIG_FILE
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_config") if config.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


def with_sources(args: argparse.Namespace, lora_path: str | None) -> argparse.Namespace:
    """``args`` with ``pretrained_model_name_or_path`` (and, for a single-file base model taken from the run,
    ``model_config``) settled for ``lora_path`` and checked -- loadable from here, a single file with its
    configs -- before anything is loaded."""
    model = base_model_for(args.pretrained_model_name_or_path, lora_path)
    model_config = getattr(args, "model_config", None)
    if model_config is None and not args.pretrained_model_name_or_path:
        model_config = recorded_model_config(lora_path)
    check_base_model(model, "--pretrained_model_name_or_path", model_config)
    return derived(args, pretrained_model_name_or_path=model, model_config=model_config)


def check_sizes(args: argparse.Namespace) -> None:
    """Sizes, steps and counts that cannot work, refused in one line each before the model is loaded."""
    for flag, value in (("--height", args.height), ("--width", args.width)):
        check_side(flag, value)
    for flag, value in (("--num_inference_steps", args.num_inference_steps), ("--num_images", args.num_images)):
        if value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
    if args.guidance_scale < 0:
        raise UserError(f"--guidance_scale {args.guidance_scale}: must not be negative")
    for spec in getattr(args, "prompt_specs", None) or []:
        for flag, value in (("--h", spec.height), ("--w", spec.width)):
            if value is not None:
                check_side(f"{args.prompts_file}: {spec.prompt!r} {flag}", value)
        if spec.steps is not None and spec.steps < 1:
            raise UserError(f"{args.prompts_file}: {spec.prompt!r} --s {spec.steps}: must be at least 1")


def check_side(flag: str, value: int | None) -> None:
    """An image side SDXL can make: a positive multiple of 8 (the VAE's downscale factor), the rule training's
    --resolution follows too."""
    if value is not None and (value < 8 or value % 8):
        raise UserError(f"{flag} {value}: must be a positive multiple of 8 (the VAE's downscale factor)")
