"""The sweep benchmark's parts: the same k runs of a rank x alpha grid trained separately (one process per
run, one after another, as the sweep runs them) and as one pack (one process), each process timed from its
start to its exit, with its step times and peak memory.

Each process sets the runs up with the trainer's own code (``recipe.set_up_pack``: the benchmark model saved
with random weights, a synthetic dataset, the caches, one adapter, optimizer and schedule per run,
accelerate) and times ``recipe.train_step``: with one run a plain run's step, with several the packed step.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from utils.bench.flops import synchronize
from utils.bench.report import format_table, mib, rate_text
from utils.bench.steps import MemoryMeter

logger = logging.getLogger("benchmark_sweep")

RESULT_MARK = "BENCHMARK_RESULT "
ROOT = Path(__file__).resolve().parents[2]
COMMAND = ROOT / "utils" / "benchmark_sweep.py"


def run_process(config: dict, runs: list[tuple[int, float]]) -> dict:
    """One training process of ``runs`` (one run: separate; several: a pack), timed from start to exit."""
    payload = json.dumps({**config, "runs": runs})
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(config["num_threads"])}
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, str(COMMAND), "--worker", payload], capture_output=True, text=True,
                               env=env)
    wall = time.perf_counter() - started
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return {**json.loads(line[len(RESULT_MARK):]), "wall_seconds": wall}
    logger.error("benchmark process of %d run(s) failed (exit %d):\n%s", len(runs), completed.returncode,
                 completed.stderr[-3000:])
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    return {"failed": lines[-1] if lines else f"exit status {completed.returncode}", "wall_seconds": wall}


def run_here(config: dict, runs: list[tuple[int, float]]) -> dict:
    """``run_process`` in this process (the imports paid once): wall time without them, peak memory shared."""
    started = time.perf_counter()
    result = worker({**config, "runs": runs})
    return {**result, "wall_seconds": time.perf_counter() - started}


def worker(config: dict) -> dict:
    """In the fresh process: the trainer's set-up of the runs (``recipe.set_up_pack``: the saved model, the
    dataset, caches, adapters, optimizers), then ``recipe.train_step`` timed, as the training loop runs it."""
    from utils.data.listing import load_examples
    from utils.training.flags import parse_training_args
    from utils.training.recipe import set_up_pack, train_step
    from utils.training.run import open_run

    torch.set_num_threads(config["num_threads"])
    runs = [parse_training_args([
        "--pretrained_model_name_or_path", config["model_dir"], "--dataset_dir", config["dataset_dir"],
        "--output_dir", config["output_dir"], "--resolution", str(config["resolution"]),
        "--train_batch_size", str(config["train_batch_size"]), "--max_train_steps", "1000000",
        "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--report_to", "none",
        "--mixed_precision", config["mixed_precision"], "--lora_rank", str(rank), "--lora_alpha", str(alpha),
        "--gradient_checkpointing" if config["gradient_checkpointing"] else "--no-gradient_checkpointing"])
        for rank, alpha in config["runs"]]
    started = time.perf_counter()
    pack = set_up_pack([open_run(args, args.dataset_type) for args in runs],
                       load_examples(runs[0].dataset_type, runs[0].dataset_dir))
    device = pack[0].accelerator.device
    synchronize(device)
    setup_seconds = time.perf_counter() - started
    memory = MemoryMeter(device)
    memory.start_training()
    for model in pack[0].models:
        model.train()
    batches = _forever(pack[0].dataloader)
    step_seconds = []
    for _ in range(config["warmup"] + config["steps"]):
        synchronize(device)
        start = time.perf_counter()
        losses, _ = train_step(pack, next(batches))
        losses.tolist()  # as the loop reads them
        step_seconds.append(time.perf_counter() - start)
    train_peak, process_peak = memory.peaks()
    return {"runs": len(pack), "setup_seconds": setup_seconds, "step_seconds": step_seconds[config["warmup"]:],
            "train_peak_bytes": train_peak, "process_peak_bytes": process_peak,
            "train_start_bytes": memory.start_bytes}


def _forever(dataloader):
    while True:
        yield from dataloader


def summarise(separate: list[dict], packed: dict) -> dict:
    """The two ways of training the same k runs side by side: whole-sweep wall time (separately: k times the
    mean process of the runs timed alone), steps/s per run, memory."""
    k = packed["runs"]
    separate_step = statistics.median(s for result in separate for s in result["step_seconds"])
    packed_step = statistics.median(packed["step_seconds"])
    separate_peak = max(result["process_peak_bytes"] for result in separate)
    separate_wall = k * statistics.mean(result["wall_seconds"] for result in separate)
    return {
        "runs": k,
        "separate_wall_seconds": separate_wall,
        "packed_wall_seconds": packed["wall_seconds"],
        "separate_steps_per_second_per_run": 1 / separate_step,
        "packed_steps_per_second_per_run": 1 / packed_step,
        "separate_run_steps_per_second": 1 / separate_step,
        "packed_run_steps_per_second": k / packed_step,
        "separate_peak_bytes": separate_peak,
        "packed_peak_bytes": packed["process_peak_bytes"],
        "wall_ratio": packed["wall_seconds"] / separate_wall,
        "throughput_ratio": (k / packed_step) / (1 / separate_step),
        "peak_vs_separate_side_by_side": packed["process_peak_bytes"] / (k * separate_peak),
        "peak_vs_one_separate": packed["process_peak_bytes"] / separate_peak,
    }


def report(settings: dict, summary: dict, timed_alone: int | None = None) -> str:
    """The table of one pack size against the same runs trained separately (``timed_alone`` of them timed)."""
    k = summary["runs"]
    alone = "" if timed_alone in (None, k) else f", {k} x the mean of {timed_alone} timed"
    rows = [
        [f"separate ({k} processes, one after another{alone})", f"{summary['separate_wall_seconds']:.1f}",
         rate_text(summary["separate_steps_per_second_per_run"]), rate_text(summary["separate_run_steps_per_second"]),
         mib(summary["separate_peak_bytes"]), mib(k * summary["separate_peak_bytes"])],
        [f"packed ({k} runs, one process)", f"{summary['packed_wall_seconds']:.1f}",
         rate_text(summary["packed_steps_per_second_per_run"]), rate_text(summary["packed_run_steps_per_second"]),
         mib(summary["packed_peak_bytes"]), mib(summary["packed_peak_bytes"])],
    ]
    table = format_table(["way", "sweep wall s", "steps/s per run", "run-steps/s", "peak MiB per process",
                          f"peak MiB, {k} side by side"], rows)
    return (f"{settings['model']} model, {settings['resolution']}², batch {settings['train_batch_size']}, "
            f"{settings['steps']} timed steps (+{settings['warmup']} warm-up) per run, runs (rank, alpha) "
            f"{settings['runs'][:k]}, {settings['mixed_precision']}, gradient checkpointing "
            f"{'on' if settings['gradient_checkpointing'] else 'off'}\n{table}\n"
            f"packed / separate: sweep wall time {summary['wall_ratio']:.2f}x, throughput (run-steps/s) "
            f"{summary['throughput_ratio']:.2f}x, peak memory {summary['peak_vs_separate_side_by_side']:.2f}x of "
            f"{k} separate runs side by side, {summary['peak_vs_one_separate']:.2f}x of one separate run")
