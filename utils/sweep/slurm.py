"""Sweeps and inference on a SLURM cluster: the job scripts, their submission with sbatch, and waiting.

``run_experiments.sh --slurm`` submits the runs still to do as one job array (one task per rank and alpha,
each running ``utils/sweep_report.py slurm_task train``: status start, the trainer, status end, exactly as a
local run) and a job that depends on it (``--dependency=afterany``) writing the loss curves and summary.json
(``slurm_task finish``). The inference scripts submit themselves as one job. The scripts and the job ids
land in ``{results_dir}/slurm/`` once sbatch took them; the tasks' output goes to
``{results_dir}/slurm/{job}_{task}.out``. Only the standard library is imported at module level.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from utils.core.atomic import write_json, write_text
from utils.core.layout import SLURM_DIR, SweepLayout
from utils.sweep.records import SweepError, read_json

logger = logging.getLogger("sweep_slurm")

SLURM_FOLDER = SLURM_DIR
JOBS_FILE = "jobs.json"
WARNING_SECONDS = 300  # SLURM warns the batch shell (SIGUSR1) this long before the time limit
SUBMIT_TIMEOUT = 120


class SlurmError(SweepError):
    """sbatch, squeue or the controller refused or failed; the message says which and why."""


def sbatch_words(text: str) -> list[str]:
    """--sbatch_args split as a shell splits it."""
    try:
        return shlex.split(text or "")
    except ValueError as error:
        raise SlurmError(f"--sbatch_args {text!r}: {error}") from None


def job_script(name: str, command: list[str], workdir: Path, output: str, array: str | None = None,
               requeue: bool = False, notes: list[str] = (), environment: dict | None = None) -> str:
    """A batch script: #SBATCH defaults (the flags given to sbatch win over them), then the command."""
    lines = ["#!/usr/bin/env bash", f"#SBATCH --job-name={name}", f"#SBATCH --output={output}",
             "#SBATCH --open-mode=append", f"#SBATCH --signal=B:USR1@{WARNING_SECONDS}"]
    if array:
        lines.append(f"#SBATCH --array={array}")
    if requeue:
        lines.append("#SBATCH --requeue")
    lines += [f"# {note}" for note in notes]
    lines += ["set -euo pipefail", f"cd {shlex.quote(str(workdir))}",
              "export HF_HUB_OFFLINE=1  # the model was resolved before submitting; no task downloads"]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in (environment or {}).items()]
    lines.append(f"exec {shlex.join(command)}  # the batch shell's own process: SLURM's SIGUSR1 warning reaches it")
    return "\n".join(lines) + "\n"


def _first_error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "unrecognized" in line.lower()
              or "invalid" in line.lower()]
    return (errors or lines or ["no output"])[0]


def submit(script: str, sbatch_args: list[str], log_dir: Path, dependency: str | None = None) -> str:
    """sbatch the script (read from stdin); its job id. One clear SlurmError when sbatch refuses it. The
    jobs' output folder exists before they start (SLURM does not make it), and is removed again when empty
    after a refusal."""
    made = not log_dir.exists()
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _sbatch(script, sbatch_args, dependency)
    except SlurmError:
        if made and not any(log_dir.iterdir()):
            log_dir.rmdir()
        raise


def _sbatch(script: str, sbatch_args: list[str], dependency: str | None) -> str:
    command = ["sbatch", "--parsable", *sbatch_args]
    if dependency:
        command.append(f"--dependency=afterany:{dependency}")
    try:
        result = subprocess.run(command, input=script, capture_output=True, text=True, timeout=SUBMIT_TIMEOUT)
    except FileNotFoundError:
        raise SlurmError("sbatch: not found (install SLURM's client tools, or run on the cluster's login node)") \
            from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"sbatch: no answer from the SLURM controller in {SUBMIT_TIMEOUT} s") from None
    if result.returncode != 0:
        shown = " ".join(sbatch_args) or "no --sbatch_args"
        raise SlurmError(f"sbatch refused the job ({shown}): {_first_error_line(result.stderr or result.stdout)}")
    return result.stdout.strip().split(";")[0]


def queued(job_ids: list[str]) -> list[str]:
    """The jobs (array tasks included) of ``job_ids`` that SLURM still has pending or running."""
    result = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True,
                            text=True, timeout=60)
    if result.returncode != 0:
        if "invalid job id" in result.stderr.lower():
            return []  # long gone from the controller
        raise SlurmError(f"squeue: {_first_error_line(result.stderr)}")
    return result.stdout.split()


def wait_until_done(job_ids: list[str], poll_seconds: float = 2.0) -> None:
    """Block until none of the jobs is pending or running."""
    logger.info("Waiting for job(s) %s (squeue -j %s)", ", ".join(job_ids), ",".join(job_ids))
    while queued(job_ids):
        time.sleep(poll_seconds)


def check_not_queued(slurm_dir: Path) -> None:
    """Refuse to submit a second time while the jobs of an earlier submission are still queued."""
    jobs = read_json(slurm_dir / JOBS_FILE) or {}
    ids = [job for job in (jobs.get("array"), jobs.get("finish"), jobs.get("job")) if job]
    if ids and queued(ids):
        raise SlurmError(f"{slurm_dir / JOBS_FILE}: job(s) {', '.join(ids)} of this folder are still queued or "
                         f"running; wait for them (squeue -j {','.join(ids)}) or scancel them first")


def record_submission(slurm_dir: Path, jobs: dict, scripts: dict[str, str]) -> None:
    """After sbatch took the jobs: their ids and scripts, for people and for the next submission."""
    for name, text in scripts.items():
        write_text(slurm_dir / f"{name}.sbatch", text)
    write_json(slurm_dir / JOBS_FILE, {**jobs, "submitted_at": time.strftime("%Y-%m-%d %H:%M:%S")})


def dry_run_text(scripts: dict[str, str], sbatch_args: list[str]) -> str:
    shown = shlex.join(sbatch_args)
    parts = []
    for name, text in scripts.items():
        dependency = " --dependency=afterany:<array job id>" if name == "finish" else ""
        parts.append(f"### sbatch --parsable {shown}{dependency} < {name}.sbatch\n{text}")
    return "\n".join(parts)


def summary_exit_code(results_dir: Path, since: float) -> int:
    """The local sweep's rule, from the summary.json the finishing job wrote: 0 when every run finished."""
    path = SweepLayout(results_dir).summary
    summary = read_json(path) if path.is_file() and path.stat().st_mtime >= since - 1 else None
    if summary is None:
        print(f"error: {path}: not written by the finishing job (see {results_dir / SLURM_FOLDER})", file=sys.stderr)
        return 1
    counts = ", ".join(f"{count} {state}" for state, count in summary["counts"].items() if count)
    print(f"Sweep: {counts} ({path})")
    return 0 if summary.get("complete") else 1


def repository_root() -> Path:
    return Path(__file__).resolve().parent.parent.parent


def task_environment(train_script: str = "", launcher: str = "") -> dict:
    """What every task needs from this shell: the interpreter, the trainer and its launcher (absolute)."""
    environment = {"PYTHON": sys.executable}
    if train_script:
        environment["TRAIN_SCRIPT"] = str(Path(train_script).resolve())
    if launcher:
        environment["TRAIN_LAUNCHER"] = launcher
    if os.environ.get("HF_HOME"):
        environment["HF_HOME"] = os.environ["HF_HOME"]
    return environment
