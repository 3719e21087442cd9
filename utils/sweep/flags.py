"""The flags of the three sweep scripts (run_experiments.sh, run_inference_experiments.sh,
run_checkpoint_inference.sh): one parser each, their usage as the scripts' ``--help``.

Everything after a lone ``--`` goes to the Python script the sweep runs (train_sdxl_lora.py or
inference_sdxl_ghibli.py) and is read by that script's own parser. The folder of runs is ``--runs_dir`` in all
three scripts; each keeps its older name as an alias (``--output_dir`` of run_experiments.sh, ``--sweep_dir``
of run_inference_experiments.sh), and ``--output_dir`` keeps the meaning it had in each script.
"""

from __future__ import annotations

import argparse

from utils.core.layout import BASE_RESULTS_DIR, BEST_MODEL, FINAL_MODEL, SWEEP_RESULTS_DIR
from utils.sweep.records import SweepError

DEFAULT_ALIGNMENT_TOLERANCE = 2.0  # CLIP-score points of alignment a run may lose against the base and still win

RUNS_DIR = "output_ghibli"  # the trainer's default --output_dir, where the original's runs land
INFERENCE_OUTPUT_DIR = "output_visualization_additional_2"  # the original run_inference_experiments.sh's
CHECKPOINT_OUTPUT_ROOT = "output_visualization"  # the original run_checkpoint_inference.sh's


class SweepParser(argparse.ArgumentParser):
    """A parser whose mistakes are one ``error:`` line (exit status 2), no usage dump; no abbreviations."""

    def __init__(self, **kwargs) -> None:
        super().__init__(allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message: str):
        if message.startswith("unrecognized arguments"):
            message += f" (flags for the script that {self.prog} runs go after --)"
        raise SweepError(message)


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the script's own flags, the flags after the first lone ``--``)."""
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []


def words(values: list[str]) -> list[str]:
    """``--ranks "4 8 16"`` and ``--ranks 4 8 16`` alike: every value split at spaces."""
    return [word for value in values for word in value.split()]


def _add_slurm_flags(parser: argparse.ArgumentParser, requeue: bool) -> None:
    group = parser.add_argument_group("SLURM")
    group.add_argument("--slurm", action="store_true",
                       help="submit the work to SLURM instead of running it here (see docs/cluster.md)")
    group.add_argument("--sbatch_args", default="", help="flags for sbatch, as one string (they win over the "
                       "scripts' #SBATCH defaults), e.g. \"--partition=gpu --gres=gpu:1 --time=08:00:00\"")
    group.add_argument("--dry_run", action="store_true", help="print the job scripts and sbatch lines; submit nothing")
    group.add_argument("--wait", action="store_true", help="block until the jobs are done; exit status as run here")
    if requeue:
        group.add_argument("--requeue", action="store_true",
                           help="a task stopped by SLURM (preemption, the time-limit warning) goes back in the "
                                "queue and resumes")


def check_slurm_flags(args: argparse.Namespace) -> None:
    used = [name for name in ("sbatch_args", "dry_run", "wait", "requeue") if getattr(args, name, False)]
    if used and not args.slurm:
        extra = " and --requeue" if hasattr(args, "requeue") else ""
        raise SweepError(f"--sbatch_args, --dry_run{',' if extra else ' and'} --wait{extra} go with --slurm")


def experiments_parser(description: str) -> SweepParser:
    parser = SweepParser(prog="run_experiments.sh", description=description,
                         usage="%(prog)s [flags] [-- TRAINER FLAGS...]",
                         epilog="example:\n  ./run_experiments.sh --gpus 0,1 -- --dataset_dir dataset_ghibli "
                                "--num_train_epochs 20")
    parser.add_argument("--ranks", nargs="+", default=["4 8 16"], help="LoRA ranks of the grid (default: 4 8 16)")
    parser.add_argument("--alphas", nargs="+", default=["4 8 16 32"],
                        help="LoRA alphas of the grid (default: 4 8 16 32)")
    parser.add_argument("--lr", default="1e-4", help="learning rate of every run (default: 1e-4)")
    parser.add_argument("--runs_dir", "--output_dir", dest="runs_dir", default=RUNS_DIR,
                        help="where the trainer makes each run's folder, {ts}_{type}_r{R}_a{A}_lr{LR}/ "
                             f"(default: {RUNS_DIR}; --output_dir is the same flag, the trainer's name for it)")
    parser.add_argument("--results_dir", default=SWEEP_RESULTS_DIR,
                        help="the sweep's records: experiment_{R}_{A}.json and summary.json as the original's, "
                             "runs/r{R}_a{A}_lr{LR}/ (status.json, train.log), loss_curves.png and the lock; one "
                             f"results folder holds one learning rate (default: {SWEEP_RESULTS_DIR})")
    parser.add_argument("--gpus", default="",
                        help="comma-separated GPU ids, one run per GPU at a time (CUDA_VISIBLE_DEVICES); an id given "
                             "twice (0,0,1,1) runs two at a time on it. Default: one run after another on the "
                             "default device")
    parser.add_argument("--pack", default="1",
                        help="runs of the grid per training process, on one frozen model: N, or auto (as many as "
                             "fit in the GPU's free memory, or the RAM). Runs that cannot pack (DoRA, LoHa, LoKr, "
                             "text-encoder LoRA, --report_to other than none, fp16 on a GPU) train alone, with a line "
                             "that says why; see docs/packing.md (default: 1, each run alone)")
    _add_slurm_flags(parser, requeue=True)
    return parser


def _add_inference_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip_existing", action="store_true",
                        help="leave out LoRAs whose folder already holds a finished comparison for these settings")


def inference_experiments_parser(description: str) -> SweepParser:
    parser = SweepParser(prog="run_inference_experiments.sh", description=description,
                         usage="%(prog)s [flags] [-- INFERENCE FLAGS...]",
                         epilog="example:\n  ./run_inference_experiments.sh --runs_dir output_ghibli -- --num_images 3")
    parser.add_argument("--runs_dir", "--sweep_dir", dest="runs_dir", default=RUNS_DIR,
                        help=f"the folder holding the run folders (default: {RUNS_DIR}; --sweep_dir is the same flag)")
    parser.add_argument("--output_dir", default=INFERENCE_OUTPUT_DIR,
                        help="the images: one folder per run, base_model_results/ and report/ "
                             f"(default: {INFERENCE_OUTPUT_DIR})")
    parser.add_argument("--model", default=FINAL_MODEL, choices=[FINAL_MODEL, BEST_MODEL],
                        help="which LoRA folder of each run to use (default: final_model)")
    _add_inference_flags(parser)
    _add_report_flags(parser, "")
    _add_slurm_flags(parser, requeue=False)
    return parser


def checkpoint_inference_parser(description: str) -> SweepParser:
    parser = SweepParser(prog="run_checkpoint_inference.sh", description=description,
                         usage="%(prog)s [flags] [-- INFERENCE FLAGS...]",
                         epilog="example:\n  ./run_checkpoint_inference.sh --run_dir output_ghibli/<run>")
    parser.add_argument("--run_dir", default=None,
                        help="a run folder (with experiment_config.json); default: the newest in --runs_dir")
    parser.add_argument("--runs_dir", default=RUNS_DIR,
                        help=f"the folder of runs: where the newest run is looked for (default: {RUNS_DIR})")
    parser.add_argument("--all_runs", action="store_true",
                        help="every saved epoch of every run in --runs_dir, with one pipeline and one set of base "
                             "images: {output_dir}/{run}_checkpoints/epoch_{NNN}/ and each run's epoch_strip.png; "
                             "then the sweep's report (report.html) measures every run and epoch")
    parser.add_argument("--output_dir", default=None,
                        help=f"default: {CHECKPOINT_OUTPUT_ROOT}/{{run}}_checkpoints (with --all_runs: "
                             f"{CHECKPOINT_OUTPUT_ROOT}, one {{run}}_checkpoints folder per run); one folder per "
                             "checkpoint and epoch_strip.png")
    parser.add_argument("--inference_dir", default=INFERENCE_OUTPUT_DIR,
                        help="with --all_runs: the sweep's images from run_inference_experiments.sh, where the "
                             "report is written (default: %(default)s)")
    parser.add_argument("--base_results_dir", default=f"{CHECKPOINT_OUTPUT_ROOT}/{BASE_RESULTS_DIR}",
                        help="base images are read from here, or made once into it (default: %(default)s)")
    parser.add_argument("--include_final", action="store_true", help="add final_model after the last checkpoint")
    _add_inference_flags(parser)
    _add_report_flags(parser, "with --all_runs: ")
    parser.add_argument("--image_index", type=int, default=0,
                        help="which image (seed) of each prompt the strip shows, from 0 (default: 0)")
    _add_slurm_flags(parser, requeue=False)
    return parser


def _add_report_flags(parser: argparse.ArgumentParser, when: str) -> None:
    """The flags the inference scripts pass on to the report (``when`` says when it is written)."""
    parser.add_argument("--no_report", action="store_true", help=f"{when}images only")
    parser.add_argument("--no_metrics", action="store_true", help=f"{when}a report without CLIP metrics")
    parser.add_argument("--clip_model", default=None, help="passed to `utils/sweep_report.py report`")
    parser.add_argument("--style_images", default=None, help="passed to `utils/sweep_report.py report`")
    parser.add_argument("--alignment_tolerance", type=float, default=DEFAULT_ALIGNMENT_TOLERANCE,
                        help="passed to `utils/sweep_report.py report` (default: %(default)s)")


def _joined_values(own: list[str]) -> list[str]:
    """``--sbatch_args --partition=gpu`` as ``--sbatch_args=--partition=gpu``: its value is sbatch's flags, which
    argparse would otherwise take for one of ours."""
    joined, i = [], 0
    while i < len(own):
        if own[i] == "--sbatch_args" and i + 1 < len(own):
            joined.append(f"--sbatch_args={own[i + 1]}")
            i += 2
        else:
            joined.append(own[i])
            i += 1
    return joined


def parse(parser: SweepParser, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The script's flags and the pass-through flags."""
    own, passthrough = split_passthrough(argv)
    args = parser.parse_args(_joined_values(own))
    if hasattr(args, "slurm"):
        check_slurm_flags(args)
    return args, passthrough


def slurm_task_parser() -> SweepParser:
    """The flags of a SLURM task of run_experiments.sh --slurm, written into its job scripts."""
    parser = SweepParser(prog="slurm_task", description="A task of a rank x alpha sweep on SLURM.")
    parser.add_argument("mode", choices=["train", "finish"])
    for name in ("--results_dir", "--runs_dir", "--lr", "--start_time"):
        parser.add_argument(name, required=True)
    for name in ("--ranks", "--alphas", "--tasks"):
        parser.add_argument(name, nargs="+", required=True)
    parser.add_argument("--requeue", action="store_true")
    return parser
