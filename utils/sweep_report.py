"""Rank x alpha sweeps: the pictures, CLIP metrics and the verdict of a sweep's images, and the driver behind
the three sweep scripts.

People call:

    report     rank x alpha grid, loss curves, CLIP metrics (CSV, Markdown, heat maps) and the verdict
    strip      the epoch-by-epoch strip of a checkpoint series
    generate   base-vs-LoRA images of several LoRAs with one pipeline

    python -m utils.sweep_report report --inference_dir output_visualization_additional_2
    python -m utils.sweep_report strip --inference_dir output_visualization/<run>_checkpoints

run_experiments.sh, run_inference_experiments.sh and run_checkpoint_inference.sh run this file with their
own name first (``utils/sweep_report.py run_experiments FLAGS...``): the whole sweep in this one process, the
trainings as its children; a SLURM task of a sweep runs it as ``slurm_task``. The subcommands live in
utils/sweep/commands.py, the drivers in utils/sweep/driver.py and inference_driver.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.core.cli import Parser, derived, run_cli  # noqa: E402
from utils.sweep.commands import COMMANDS, add_generate_command, add_picture_commands  # noqa: E402


def _drivers() -> dict:
    from utils.sweep.driver import run_experiments, slurm_task
    from utils.sweep.inference_driver import run_checkpoint_inference, run_inference_experiments

    return {"run_experiments": run_experiments, "run_inference_experiments": run_inference_experiments,
            "run_checkpoint_inference": run_checkpoint_inference, "slurm_task": slurm_task}


DRIVERS = ("run_experiments", "run_inference_experiments", "run_checkpoint_inference", "slurm_task")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m utils.sweep_report report --inference_dir output_visualization_additional_2")
    commands = parser.add_subparsers(dest="command_name", required=True)
    add_picture_commands(commands)
    add_generate_command(commands)
    args = parser.parse_args(argv)
    passed_through = {name: getattr(args, name)[1:] for name in ("inference_args",)
                      if getattr(args, name, None) and getattr(args, name)[0] == "--"}  # drop the "--"
    return derived(args, **passed_through)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DRIVERS:
        return _drivers()[argv[0]](argv[1:])
    args = parse_args(argv)
    return COMMANDS[args.command_name](args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
