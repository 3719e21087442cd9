"""Rank x alpha sweeps: the command line of the shell scripts, the pictures, CLIP metrics and the verdict.

The shell scripts call the bookkeeping subcommands; people call ``report`` and ``strip``:

    plan, status-start/-end, summary   run_experiments.sh: what to run, a status JSON per run, the summary
    runs, checkpoints, newest-checkpoint-run
                                       the inference scripts: the finished runs in a folder, a run's
                                       checkpoints, the newest run that has checkpoints
    prompts                            the original's prompts of a script (checkpoint: 25, sweep: 5)
    generate                           base-vs-LoRA images of several LoRAs with one pipeline
    slurm-sweep, slurm-job, prepare    the --slurm scripts: submit a job array or one job, check first
    losses                             one plot overlaying the training loss of every run of a sweep
    report                             rank x alpha grid, loss curves, CLIP metrics (CSV, Markdown, heat
                                       maps) and the verdict
    strip                              the epoch-by-epoch strip of a checkpoint series

    python -m utils.sweep_report report --inference_dir output_visualization_additional_2
    python -m utils.sweep_report strip --inference_dir output_visualization/<run>_checkpoints

Heavy libraries (torch, matplotlib, transformers) are imported only by the subcommands that
draw, generate or measure, so the bookkeeping calls start in a fraction of a second. The subcommands
live in utils/sweep/commands.py; the work they do in the rest of utils/sweep/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.core.cli import Parser, derived, run_cli  # noqa: E402
from utils.sweep.commands import COMMANDS, add_bookkeeping_commands, add_picture_commands, add_slurm_commands  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m utils.sweep_report report --inference_dir output_visualization_additional_2")
    commands = parser.add_subparsers(dest="command_name", required=True)
    add_bookkeeping_commands(commands)
    add_picture_commands(commands)
    add_slurm_commands(commands)
    args = parser.parse_args(argv)
    passed_through = {name: getattr(args, name)[1:] for name in ("train_args", "inference_args")
                      if getattr(args, name, None) and getattr(args, name)[0] == "--"}  # drop the "--"
    return derived(args, **passed_through)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return COMMANDS[args.command_name](args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
