"""The original inference_sdxl_ghibli.py's helper functions, kept importable from that script.

Each takes the original's parameters and returns what the original returned, by calling the library code
that the script's main uses; ``args`` is read, never written. A Namespace made by the original's parser
works too: it has no --revision, --variant or --allow_pickle, so their defaults apply.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from utils.inference.flags import default_lora, settings_of

logger = logging.getLogger("inference_sdxl_ghibli")  # the script's logger, as when these lived there


def _flag(args: argparse.Namespace, name: str, default=None):
    """A flag of this project's parser that the original's had not."""
    return getattr(args, name, default)


def load_base_pipeline(args: argparse.Namespace):
    """The SDXL pipeline of ``--pretrained_model_name_or_path`` on ``--device`` (fp16 on CUDA, fp32 elsewhere);
    without that flag, the base model ``--lora_model_path`` was trained on (else the original's default)."""
    from utils.inference.pipeline import open_pipeline
    from utils.inference.sources import base_model_for

    model = base_model_for(args.pretrained_model_name_or_path, _flag(args, "lora_model_path"))
    pipe, _ = open_pipeline(model, revision=_flag(args, "revision"), variant=_flag(args, "variant", "fp16"),
                            device=args.device, allow_pickle=_flag(args, "allow_pickle", False),
                            model_config=_flag(args, "model_config"))
    return pipe


def load_lora_pipeline(args: argparse.Namespace):
    """The base pipeline with ``--lora_model_path`` loaded as an adapter at ``--lora_scale``.

    A missing LoRA path raises FileNotFoundError, as the original did; without one, the newest
    output_ghibli/*/final_model is used, as main does.
    """
    from utils.inference.pipeline import load_adapter, resolve_lora_source

    allow_pickle = _flag(args, "allow_pickle", False)
    lora_path = args.lora_model_path or default_lora(run_base=False)
    resolve_lora_source(lora_path, allow_pickle)  # fail on a bad path before loading SDXL
    pipe = load_base_pipeline(args)
    load_adapter(pipe, lora_path, args.lora_scale, allow_pickle=allow_pickle)
    logger.info("LoRA %s loaded with scale %s", lora_path, args.lora_scale)
    return pipe


def create_comparison_grid(base_images: list, lora_images: list, args: argparse.Namespace, timestamp: str,
                           prompt_idx: int) -> str:
    """Write ``comparison_grid_prompt{prompt_idx+1}_{timestamp}.png`` (base row on top) in ``--output_dir``
    for ``args.prompts[prompt_idx]``; return its path."""
    from utils.inference.generation import save_comparison_grid

    path = save_comparison_grid(base_images, lora_images, args.prompts[prompt_idx], args.lora_scale,
                                Path(args.output_dir), prompt_idx, timestamp)
    logger.info("Comparison grid saved: %s", path)
    return str(path)


def save_metadata(args: argparse.Namespace, timestamp: str, base_paths: list, lora_paths: list,
                  comparison_path: str | None, prompt_idx: int) -> str:
    """Write ``metadata_prompt{prompt_idx+1}_{timestamp}.json`` in ``--output_dir`` with the original's keys
    (image files by name); return its path."""
    from utils.inference.generation import original_metadata, write_metadata

    meta = original_metadata(
        prompt_idx, args.prompts[prompt_idx], settings_of(args), args.seed, args.lora_model_path, args.lora_scale,
        timestamp, [Path(p).name for p in base_paths], [Path(p).name for p in lora_paths],
        Path(comparison_path).name if comparison_path is not None else None)
    path = write_metadata(meta, Path(args.output_dir), prompt_idx, timestamp)
    logger.info("Metadata saved: %s", path)
    return str(path)
