"""Training speed and memory: the naive loop against our default path, and each speed/memory lever.

Every variant trains the same model on the same synthetic images with the trainer's own code
(``recipe.set_up`` and ``recipe.train_step``: loading, LoRA, caches, accelerate), each in a fresh
process so peak memory is its own; rounds are interleaved (naive, ours, ..., naive, ours, ...) so
background load hits all variants alike, and a last run alternates naive and cached steps in one
process for a speed ratio that background load cannot skew.

  naive   the original's loop: VAE and both text encoders run on every step (--no-cache)
  ours    the default: latents and embeddings cached once, encoders off the accelerator,
          SDPA attention, fp32 LoRA parameters, frozen weights in the compute dtype
  levers  ours with one change each: gradient checkpointing toggled, channels-last UNet,
          encoders kept on the device, 8-bit AdamW, another precision, torch.compile

'naive' against 'ours' is also the caching benchmark (--cache against --no-cache).

Whole runs (--whole_run, on by default): train_sdxl_lora.py itself, start to exit, for
  naive      the original's loop: encoders every step (--no-cache), gradient checkpointing always on,
             no fixed-noise evaluation
  previous   an earlier default of this project: cached, checkpointing on, fixed-noise loss after every epoch
             on 32 triples
  default    no flags: cached, checkpointing auto, evaluation within ~5% of the compute
with the time to the first step, the first-to-last-step rate, the steady-state rate (median step
interval), the wall time and the peak RSS, and the ratios default / naive in one run. With
--diffusers_script PATH, diffusers' train_text_to_image_lora_sdxl.py runs too, on the same model,
images, resolution, rank and steps (its own defaults otherwise), and default / example is printed.

    python utils/benchmark_train.py --model small                  # CPU, a few minutes
    python utils/benchmark_train.py --model sdxl --resolution 1024 --mixed_precision bf16   # GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from utils.bench.diffusers_run import DIFFUSERS_KEY, diffusers_run
from utils.bench.models import MODELS, check_resolution
from utils.bench.steps import Variant, all_variants, skip_reason, trainer_args
from utils.bench.train_runs import (RESULT_MARK, WHOLE_RUNS, report, report_whole_runs, resolve_settings, run_here, run_in_subprocess, save_model, summarise, whole_run, worker)
from utils.core.cli import Parser, run_cli
from utils.core.errors import UserError

logger = logging.getLogger("benchmark_train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python utils/benchmark_train.py --model small")
    p.add_argument("--model", choices=MODELS, default="small",
                   help="tiny: the test model; small: SDXL topology at 1/4 width (CPU); sdxl: full size (GPU)")
    p.add_argument("--resolution", type=int, default=None, help="default: tiny 128, small 256, sdxl 1024")
    p.add_argument("--train_batch_size", type=int, default=1)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="default: bf16 on a GPU that has it, else fp16; no (fp32) on CPU")
    p.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="setting of the naive/ours step comparison (default: the trainer's auto choice, off "
                        "on a CPU; on a GPU, on when the step would not fit); the 'gc' variant measures the other")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default by model)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default by model)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default: 2 on CPU, 1 on GPU)")
    p.add_argument("--variants", default=None,
                   help="comma-separated subset of: naive, ours, gc, channels_last, encoders_on_device, "
                        "adamw8bit, compile, bf16, fp16, fp32 (default: all that apply here)")
    p.add_argument("--torch_compile", action="store_true", help="also measure torch.compile of the UNet")
    p.add_argument("--fresh_processes", action=argparse.BooleanOptionalAction, default=True,
                   help="each variant in a fresh process, so its peak memory is its own (default on); "
                        "--no-fresh_processes runs them one after another in this process: seconds each "
                        "instead of the imports of a new Python, for proving the paths on a CPU")
    p.add_argument("--num_images", type=int, default=8, help="synthetic training images")
    p.add_argument("--num_threads", type=int, default=None,
                   help="CPU threads per process (default: 1 on CPU, where a busy shared machine makes "
                        "multi-threaded timings erratic; torch's default with a GPU)")
    p.add_argument("--buckets", action="store_true", help="aspect buckets (default: square crops, one shape)")
    p.add_argument("--paired", action=argparse.BooleanOptionalAction, default=True,
                   help="also time naive and ours alternating step by step in one process (default on): "
                        "the speed ratio that background load cannot skew")
    p.add_argument("--flops_only", action="store_true",
                   help="only count the FLOPs of a step (on the meta device: instant, any model, no GPU)")
    p.add_argument("--whole_run", choices=["on", "off", "only"], default="on",
                   help="also time whole training runs (naive, previous, default) through the CLI; 'only' skips "
                        "the per-step variants")
    p.add_argument("--whole_run_steps", type=int, default=24, help="optimizer steps of each whole run")
    p.add_argument("--diffusers_script", default=None,
                   help="path to diffusers' examples/text_to_image/train_text_to_image_lora_sdxl.py: adds a "
                        "'diffusers-example' whole run (same model, images, resolution, rank and steps; its own "
                        "defaults otherwise) and the ratios default / example; needs datasets and torchvision")
    p.add_argument("--model_dir", default=None,
                   help="a saved diffusers folder of the --model architecture to train instead of building and "
                        "saving one (e.g. one full-size model shared by several benchmark runs)")
    p.add_argument("--torch_compile_backend", default="inductor",
                   help="torch.compile backend of the 'compile' variant (default: %(default)s)")
    p.add_argument("--output_json", default=None, help="also write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return check_resolution(p, p.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_MARK + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    from utils.bench.flops import device_peak, print_flops
    from utils.core.sdxl import DTYPES

    cuda = torch.cuda.is_available()
    settings = resolve_settings(args, cuda)
    variants = all_variants(settings["gradient_checkpointing"], settings["mixed_precision"], args.torch_compile_backend)
    wanted = args.variants.split(",") if args.variants else list(variants)
    unknown = [key for key in wanted if key not in variants]
    if unknown:
        raise UserError(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(variants)})")
    skipped = {key: skip_reason(variants[key], cuda, args.torch_compile) for key in wanted}
    chosen = [variants[key] for key in wanted if not skipped[key]]
    _check_paths(args)
    if args.flops_only:
        print_flops(settings)
        return 0
    if not chosen and args.whole_run != "only":
        for key, reason in skipped.items():
            print(f"skipped {key}: {reason}")
        _write_json(args, {"settings": settings, "results": {}, "skipped": skipped})
        return 0
    if args.model == "sdxl" and not cuda:
        logger.warning("full-size SDXL on a CPU needs about 16 GB of memory per process and minutes per step; "
                       "--model small or --flops_only suit a CPU")
    device = torch.device("cuda" if cuda else "cpu")
    torch.set_num_threads(settings["num_threads"])
    peak = device_peak(device, DTYPES[settings["mixed_precision"]] if cuda else torch.float32)
    with tempfile.TemporaryDirectory(prefix="benchmark_train_") as scratch:
        from utils.tiny.sdxl import make_synthetic_dataset

        config = {**settings, "dataset_dir": str(make_synthetic_dataset(Path(scratch) / "data", args.num_images)),
                  "model_dir": args.model_dir or str(save_model(settings["model"], Path(scratch) / "model", device)),
                  "output_dir": str(Path(scratch) / "runs")}
        whole = {key: whole_run(config, key, args.whole_run_steps)
                 for key in (WHOLE_RUNS if args.whole_run != "off" else ())}
        if args.diffusers_script:
            whole[DIFFUSERS_KEY] = diffusers_run(config, args.diffusers_script, args.whole_run_steps)
        if args.whole_run == "only":
            _write_json(args, {"settings": settings, "whole_runs": whole,
                               "ratios": report_whole_runs(whole, args.whole_run_steps)})
            return 0
        results = _run_variants(args, settings, config, variants, chosen, skipped)
    ratios = report(settings, results["chosen"], skipped, results["summary"], results["flops"], peak,
                    args.num_images, results["paired"])
    if whole:
        ratios["ratios"].update(report_whole_runs(whole, args.whole_run_steps))
        ratios["whole_runs"] = whole
    _write_json(args, {"settings": settings, "peak": asdict(peak), "flops": results["flops"],
                       "results": results["summary"], "rounds": results["rounds"], "paired": results["paired"],
                       "skipped": skipped, **ratios})
    return 0


def _check_paths(args: argparse.Namespace) -> None:
    if args.diffusers_script and (args.whole_run == "off" or not Path(args.diffusers_script).is_file()):
        raise UserError(f"--diffusers_script {args.diffusers_script}: "
                        + ("needs --whole_run on or only" if args.whole_run == "off" else "no such file"))
    if args.model_dir and not (Path(args.model_dir) / "model_index.json").is_file():
        raise UserError(f"--model_dir {args.model_dir}: not a saved diffusers model (no model_index.json)")


def _run_variants(args: argparse.Namespace, settings: dict, config: dict, variants: dict[str, Variant],
                  chosen: list[Variant], skipped: dict[str, str | None]) -> dict:
    """The per-step variants, each in a fresh process (unless --no-fresh_processes), in interleaved rounds;
    then the paired run.
    Failed variants are moved to ``skipped``, with their reason."""
    from utils.bench.flops import step_flops

    flops = step_flops(settings["model"], settings["resolution"], settings["train_batch_size"],
                       trainer_args(config, variants["ours"]))
    run_one = run_in_subprocess if args.fresh_processes else run_here
    rounds: dict[str, list[dict]] = {v.key: [] for v in chosen}
    for round_index in range(settings["repeats"]):
        for variant in chosen:
            if any("failed" in r for r in rounds[variant.key]):
                continue  # e.g. out of memory: it will not fit in the next round either
            logger.info("round %d/%d: %s", round_index + 1, settings["repeats"], variant.label)
            rounds[variant.key].append(run_one(config, variant))
    paired = None
    if args.paired and "naive" in rounds and "ours" in rounds:
        logger.info("paired run: naive and ours steps alternating in one process")
        paired = run_in_subprocess(config, None)
        paired = None if "failed" in paired else paired
    failed = {key: results[-1]["failed"] for key, results in rounds.items() if "failed" in results[-1]}
    skipped.update({key: f"failed: {reason}" for key, reason in failed.items()})
    return {"flops": flops, "rounds": rounds, "paired": paired,
            "summary": {key: summarise(results) for key, results in rounds.items() if key not in failed},
            "chosen": [variant for variant in chosen if variant.key not in failed]}


def _write_json(args: argparse.Namespace, data: dict) -> None:
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    sys.exit(run_cli(main))
