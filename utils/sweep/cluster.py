"""What the ``--slurm`` scripts submit: the sweep's job array and finishing job, one inference job, and the
check made before either (the base model resolved on this machine, the dataset checked).

The job scripts, sbatch and squeue are in slurm.py; what a task does is driver.slurm_task.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from utils.sweep.slurm import (SLURM_FOLDER, check_not_queued, dry_run_text, job_script, record_submission,
                               repository_root, sbatch_words, submit, summary_exit_code, task_environment,
                               wait_until_done)

logger = logging.getLogger("sweep_slurm")


@dataclass(frozen=True)
class SweepSubmission:
    """The runs still to do of a sweep, as run_experiments.sh --slurm submits them."""

    results_dir: Path
    runs_dir: str
    ranks: list[str]
    alphas: list[str]
    lr: str
    todo: list[str]  # 'rank:alpha' of each array task, in task order
    start_time: str
    train_script: str
    launcher: str
    sbatch_args: str
    dry_run: bool
    wait: bool
    requeue: bool
    train_args: list[str]


def _task_flags(args: SweepSubmission) -> list[str]:
    flags = ["--results_dir", str(Path(args.results_dir).resolve()), "--runs_dir", args.runs_dir,
             "--ranks", " ".join(args.ranks), "--alphas", " ".join(args.alphas), "--lr", args.lr,
             "--tasks", " ".join(args.todo), "--start_time", args.start_time]
    return flags + (["--requeue"] if args.requeue else []) + ["--", *args.train_args]


def sweep_scripts(args: SweepSubmission) -> dict[str, str]:
    """The array script (task i trains ``args.todo[i]``, 'rank:alpha') and the finishing job's script."""
    slurm_dir = Path(args.results_dir).resolve() / SLURM_FOLDER
    task = [sys.executable, str(repository_root() / "utils" / "sweep_report.py"), "slurm_task"]
    environment = task_environment(args.train_script, args.launcher)
    grid = (f"grid: ranks {' '.join(args.ranks)} x alphas {' '.join(args.alphas)} at learning rate {args.lr}; "
            f"{len(args.todo)} run(s) to do")
    notes = [grid, *(f"task {i}: rank {p.split(':')[0]}, alpha {p.split(':')[1]}" for i, p in enumerate(args.todo)),
             f"sbatch arguments: {args.sbatch_args or '(none)'}",
             f"launcher: {args.launcher or environment['PYTHON']}"]
    workdir = Path.cwd()
    array = job_script("lora_sweep", [*task, "train", *_task_flags(args)], workdir, str(slurm_dir / "%A_%a.out"),
                       array=f"0-{len(args.todo) - 1}", requeue=args.requeue, notes=notes, environment=environment)
    finish = job_script("lora_sweep_report", [*task, "finish", *_task_flags(args)], workdir,
                        str(slurm_dir / "%j_finish.out"), notes=[grid, "runs after the whole array (afterany)"],
                        environment=environment)
    return {"array": array, "finish": finish}


def submit_sweep(args: SweepSubmission) -> int:
    """Submit the array and the finishing job (or print them with --dry_run); with --wait, the sweep's
    exit status."""
    extra = sbatch_words(args.sbatch_args)
    scripts = sweep_scripts(args)
    if args.dry_run:
        print(dry_run_text(scripts, extra))
        return 0
    slurm_dir = Path(args.results_dir) / SLURM_FOLDER
    check_not_queued(slurm_dir)
    since = time.time()
    array_id = submit(scripts["array"], extra, slurm_dir)
    try:
        finish_id = submit(scripts["finish"], extra, slurm_dir, dependency=array_id)
    except Exception:
        _cancel(array_id)
        raise
    record_submission(slurm_dir, {"array": array_id, "finish": finish_id, "tasks": args.todo}, scripts)
    print(f"Submitted batch job {array_id} (array of {len(args.todo)}: "
          f"{', '.join('r{} a{}'.format(*p.split(':')) for p in args.todo)}); summary job {finish_id}")
    if not args.wait:
        return 0
    wait_until_done([array_id, finish_id])
    return summary_exit_code(Path(args.results_dir), since)


def _cancel(job_id: str) -> None:
    import subprocess

    subprocess.run(["scancel", job_id], capture_output=True, timeout=60)


def submit_job(args: argparse.Namespace) -> int:
    """One job running ``args.command`` (an inference script without its --slurm flags) in this folder."""
    extra = sbatch_words(args.sbatch_args)
    log_dir = Path(args.log_dir).resolve()
    script = job_script(args.name, args.command, Path.cwd(), str(log_dir / "%j.out"),
                        notes=[f"sbatch arguments: {args.sbatch_args or '(none)'}"],
                        environment=task_environment())
    if args.dry_run:
        print(dry_run_text({args.name: script}, extra))
        return 0
    check_not_queued(log_dir)
    job_id = submit(script, extra, log_dir)
    record_submission(log_dir, {"job": job_id}, {args.name: script})
    print(f"Submitted batch job {job_id} (output: {log_dir / (job_id + '.out')})")
    if not args.wait:
        return 0
    wait_until_done([job_id])
    return _job_exit_code(job_id)


def _job_exit_code(job_id: str) -> int:
    """The job's exit code as SLURM recorded it (scontrol), 1 when it is no longer known."""
    import subprocess

    result = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=60)
    for word in result.stdout.split():
        if word.startswith("ExitCode="):
            return int(word.split("=")[1].split(":")[0])
    return 1


def prepare_offline(train_args: list[str]) -> None:
    """Before submitting: the base model (and VAE) resolved here, fetched once into the Hugging Face cache
    when it is a Hub id, and the dataset checked, so the tasks run offline and none fails on a bad image."""
    from utils.training.recipe import training_examples as load_training_examples
    from utils.training.flags import parse_training_args

    args = parse_training_args(["--lora_rank", "1", *train_args])
    for model, kind in ((args.pretrained_model_name_or_path, "pipeline"),
                        (args.pretrained_vae_model_name_or_path, "vae")):
        if model and not Path(model).exists():
            _fetch(model, kind, args)
    examples, dataset_type = load_training_examples(args)
    logger.info("Checked the dataset: %d usable example(s) (%s)", len(examples), dataset_type)


def _fetch(model: str, kind: str, args: argparse.Namespace) -> None:
    from utils.sweep.records import SweepError

    try:
        if kind == "pipeline":
            from diffusers import DiffusionPipeline
            path = DiffusionPipeline.download(model, revision=args.revision, variant=args.variant)
        else:
            from huggingface_hub import snapshot_download
            path = snapshot_download(model, revision=args.revision)
    except Exception as error:  # noqa: BLE001 - any failure to fetch is the one line the user needs
        raise SweepError(f"{model}: cannot resolve the base model here before submitting "
                         f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
    logger.info("Base model %s resolved to %s (the tasks read it from there, offline)", model, path)
