"""The subcommands of utils/sweep_report.py that people call: their flags and what each one does.

report and strip draw and measure what the sweep scripts generated; generate makes base-vs-LoRA images of
several LoRAs with one pipeline. The sweep scripts themselves are driven by driver.py and inference_driver.py.
Heavy libraries are imported only by the subcommands that draw, generate or measure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.sweep.flags import DEFAULT_ALIGNMENT_TOLERANCE
from utils.sweep.records import SweepError


def add_generate_command(commands) -> None:
    generate = commands.add_parser("generate", allow_abbrev=False,
                                   help="base-vs-LoRA images for several LoRAs with one pipeline")
    generate.add_argument("--output_dir", required=True, help="one folder per LoRA label goes here")
    generate.add_argument("--lora", action="append", required=True, metavar="LABEL=PATH",
                          help="a LoRA folder or file and the name of its output folder (repeatable)")
    generate.add_argument("--base_dir", default=None,
                          help="base images are made once here, then reused (default: {output_dir}/base_model_results)")
    generate.add_argument("--skip_existing", action="store_true",
                          help="leave out LoRAs whose folder already holds their images for these settings")
    generate.add_argument("inference_args", nargs=argparse.REMAINDER, help="-- then inference_sdxl_ghibli.py flags")


def add_picture_commands(commands) -> None:
    report = commands.add_parser("report", allow_abbrev=False,
                                 help="grid, loss curves, CLIP metrics and the verdict of a sweep")
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
    report.add_argument("--epochs_dir", default=None,
                        help="where run_checkpoint_inference.sh wrote the runs' {run}_checkpoints/ folders (default: "
                             "looked for in --inference_dir, beside it and in output_visualization/ beside it)")

    strip = commands.add_parser("strip", allow_abbrev=False, help="the epoch-by-epoch strip of a checkpoint series")
    strip.add_argument("--inference_dir", required=True, help="the output_dir of run_checkpoint_inference.sh")
    strip.add_argument("--output", default=None, help="default: {inference_dir}/epoch_strip.png")
    strip.add_argument("--image_index", type=int, default=0)
    strip.add_argument("--cell_size", type=int, default=256)


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


def _report(args: argparse.Namespace) -> int:
    from utils.sweep.report import build_report  # torch and matplotlib: only when a report is made

    for path in build_report(args).values():
        print(path)
    return 0


def _strip(args: argparse.Namespace) -> int:
    from utils.sweep.pictures import write_epoch_strip

    print(write_epoch_strip(Path(args.inference_dir), Path(args.output) if args.output else None, args.image_index,
                            args.cell_size))
    return 0


def report_args(argv: list[str]) -> argparse.Namespace:
    """The flags of ``report``, parsed from ``argv`` (its defaults for the rest)."""
    parser = argparse.ArgumentParser(prog="utils/sweep_report.py", allow_abbrev=False)
    add_picture_commands(parser.add_subparsers(dest="command_name"))
    return parser.parse_args(["report", *argv])


COMMANDS = {"generate": _generate, "report": _report, "strip": _strip}
