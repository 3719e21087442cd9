"""What run_inference_experiments.sh and run_checkpoint_inference.sh do, in one Python process: find the LoRAs,
make base-vs-LoRA images of all of them with one pipeline (series.py), then the report or the epoch strips.

The flags after ``--`` are inference_sdxl_ghibli.py's, read by its own parser; they come after the scripts'
defaults (the original's prompts of each script, 1024 x 1024), so they override them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from utils.core.errors import UserError
from utils.core.layout import BASE_RESULTS_DIR, LORA_WEIGHT_NAME, SLURM_DIR, checkpoint_series_dir
from utils.inference.prompts import PROMPT_SETS
from utils.sweep.flags import (CHECKPOINT_OUTPUT_ROOT, checkpoint_inference_parser, inference_experiments_parser,
                               parse, split_passthrough)
from utils.sweep.records import SweepError
from utils.sweep.runs import epoch_checkpoints, find_runs, newest_checkpoint_run, resolve_run_dir, run_dirs

logger = logging.getLogger("sweep_runs")

ROOT = Path(__file__).resolve().parent.parent.parent
ORIGINAL_SIZE = ["--height", "1024", "--width", "1024"]  # both original scripts generated at 1024 x 1024

INFERENCE_EXPERIMENTS_HELP = """\
Base-vs-LoRA images for every trained run, then the rank x alpha grid, loss curves, CLIP metrics and the verdict.

With no flags, as the original: every output_ghibli/*/ run with a final_model, the original's 5 prompts at
1024 x 1024, base images and comparison grids, into output_visualization_additional_2/{run}/. The base images are
made once, into output_visualization_additional_2/base_model_results/, and reused for every run (the original
generated the same images again for each run). The report (grid of runs, loss curves, metrics, verdict) goes to
output_visualization_additional_2/report/. One pipeline is loaded once and, for every run, its LoRA is loaded,
used and deleted again. The flags after -- are inference_sdxl_ghibli.py's (--pretrained_model_name_or_path,
--prompts, --num_images, --height, --width, --num_inference_steps, --seed, --guidance_scale, ...); they override
the defaults above (--prompts replaces the 5 prompts). The report compares the runs of this call; of two runs
with the same rank and alpha it uses the newer. --slurm runs all of this as one SLURM job (same folders;
HF_HUB_OFFLINE=1), its script, id and output in {output_dir}/slurm/."""

CHECKPOINT_INFERENCE_HELP = """\
Base-vs-LoRA images for every epoch checkpoint of one training run (or, with --all_runs, of every run), then the
epoch-by-epoch strip.

With no flags, as the original: the run's checkpoints into output_visualization/{run}_checkpoints/epoch_{N}/, the
original's 25 prompts at 1024 x 1024, base images from (or, when absent, made once into)
output_visualization/base_model_results. The run is the newest one in output_ghibli/ that has checkpoint_epoch_N
folders (the original named one run and epochs 1 3 5 7 9 in the script); every checkpoint it has is used, in epoch
order. One pipeline is loaded once; the base images are made once and reused for every checkpoint, so the columns
of the strip differ only by their LoRA. The flags after -- are inference_sdxl_ghibli.py's; they override the
defaults above (--prompts replaces the 25 prompts). --slurm runs all of this as one SLURM job (same folders;
HF_HUB_OFFLINE=1), its script, id and output in {output_dir}/slurm/."""


def _submit_self(script: str, name: str, log_dir: Path, argv: list[str], args: argparse.Namespace) -> int:
    """The script itself, without its --slurm flags, as one SLURM job writing the same folders."""
    from utils.sweep.cluster import submit_job

    own, passthrough = split_passthrough(argv)
    kept, skip = [], False
    for arg in own:
        if skip:
            skip = False
        elif arg == "--sbatch_args":
            skip = True
        elif arg not in ("--slurm", "--dry_run", "--wait") and not arg.startswith("--sbatch_args="):
            kept.append(arg)
    command = ["bash", str(ROOT / script), *kept, *(["--", *passthrough] if "--" in argv else [])]
    return submit_job(argparse.Namespace(name=name, log_dir=str(log_dir), sbatch_args=args.sbatch_args,
                                         dry_run=args.dry_run, wait=args.wait, command=command))


def _generate(loras: list[tuple[str, str]], output_dir: Path, base_dir: Path, prompts: list[str],
              inference_args: list[str], skip_existing: bool) -> int:
    """Images for every LoRA; 1 when some failed (each named), the others are still made."""
    from utils.sweep.series import generate_series

    failed = generate_series(loras, output_dir, ["--prompts", *prompts, *ORIGINAL_SIZE, *inference_args],
                             skip_existing, base_dir)
    if failed:
        print(f"error: no images for {', '.join(failed)} (see the log above)", file=sys.stderr)
        return 1
    print(f"Images for {len(loras)} LoRA(s) in {output_dir}")
    return 0


def _report(output_dir: Path, folders: list[str] | None, args: argparse.Namespace,
            epochs_dir: Path | None = None) -> int:
    """The report subcommand of utils/sweep_report.py on these folders (None: every one), with its own
    defaults; ``epochs_dir`` holds the runs' ``{run}_checkpoints/`` folders when they lie elsewhere."""
    from utils.sweep.commands import report_args
    from utils.sweep.report import build_report

    extra = ["--no_metrics"] if args.no_metrics else []
    extra += ["--folders", *folders] if folders else []
    extra += ["--epochs_dir", str(epochs_dir)] if epochs_dir else []
    for flag in ("clip_model", "style_images"):
        if getattr(args, flag):
            extra += [f"--{flag}", getattr(args, flag)]
    try:
        made = build_report(report_args(["--inference_dir", str(output_dir),
                                         "--alignment_tolerance", str(args.alignment_tolerance), *extra]))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in made.values():
        print(path)
    return 0


def run_inference_experiments(argv: list[str]) -> int:
    args, inference_args = parse(inference_experiments_parser(INFERENCE_EXPERIMENTS_HELP), argv)
    output_dir = Path(args.output_dir)
    if args.slurm:
        return _submit_self("run_inference_experiments.sh", "run_inference_experiments", output_dir / SLURM_DIR,
                            argv, args)
    runs = find_runs(Path(args.runs_dir), args.model)
    if not runs:
        raise SweepError(f"{args.runs_dir}: no finished runs with {args.model}/{LORA_WEIGHT_NAME}")
    loras = [(run.run_dir.name, str((run.run_dir / args.model).resolve())) for run in runs]
    print(f"Images for {len(loras)} run(s) of {args.runs_dir} into {output_dir}", file=sys.stderr)
    failed = _generate(loras, output_dir, output_dir / BASE_RESULTS_DIR, PROMPT_SETS["sweep"], inference_args,
                       args.skip_existing)
    if not args.no_report:
        failed = _report(output_dir, [label for label, _ in loras], args) or failed
    return failed


def _checkpoint_series(args: argparse.Namespace) -> tuple[list[tuple[str, str]], Path, list[Path]]:
    """(label, LoRA folder) of every checkpoint to use, the output folder, and the folders that get a strip."""
    if args.all_runs:
        output_dir = Path(args.output_dir or CHECKPOINT_OUTPUT_ROOT)
        series, strips = [], []
        for run_dir in run_dirs(Path(args.runs_dir)):
            checkpoints = epoch_checkpoints(run_dir, args.include_final, padded=True)
            run_images = checkpoint_series_dir(output_dir, run_dir)
            series += [(f"{run_images.name}/{label}", str(folder.resolve())) for label, folder in checkpoints]
            strips += [run_images] if checkpoints else []
        if not series:
            raise SweepError(f"{args.runs_dir}: no run with checkpoint_epoch_N folders (train with --save_steps N)")
        print(f"Images for {len(series)} checkpoint(s) of {len(strips)} run(s) in {args.runs_dir} into {output_dir}",
              file=sys.stderr)
        return series, output_dir, strips
    run_dir = resolve_run_dir(Path(args.run_dir)) if args.run_dir else newest_checkpoint_run(Path(args.runs_dir))
    output_dir = Path(args.output_dir or checkpoint_series_dir(CHECKPOINT_OUTPUT_ROOT, run_dir))
    checkpoints = epoch_checkpoints(run_dir, args.include_final)
    if not checkpoints:
        raise SweepError(f"{run_dir}: no checkpoint_epoch_N folders (train with --save_steps N)")
    print(f"Images for {len(checkpoints)} checkpoint(s) of {run_dir} into {output_dir}", file=sys.stderr)
    return [(label, str(folder.resolve())) for label, folder in checkpoints], output_dir, [output_dir]


def run_checkpoint_inference(argv: list[str]) -> int:
    args, inference_args = parse(checkpoint_inference_parser(CHECKPOINT_INFERENCE_HELP), argv)
    if args.slurm:
        log_dir = Path(args.output_dir or CHECKPOINT_OUTPUT_ROOT) / SLURM_DIR
        return _submit_self("run_checkpoint_inference.sh", "run_checkpoint_inference", log_dir, argv, args)
    series, output_dir, strips = _checkpoint_series(args)
    failed = _generate(series, output_dir, Path(args.base_results_dir), PROMPT_SETS["checkpoint"], inference_args,
                       args.skip_existing)
    from utils.sweep.pictures import write_epoch_strip

    for folder in strips:
        try:
            print(write_epoch_strip(folder, image_index=args.image_index))
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            failed = 1
    if args.all_runs and not args.no_report:
        sweep_images = Path(args.inference_dir)
        if sweep_images.is_dir():  # every run and epoch measured and shown in the sweep's report
            failed = _report(sweep_images, None, args, epochs_dir=output_dir) or failed
        else:
            print(f"No report: {sweep_images} does not hold the sweep's images (run run_inference_experiments.sh "
                  "first, or pass --inference_dir)", file=sys.stderr)
    return failed
