"""Base-vs-LoRA images for a series of LoRAs (the runs of a sweep, the checkpoints of a run), one pipeline.

The inference flags are inference_sdxl_ghibli.py's own (``parse_inference_args``), so every LoRA gets the
same prompts, seeds and settings as the script would give it, --allow_pickle included.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict
from pathlib import Path

from utils.core.layout import BASE_RESULTS_DIR
from utils.sweep.outputs import read_generation
from utils.sweep.records import SweepError

logger = logging.getLogger("sweep_runs")

RESERVED_INFERENCE_FLAGS = ("--output_dir", "--lora_model_path", "--base_results_dir")


def _already_done(folder: Path, lora: str, args: argparse.Namespace, settings: dict) -> bool:
    """True when ``folder`` holds this LoRA's images for exactly these prompts, seeds and settings."""
    from utils.inference.flags import seeds_for

    done = read_generation(folder)
    return bool(done and done.lora_path == Path(lora) and done.prompts == args.prompts and all(done.lora)
                and done.seeds == [seeds_for(k, args.num_images, args.seed) for k in range(len(args.prompts))]
                and done.settings == settings and done.base_model == args.pretrained_model_name_or_path)


def _inference_args(inference_argv: list[str]) -> argparse.Namespace:
    """The pass-through flags, read by the inference script's parser; the sweep's own flags are refused."""
    from utils.inference.flags import parse_inference_args

    for arg in inference_argv:
        if arg.split("=", 1)[0] in RESERVED_INFERENCE_FLAGS:
            raise SweepError(f"{arg.split('=', 1)[0]}: set by the sweep scripts, not a pass-through flag")
    return parse_inference_args(inference_argv)


def _make_base_images(pipe, args: argparse.Namespace, base_dir: Path) -> None:
    """The base images of every prompt into ``base_dir``, unless it holds them for these settings."""
    from utils.inference.base_images import base_images_ready
    from utils.inference.flags import settings_of
    from utils.inference.generation import generator_device, run_comparison

    model, settings = args.pretrained_model_name_or_path, settings_of(args)
    if base_images_ready(base_dir, args.prompts, args.num_images, args.seed, settings, model,
                         generator_device(pipe)):
        return
    logger.info("Base images into %s", base_dir)
    run_comparison(pipe, args.prompts, None, args.lora_scale, settings, args.num_images, args.seed, base_dir,
                   model, run_base=True, base_results_dir=None, create_grid=False)


def generate_series(loras: list[tuple[str, str]], output_dir: Path, inference_argv: list[str],
                    skip_existing: bool = False, base_dir: Path | None = None) -> list[str]:
    """Base-vs-LoRA images for every (label, LoRA) into ``output_dir/label/``, with one pipeline in memory.

    The base images are made once, into ``base_dir`` (default: ``output_dir/base_model_results``) unless it
    already holds them for these settings, and every LoRA's folder reuses them (the --base_results_dir
    mechanism); each LoRA is loaded, used and deleted again before the next. Returns the labels that failed.
    """
    from tqdm.auto import tqdm

    from utils.inference.flags import settings_of
    from utils.inference.generation import run_comparison
    from utils.inference.pipeline import open_pipeline, resolve_lora_source, unload_adapter
    from utils.inference.sources import with_sources

    args = _inference_args(inference_argv)
    for _, lora in loras:
        resolve_lora_source(lora, args.allow_pickle)  # a missing LoRA fails now, not after loading SDXL
    args = with_sources(args, loras[0][1] if loras else None)  # the base model the runs were trained on
    model, settings = args.pretrained_model_name_or_path, settings_of(args)
    base_dir = base_dir or output_dir / BASE_RESULTS_DIR
    todo = []
    for label, lora in loras:
        if skip_existing and _already_done(output_dir / label, lora, args, asdict(settings)):
            logger.info("Skipping %s: its images are already in %s", label, output_dir / label)
        else:
            todo.append((label, lora))
    if not todo:
        return []
    pipe, _ = open_pipeline(model, revision=args.revision, variant=args.variant, device=args.device,
                            allow_pickle=args.allow_pickle, model_config=args.model_config)
    _make_base_images(pipe, args, base_dir)
    failed = []
    for label, lora in tqdm(todo, desc="LoRAs"):
        try:
            run_comparison(pipe, args.prompts, lora, args.lora_scale, settings, args.num_images, args.seed,
                           output_dir / label, model, run_base=True, base_results_dir=base_dir, create_grid=True,
                           allow_pickle=args.allow_pickle)
        except Exception as error:  # noqa: BLE001 - one bad LoRA must not end the series; it is reported
            logger.error("%s (%s): %s", label, lora, error)
            failed.append(label)
        finally:
            unload_adapter(pipe)
    return failed
