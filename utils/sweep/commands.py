"""The subcommands of utils/sweep_report.py: their flags and what each one does.

The shell scripts call the bookkeeping ones (plan, status-start, status-end, summary, runs, checkpoints,
newest-checkpoint-run, prompts, generate, losses); people call report and strip. Heavy libraries are
imported only by the subcommands that draw, generate or measure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.core.atomic import save_image, write_json
from utils.core.cli import derived
from utils.inference.prompts import PROMPT_SETS
from utils.sweep.metrics import DEFAULT_ALIGNMENT_TOLERANCE
from utils.sweep.outputs import lora_generations
from utils.sweep.pictures import epoch_strip, plot_loss_overlay
from utils.sweep.plan import check_trainer_flags, plan_runs
from utils.sweep.records import SUMMARY_FILE, WEIGHTS_FILE, SweepError, write_summary
from utils.sweep.status import end_status, start_status
from utils.sweep.report import build_report
from utils.sweep.runs import epoch_checkpoints, find_runs, newest_checkpoint_run, resolve_run_dir, sweep_runs_of


def _add_grid_flags(parser, results_dir: bool = True) -> None:
    if results_dir:
        parser.add_argument("--results_dir", required=True, help="the sweep's bookkeeping (experiment_results)")
    parser.add_argument("--ranks", nargs="+", required=True)
    parser.add_argument("--alphas", nargs="+", required=True)
    parser.add_argument("--lr", required=True)


def add_bookkeeping_commands(commands) -> None:
    plan = commands.add_parser("plan", help="print 'rank alpha folder number resume_dir' for each run still to do")
    _add_grid_flags(plan)
    plan.add_argument("--check_trainer_flags", action="store_true",
                      help="check the runs' flags as train_sdxl_lora.py does, before any run starts")
    plan.add_argument("train_args", nargs=argparse.REMAINDER)

    start = commands.add_parser("status-start", help="record that a run starts now")
    for name in ("--file", "--rank", "--alpha", "--lr", "--log", "--output_dir"):
        start.add_argument(name, required=True)
    start.add_argument("--number", type=int, required=True, help="the run's experiment_number (1-based)")
    start.add_argument("--gpu", default="")
    start.add_argument("--process_group", type=int, default=None)
    start.add_argument("--command", default="", help="the trainer command line, shell-quoted")
    start.add_argument("train_args", nargs=argparse.REMAINDER, help="the flags passed through to the trainer")

    end = commands.add_parser("status-end", help="record how a run ended")
    end.add_argument("--file", required=True)
    end.add_argument("--exit_code", type=int, required=True)

    summary = commands.add_parser("summary", help="write summary.json; exit 1 unless every run finished")
    _add_grid_flags(summary)
    summary.add_argument("--start_time", required=True, help="when the sweep started (%%Y-%%m-%%d %%H:%%M:%%S)")
    summary.add_argument("--gpus", default="")
    summary.add_argument("--stopped", action="store_true")
    summary.add_argument("train_args", nargs=argparse.REMAINDER)

    runs = commands.add_parser("runs", help="print 'run name<TAB>model folder' for each finished run in a folder")
    runs.add_argument("root")
    runs.add_argument("--model", default="final_model", help="final_model or best_model")

    checkpoints = commands.add_parser("checkpoints", help="print 'label<TAB>folder' for a run's epoch checkpoints")
    checkpoints.add_argument("run_dir")
    checkpoints.add_argument("--include_final", action="store_true")

    newest = commands.add_parser("newest-checkpoint-run", help="print the newest run folder with epoch checkpoints")
    newest.add_argument("runs_dir")

    generate = commands.add_parser("generate", help="base-vs-LoRA images for several LoRAs with one pipeline")
    generate.add_argument("--output_dir", required=True, help="one folder per LoRA label goes here")
    generate.add_argument("--lora", action="append", required=True, metavar="LABEL=PATH",
                          help="a LoRA folder or file and the name of its output folder (repeatable)")
    generate.add_argument("--base_dir", default=None,
                          help="base images are made once here, then reused (default: {output_dir}/base_model_results)")
    generate.add_argument("--skip_existing", action="store_true",
                          help="leave out LoRAs whose folder already holds their images for these settings")
    generate.add_argument("inference_args", nargs=argparse.REMAINDER, help="-- then inference_sdxl_ghibli.py flags")

    prompts = commands.add_parser("prompts", help="print the original's prompts of a script, one per line")
    prompts.add_argument("which", choices=sorted(PROMPT_SETS),
                         help="checkpoint: run_checkpoint_inference.sh's 25; sweep: run_inference_experiments.sh's 5; "
                              "original: inference_sdxl_ghibli.py's 16")

    losses = commands.add_parser("losses", help="overlay the training loss of every finished run of a sweep")
    losses.add_argument("--results_dir", required=True, help="the sweep's bookkeeping (experiment_results)")
    losses.add_argument("--output", default=None, help="PNG path (default: {results_dir}/loss_curves.png)")


def add_slurm_commands(commands) -> None:
    sweep = commands.add_parser("slurm-sweep", help="submit the runs still to do as one SLURM job array")
    _add_grid_flags(sweep)
    sweep.add_argument("--output_dir", required=True)
    sweep.add_argument("--todo", nargs="+", required=True, metavar="RANK:ALPHA", help="one array task each")
    sweep.add_argument("--start_time", required=True)
    sweep.add_argument("--train_script", required=True)
    sweep.add_argument("--launcher", default="", help="what starts each training (TRAIN_LAUNCHER)")
    _add_submit_flags(sweep)
    sweep.add_argument("--requeue", action="store_true", help="a task stopped by SLURM goes back in the queue")
    sweep.add_argument("train_args", nargs=argparse.REMAINDER)

    job = commands.add_parser("slurm-job", help="submit one command as a SLURM job")
    job.add_argument("--name", required=True)
    job.add_argument("--log_dir", required=True, help="the job's output, script and id go here")
    _add_submit_flags(job)
    job.add_argument("command", nargs=argparse.REMAINDER)

    prepare = commands.add_parser("prepare", help="resolve the base model here and check the dataset")
    prepare.add_argument("train_args", nargs=argparse.REMAINDER)


def _add_submit_flags(parser) -> None:
    parser.add_argument("--sbatch_args", default="", help="passed to sbatch as they are")
    parser.add_argument("--dry_run", action="store_true", help="print the job scripts, submit nothing")
    parser.add_argument("--wait", action="store_true", help="block until the jobs are done")


def add_picture_commands(commands) -> None:
    report = commands.add_parser("report", help="grid, loss curves, CLIP metrics and the verdict of a sweep")
    report.add_argument("--inference_dir", required=True, help="the output_dir of run_inference_experiments.sh")
    report.add_argument("--output_dir", default=None, help="default: {inference_dir}/report")
    report.add_argument("--folders", nargs="+", default=None,
                        help="subfolders of --inference_dir to compare (default: every one with LoRA images)")
    report.add_argument("--prompt_index", type=int, default=0, help="prompt shown in the grid")
    report.add_argument("--image_index", type=int, default=0, help="image (seed) of that prompt shown in the grid")
    report.add_argument("--cell_size", type=int, default=512, help="largest side of a grid cell (pixels)")
    report.add_argument("--clip_model", default=None,
                        help="Hub id or folder of a CLIP model (default: openai/clip-vit-large-patch14)")
    report.add_argument("--no_metrics", action="store_true", help="pictures only, no CLIP metrics")
    report.add_argument("--style_images", default=None,
                        help="folder of style reference images (default: the runs' training dataset)")
    report.add_argument("--alignment_tolerance", type=float, default=DEFAULT_ALIGNMENT_TOLERANCE,
                        help="CLIP-score points of alignment a run may lose against the base and still win")
    report.add_argument("--device", default=None, help="device for CLIP (default: cuda when available)")

    strip = commands.add_parser("strip", help="the epoch-by-epoch strip of a checkpoint series")
    strip.add_argument("--inference_dir", required=True, help="the output_dir of run_checkpoint_inference.sh")
    strip.add_argument("--output", default=None, help="default: {inference_dir}/epoch_strip.png")
    strip.add_argument("--image_index", type=int, default=0)
    strip.add_argument("--cell_size", type=int, default=256)


def _plan(args: argparse.Namespace) -> int:
    todo = plan_runs(Path(args.results_dir), args.ranks, args.alphas, args.lr, args.train_args)
    if args.check_trainer_flags:
        check_trainer_flags([(rank, alpha) for rank, alpha, *_ in todo], args.lr, args.train_args)
    for rank, alpha, folder, number, resume in todo:
        print(f"{rank}\t{alpha}\t{folder}\t{number}\t{resume}")
    return 0


def _status_start(args: argparse.Namespace) -> int:
    start_status(Path(args.file), args.rank, args.alpha, args.lr, args.number, args.output_dir, args.gpu, args.log,
                 args.process_group, args.train_args, args.command)
    return 0


def _status_end(args: argparse.Namespace) -> int:
    end_status(Path(args.file), args.exit_code)
    return 0


def _summary(args: argparse.Namespace) -> int:
    summary = write_summary(Path(args.results_dir), args.ranks, args.alphas, args.lr, args.gpus, args.train_args,
                            args.stopped, args.start_time)
    counts = ", ".join(f"{count} {state}" for state, count in summary["counts"].items() if count)
    print(f"Sweep: {counts} ({Path(args.results_dir) / SUMMARY_FILE})")
    return 0 if summary["complete"] else 1


def _runs(args: argparse.Namespace) -> int:
    runs = find_runs(Path(args.root), args.model)
    if not runs:
        raise SweepError(f"{args.root}: no finished runs with {args.model}/{WEIGHTS_FILE}")
    for run in runs:
        print(f"{run.run_dir.name}\t{(run.run_dir / args.model).resolve()}")
    return 0


def _checkpoints(args: argparse.Namespace) -> int:
    run_dir = resolve_run_dir(Path(args.run_dir))
    series = epoch_checkpoints(run_dir, args.include_final)
    if not series:
        raise SweepError(f"{run_dir}: no checkpoint_epoch_N folders (train with --save_steps N)")
    for label, folder in series:
        print(f"{label}\t{folder.resolve()}")
    return 0


def _newest_checkpoint_run(args: argparse.Namespace) -> int:
    print(newest_checkpoint_run(Path(args.runs_dir)))
    return 0


def _generate(args: argparse.Namespace) -> int:
    pairs = [tuple(item.split("=", 1)) for item in args.lora]
    if any(len(pair) != 2 or not all(pair) for pair in pairs):
        raise SweepError(f"--lora {args.lora}: expected LABEL=PATH")
    from utils.sweep.series import generate_series

    failed = generate_series(pairs, Path(args.output_dir), args.inference_args, args.skip_existing,
                             Path(args.base_dir) if args.base_dir else None)
    if failed:
        print(f"error: no images for {', '.join(failed)} (see the log above)", file=sys.stderr)
        return 1
    print(f"Images for {len(pairs)} LoRA(s) in {args.output_dir}")
    return 0


def _prompts(args: argparse.Namespace) -> int:
    print("\n".join(PROMPT_SETS[args.which]))
    return 0


def _losses(args: argparse.Namespace) -> int:
    output = Path(args.output) if args.output else Path(args.results_dir) / "loss_curves.png"
    runs = sweep_runs_of(Path(args.results_dir))
    if not runs:
        raise SweepError(f"{args.results_dir}: no finished run to plot")
    print(plot_loss_overlay(runs, output))
    return 0


def _report(args: argparse.Namespace) -> int:
    for path in build_report(args).values():
        print(path)
    return 0


def _strip(args: argparse.Namespace) -> int:
    generations = lora_generations(Path(args.inference_dir))
    output = Path(args.output) if args.output else Path(args.inference_dir) / "epoch_strip.png"
    image, columns = epoch_strip(generations, args.image_index, args.cell_size)
    save_image(image, output)
    write_json(output.with_suffix(".json"), {"columns": columns, "prompts": generations[0].prompts,
                                             "seeds": generations[0].seeds, "image_index": args.image_index})
    print(output)
    return 0


def _slurm_sweep(args: argparse.Namespace) -> int:
    from utils.sweep.cluster import submit_sweep
    return submit_sweep(args)


def _slurm_job(args: argparse.Namespace) -> int:
    from utils.sweep.cluster import submit_job
    return submit_job(derived(args, command=args.command[1:] if args.command[:1] == ["--"] else args.command))


def _prepare(args: argparse.Namespace) -> int:
    from utils.sweep.cluster import prepare_offline
    prepare_offline(args.train_args)
    return 0


COMMANDS = {"slurm-sweep": _slurm_sweep, "slurm-job": _slurm_job, "prepare": _prepare,
            "plan": _plan, "status-start": _status_start, "status-end": _status_end, "summary": _summary,
            "runs": _runs, "checkpoints": _checkpoints, "newest-checkpoint-run": _newest_checkpoint_run,
            "prompts": _prompts, "generate": _generate, "losses": _losses, "report": _report, "strip": _strip}
