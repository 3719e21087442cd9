"""Sweep speed and memory: the same k runs of a rank x alpha grid trained separately (one process per run,
one after another, as run_experiments.sh runs them) against one pack (all k in one process on one frozen
model, each run on its own copy of the batch; utils/training/pack.py).

For each way: the whole sweep's wall time (every process from its start to its exit: interpreter, imports,
model, data and caches, adapters, steps), each run's optimizer steps per second, the pack's run-steps per
second, and the peak memory of a process (RSS on a CPU, CUDA allocations on a GPU), against one separate run
and against k separate runs side by side. Each process trains with the trainer's own set-up and step
(utils/training/recipe.py) on a saved model with random weights (utils/bench/models.py; weight values do not
change speed) and synthetic images.

    python utils/benchmark_sweep.py --model tiny                       # CPU, a minute
    python utils/benchmark_sweep.py --model small                      # CPU, SDXL topology at 1/4 width, 256²
    python utils/benchmark_sweep.py --model sdxl --resolution 1024 --gradient_checkpointing \\
        --ranks 4 8 16 --alphas 4 8 16 32                              # GPU, the original's 12-run grid
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from utils.bench.models import DEFAULT_RESOLUTION, MODELS, check_resolution
from utils.bench.pack_runs import RESULT_MARK, report, run_here, run_process, summarise, worker
from utils.core.cli import Parser, run_cli
from utils.core.errors import UserError

logger = logging.getLogger("benchmark_sweep")

DEFAULT_STEPS = {"tiny": (20, 2), "small": (4, 1), "sdxl": (10, 3)}  # (timed, warm-up) per run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="example:\n  python utils/benchmark_sweep.py --model small")
    p.add_argument("--model", choices=MODELS, default="small",
                   help="tiny: the test model; small: SDXL topology at 1/4 width (CPU); sdxl: full size (GPU)")
    p.add_argument("--resolution", type=int, default=None, help="default: tiny 128, small 256, sdxl 1024")
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8], help="the grid's ranks (default: 4 8)")
    p.add_argument("--alphas", type=float, nargs="+", default=[8.0, 16.0], help="the grid's alphas (default: 8 16)")
    p.add_argument("--packs", type=int, nargs="+", default=None,
                   help="pack sizes to time, each the first K runs of the grid (default: the whole grid)")
    p.add_argument("--separate", type=int, default=None,
                   help="runs of the grid timed separately (default: all); a separate sweep of K runs is then K "
                        "times their mean process (e.g. --separate 1 on a GPU, where a process costs minutes)")
    p.add_argument("--fresh_processes", action=argparse.BooleanOptionalAction, default=True,
                   help="each training in a fresh process, timed from start to exit, its peak memory its own "
                        "(default); --no-fresh_processes runs them one after another in this process, for proving "
                        "the paths on a CPU in seconds (wall times then leave out the imports)")
    p.add_argument("--train_batch_size", type=int, default=1)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="default: bf16 on a GPU, no (fp32) on a CPU")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per run (default by model)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default by model)")
    p.add_argument("--num_threads", type=int, default=None,
                   help="CPU threads per process (default: 1 on a CPU, torch's default with a GPU)")
    p.add_argument("--num_images", type=int, default=8, help="synthetic training images")
    p.add_argument("--model_dir", default=None,
                   help="a saved diffusers folder of the --model architecture to train instead of building and "
                        "saving one (e.g. the GPU check's)")
    p.add_argument("--output_json", default=None, help="also write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return check_resolution(p, p.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_MARK + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    cuda = torch.cuda.is_available()
    if args.mixed_precision == "fp16":
        raise UserError("--mixed_precision fp16: the packed step has no loss scaling; use bf16 or no")
    steps, warmup = DEFAULT_STEPS[args.model]
    runs = [(rank, alpha) for rank in args.ranks for alpha in args.alphas]
    settings = {"model": args.model, "resolution": args.resolution or DEFAULT_RESOLUTION[args.model],
                "train_batch_size": args.train_batch_size,
                "mixed_precision": args.mixed_precision or ("bf16" if cuda else "no"),
                "gradient_checkpointing": args.gradient_checkpointing, "steps": args.steps or steps,
                "warmup": warmup if args.warmup is None else args.warmup,
                "num_threads": args.num_threads or (torch.get_num_threads() if cuda else 1), "runs": runs,
                "fresh_processes": args.fresh_processes}
    sizes = args.packs or [len(runs)]
    if any(not 2 <= size <= len(runs) for size in sizes):
        raise UserError(f"--packs {' '.join(map(str, sizes))}: each size is from 2 to the grid's {len(runs)} runs")
    with tempfile.TemporaryDirectory(prefix="benchmark_sweep_") as scratch:
        from utils.bench.train_runs import save_model
        from utils.tiny.sdxl import make_synthetic_dataset

        settings.update(model_dir=args.model_dir or str(save_model(args.model, Path(scratch) / "model",
                                                                      torch.device("cuda" if cuda else "cpu"))),
                        dataset_dir=str(make_synthetic_dataset(Path(scratch) / "data", args.num_images)),
                        output_dir=str(Path(scratch) / "runs"))
        separate, packs = time_both_ways(args, settings, runs, sizes)
    failed = [result["failed"] for result in separate + list(packs.values()) if "failed" in result]
    if failed:
        raise UserError(f"a benchmark process failed: {failed[0]}")
    summaries = {size: summarise(separate, packed) for size, packed in packs.items()}
    print("\n\n".join(report(settings, summary, len(separate)) for summary in summaries.values()))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"settings": settings, "summaries": summaries,
                                                      "separate": separate, "packs": packs}, indent=2))
    return 0


def time_both_ways(args: argparse.Namespace, settings: dict, runs: list, sizes: list[int]) -> tuple[list, dict]:
    """The runs timed alone (``--separate`` of them), then each pack size."""
    run_one = run_process if args.fresh_processes else run_here
    separate = []
    for run in runs[:args.separate or len(runs)]:
        logger.info("separate run r%d a%g", *run)
        separate.append(run_one(settings, [run]))
    packs = {}
    for size in sizes:
        logger.info("one pack of %d runs", size)
        packs[size] = run_one(settings, runs[:size])
    return separate, packs


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(run_cli(main))
