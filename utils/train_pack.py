"""Train several runs of a rank x alpha grid at once on one frozen SDXL (a pack), each run writing exactly the
files train_sdxl_lora.py writes for it alone: its run folder, logs, model folders and resumable checkpoints.

The runs share every trainer flag (given after --) but --lora_rank and --lora_alpha, which each --pack_run
gives (with, for a sweep, the file its run folder is recorded in). One run's checkpoint also resumes alone
with train_sdxl_lora.py --resume_from_checkpoint. What cannot pack (DoRA, LoHa, LoKr, trackers, fp16 on a
GPU) is refused with the reason: see docs/packing.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.core.cli import Parser, run_cli
from utils.core.errors import UserError
from utils.training.flags import parse_training_args


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[argparse.Namespace]]:
    """(this command's flags, each run's trainer flags: the shared ones after -- plus its rank and alpha)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    shared = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="example:\n  python utils/train_pack.py --pack_run 4 8 --pack_run 8 16 -- "
                      "--dataset_dir dataset_ghibli --report_to none")
    p.add_argument("--pack_run", nargs="+", action="append", required=True, metavar="RANK ALPHA [RUN_DIR_FILE]",
                   help="one run of the pack: its --lora_rank, --lora_alpha and, optionally, its --run_dir_file")
    args = p.parse_args(own)
    runs = []
    for values in args.pack_run:
        if len(values) not in (2, 3):
            raise UserError(f"--pack_run {' '.join(values)}: give RANK ALPHA and optionally RUN_DIR_FILE")
        extra = ["--lora_rank", values[0], "--lora_alpha", values[1]] + (["--run_dir_file", values[2]]
                                                                          if len(values) == 3 else [])
        runs.append(parse_training_args(shared + extra))
    return args, runs


def main(argv: list[str] | None = None) -> int:
    _, runs = parse_args(argv)
    from utils.training.recipe import train_pack
    train_pack(runs)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
