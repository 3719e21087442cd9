"""The sweep driver: what run_experiments.sh does, in one Python process besides its trainings.

    flags -> the grid and the trainer flags checked -> the lock -> the runs still to do (plan.py)
          -> here: the jobs (local.jobs_of) on the GPU slots (local.run_jobs), each run's status as it starts
             and ends, a stop passed on to the trainings -> loss_curves.png and summary.json
          -> or on SLURM: one job array of the runs to do and a job that writes the summary (cluster.py)

A SLURM array task runs ``slurm_task train`` (one run, as a local sweep runs it) and the finishing job
``slurm_task finish``. The inference scripts' driver is inference_driver.py.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from utils.core.layout import TIMESTAMP_FORMAT, SweepLayout
from utils.sweep.flags import experiments_parser, parse, slurm_task_parser, words
from utils.sweep.local import TRAINER, Stop, Trainer, jobs_of, run_jobs, say
from utils.sweep.plan import PlannedRun, check_grid, check_trainer_flags, plan_runs
from utils.sweep.records import SweepError, write_summary

logger = logging.getLogger("sweep_runs")

SET_BY_THE_SWEEP = ("--output_dir", "--lora_rank", "--lora_alpha", "--learning_rate")

EXPERIMENTS_HELP = """\
LoRA rank x alpha sweep of train_sdxl_lora.py: runs spread over GPUs, resumable, with a record per run.

With no flags it is the original's sweep: ranks 4 8 16 x alphas 4 8 16 32 at learning rate 1e-4, each a plain
training with the trainer's defaults into output_ghibli/{ts}_{type}_r{R}_a{A}_lr{LR}/. Everything after -- goes
to train_sdxl_lora.py (e.g. --dataset_dir, --num_train_epochs); its flags are checked for every run to do before
any starts (not those of a TRAIN_SCRIPT of your own), so that a mistake every run would share is one error.

Each run prints a line as it starts and as it ends, with its run folder (where its LoRA lands); on a terminal a
progress bar shows the runs done, the running runs' steps and an ETA. Run the same command again to resume:
finished runs are skipped, the others start again (in the run folder of their earlier attempt, from its latest
resumable checkpoint, when it saved one with --checkpointing_steps). Ctrl-C or SIGTERM passes one SIGTERM to
every running training, waits up to 30 s for each to save, and records it as interrupted. A lock (flock on
{results_dir}/.sweep.lock) keeps a second sweep out of a results folder while the first one runs.

--slurm submits the runs still to do as ONE job array (a task per rank and alpha, each doing what a local run
does, into the same folders and records) and a job after it (afterany) writing loss_curves.png and summary.json;
it prints the job ids. First the base model is resolved here (a local folder, or a Hub id fetched once into the
Hugging Face cache) and the dataset checked; the tasks run with HF_HUB_OFFLINE=1. Scripts, job ids and task
output: {results_dir}/slurm/. The same command again resumes (it refuses while the jobs it submitted last are
still queued); scancel or preemption records a run as interrupted. --requeue: a task stopped by SLURM's
time-limit warning (SIGUSR1, sent 300 s before it by the default --signal=B:USR1@300) goes back in the queue.

Environment: PYTHON (the interpreter of the trainings, default: this one), TRAIN_SCRIPT (default
train_sdxl_lora.py), TRAIN_LAUNCHER (what starts each training, default $PYTHON; e.g. "accelerate launch
--multi_gpu --num_processes 4" for one run on all GPUs, with no --gpus; with --slurm, the launcher of every task).
Exit status: 0 when every run finished, 1 when one failed, 2 on bad flags, 130/143 when stopped."""


def _check_flags(args: argparse.Namespace, train_args: list[str]) -> None:
    if args.slurm and args.gpus:
        raise SweepError("--gpus is for a local sweep; with --slurm ask for GPUs in --sbatch_args")
    for arg in train_args:
        if arg.split("=", 1)[0] in SET_BY_THE_SWEEP:
            raise SweepError(f"{arg.split('=', 1)[0]} is set by the sweep; use --runs_dir, --ranks, --alphas or "
                             f"--lr before --")
    if not re.fullmatch(r"([0-9A-Za-z-]+(,[0-9A-Za-z-]+)*)?", args.gpus):
        raise SweepError(f"--gpus '{args.gpus}': expected ids like 0,1,2,3")
    if args.pack != "auto" and not (args.pack.isdigit() and int(args.pack) >= 1):
        raise SweepError(f"--pack '{args.pack}': a number of runs per process (1: each alone) or auto")


def _lock(results_dir: Path):
    """One sweep per results folder at a time: the lock lives as long as this process (not its trainings)."""
    handle = open(SweepLayout(results_dir).lock, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SweepError(f"another sweep is running with {results_dir}") from None
    return handle


def trainer_of(runs_dir: str, learning_rate: str, train_args: list[str]) -> Trainer:
    launcher = os.environ.get("TRAIN_LAUNCHER", "").split() or [os.environ.get("PYTHON") or sys.executable]
    return Trainer(launcher, os.environ.get("TRAIN_SCRIPT") or str(TRAINER), runs_dir, learning_rate, train_args)


def _summary(results_dir: Path, ranks: list[str], alphas: list[str], args, train_args: list[str],
             start_time: str, stopped: bool = False) -> int:
    """summary.json, and its counts in one line; 0 when every run of the grid finished."""
    summary = write_summary(results_dir, ranks, alphas, args.lr, getattr(args, "gpus", ""), train_args, stopped,
                            start_time)
    counts = ", ".join(f"{count} {state}" for state, count in summary["counts"].items() if count)
    print(f"Sweep: {counts} ({SweepLayout(results_dir).summary})", file=sys.stderr if stopped else sys.stdout)
    return 0 if summary["complete"] else 1


def _plot_losses(results_dir: Path) -> None:
    from utils.sweep.pictures import plot_loss_overlay
    from utils.sweep.runs import sweep_runs_of

    runs = sweep_runs_of(results_dir)
    if runs:
        plot_loss_overlay(runs, SweepLayout(results_dir).loss_curves)
    else:
        print("warning: no loss plot (no finished run yet)", file=sys.stderr)


def run_experiments(argv: list[str]) -> int:
    start_time = datetime.now().strftime(TIMESTAMP_FORMAT)  # the sweep's start, recorded before any run
    args, train_args = parse(experiments_parser(EXPERIMENTS_HELP), argv)
    _check_flags(args, train_args)
    ranks, alphas = words(args.ranks), words(args.alphas)
    results_dir = Path(args.results_dir)
    check_grid(results_dir, ranks, alphas, args.lr)
    trainer = trainer_of(args.runs_dir, args.lr, train_args)
    if Path(trainer.script).resolve() == TRAINER and not args.dry_run:  # a dry run needs no dataset or model
        # before any folder is made: a refused sweep leaves nothing behind
        check_trainer_flags([(rank, alpha) for rank in ranks for alpha in alphas], args.lr, train_args)
    results_dir.mkdir(parents=True, exist_ok=True)
    Path(args.runs_dir).mkdir(parents=True, exist_ok=True)
    lock = _lock(results_dir)  # noqa: F841 - held until the process ends
    plan = plan_runs(results_dir, ranks, alphas, args.lr, train_args)
    if args.slurm and plan:
        if args.pack != "1":
            raise SweepError(f"--slurm --pack {args.pack}: a SLURM sweep trains one run per array task; leave out "
                             "--pack")
        return _submit_sweep(args, plan, ranks, alphas, train_args, start_time, trainer)
    where = f"GPUs {args.gpus}" if args.gpus else "the default device"
    print(f"Sweep started {start_time}: {len(plan)} run(s) to do into {args.runs_dir} on {where}, records in "
          f"{results_dir}", file=sys.stderr)
    jobs = jobs_of(trainer, plan, args.pack)
    stop = Stop(jobs, forward_stop=True)
    stop.install()
    run_jobs(jobs, args.gpus.split(",") if args.gpus else [""], trainer, stop)
    if stop.requested:
        _summary(results_dir, ranks, alphas, args, train_args, start_time, stopped=True)
        return stop.exit_code
    _plot_losses(results_dir)
    return _summary(results_dir, ranks, alphas, args, train_args, start_time)


def _submit_sweep(args, plan: list[PlannedRun], ranks: list[str], alphas: list[str], train_args: list[str],
                  start_time: str, trainer: Trainer) -> int:
    from utils.sweep.cluster import SweepSubmission, prepare_offline, submit_sweep

    print(f"Sweep {start_time}: {len(plan)} run(s) to do into {args.runs_dir} on SLURM, records in "
          f"{args.results_dir}", file=sys.stderr)
    if not args.dry_run:
        prepare_offline(train_args)
    launcher = os.environ.get("TRAIN_LAUNCHER", "")
    return submit_sweep(SweepSubmission(
        results_dir=Path(args.results_dir), runs_dir=args.runs_dir, ranks=ranks, alphas=alphas, lr=args.lr,
        todo=[f"{run.rank}:{run.alpha}" for run in plan], start_time=start_time, train_script=trainer.script,
        launcher=launcher, sbatch_args=args.sbatch_args, dry_run=args.dry_run, wait=args.wait,
        requeue=args.requeue, train_args=train_args))


def slurm_task(argv: list[str]) -> int:
    """An array task (``train``: the run at $SLURM_ARRAY_TASK_ID of --tasks, as a local sweep runs it) or the
    finishing job (``finish``: the loss curves and summary.json of the whole grid)."""
    args, train_args = parse(slurm_task_parser(), argv)
    ranks, alphas, results_dir = words(args.ranks), words(args.alphas), Path(args.results_dir)
    if args.mode == "finish":
        _plot_losses(results_dir)
        return _summary(results_dir, ranks, alphas, args, train_args, args.start_time)
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if task is None:
        raise SweepError("slurm_task train: not inside a SLURM job array (no SLURM_ARRAY_TASK_ID)")
    rank, alpha = words(args.tasks)[int(task)].split(":")
    todo = [run for run in plan_runs(results_dir, ranks, alphas, args.lr, train_args)
            if (run.rank, run.alpha) == (rank, alpha)]
    if not todo:
        print(f"r{rank} a{alpha}: finished already, nothing to do", file=sys.stderr)
        return 0
    trainer = trainer_of(args.runs_dir, args.lr, train_args)
    jobs = jobs_of(trainer, todo)
    stop = Stop(jobs, forward_stop=False)  # SLURM signals the training itself; its warning is passed on
    stop.install()
    statuses = run_jobs(jobs, [""], trainer, stop, new_session=False)
    code = statuses[0]["exit_code"] if statuses else stop.exit_code  # stopped before the training started
    if args.requeue and stop.warned and code != 0:
        say(f"r{rank} a{alpha}: stopped before the time limit; back in the queue to resume")
        subprocess.run(["scontrol", "requeue", os.environ.get("SLURM_JOB_ID", "")], check=False)
    return code
