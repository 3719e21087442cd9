"""The runs of a sweep on this machine: each training a child process on a GPU slot, its status recorded as it
starts and ends, and a stop (SIGINT, SIGTERM, SLURM's SIGUSR1 warning) passed on to the trainings.

``jobs_of`` is where runs become processes: one run per training process, or with ``--pack`` several runs of the
grid in one (utils/train_pack.py: runs that differ only in rank and alpha, on one frozen model), one Job with
several runs. Each run keeps its own status, run folder and records; a pack's output goes to its first run's
train.log.
"""

from __future__ import annotations

import logging
import os
import select
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from utils.core.atomic import write_json
from utils.core.layout import RUN_DIR_FILE, RUN_LOG_FILE, STATUS_FILE, RunLayout
from utils.sweep.plan import PlannedRun
from utils.sweep.records import SweepError, read_json
from utils.sweep.status import end_status, reported_run_dir, start_status

logger = logging.getLogger("sweep_runs")

ROOT = Path(__file__).resolve().parents[2]
TRAINER = ROOT / "train_sdxl_lora.py"
PACK_TRAINER = ROOT / "utils" / "train_pack.py"  # several runs of the grid in one process
STOP_GRACE_S = 30.0  # after a stop, how long the trainings have to save before they are killed
TICK_S = 0.5  # how often the scheduler looks at its children and the progress


@dataclass(frozen=True)
class Trainer:
    """How every run of the sweep is trained: the launcher and script, and the flags shared by all runs."""

    launcher: list[str]
    script: str
    runs_dir: str
    learning_rate: str
    train_args: list[str]

    def command(self, run: PlannedRun) -> list[str]:
        command = [*self.launcher, self.script, "--output_dir", self.runs_dir, "--lora_rank", run.rank,
                   "--lora_alpha", run.alpha, "--learning_rate", self.learning_rate,
                   "--run_dir_file", str(run.folder / RUN_DIR_FILE)]
        if run.resume and not any(a.startswith("--resume_from_checkpoint") for a in self.train_args):
            command += ["--resume_from_checkpoint", run.resume]  # continue the earlier attempt in its folder
        command += self.train_args
        # One latent and text-embedding cache per sweep, in {runs_dir}/.latent_cache: the first run fills it,
        # every later run reads it and starts training at once.
        if "--no-cache" not in self.train_args and "--cache_latents_to_disk" not in self.train_args:
            command.append("--cache_latents_to_disk")
        return command

    def pack_command(self, runs: list[PlannedRun]) -> list[str]:
        """utils/train_pack.py for ``runs``: each its rank, alpha and run-folder record; the shared flags after --.
        Runs of an earlier attempt resume from their latest checkpoints ('latest' finds each run's own)."""
        command = [*self.launcher, str(PACK_TRAINER)]
        for run in runs:
            command += ["--pack_run", run.rank, run.alpha, str(run.folder / RUN_DIR_FILE)]
        command += ["--", "--output_dir", self.runs_dir, "--learning_rate", self.learning_rate]
        if any(run.resume for run in runs) and not any(a.startswith("--resume_from_checkpoint") for a in self.train_args):
            command += ["--resume_from_checkpoint", "latest"]
        command += self.train_args
        if "--no-cache" not in self.train_args and "--cache_latents_to_disk" not in self.train_args:
            command.append("--cache_latents_to_disk")
        return command


@dataclass
class Job:
    """One training process and the runs it trains."""

    runs: list[PlannedRun]
    command: list[str]
    slot: str = ""
    process: subprocess.Popen | None = None
    run_dirs: dict = field(default_factory=dict)  # run name -> the run folder, once known
    signalled: bool = False


def jobs_of(trainer: Trainer, plan: list[PlannedRun], pack: str = "1") -> list[Job]:
    """The training processes of the runs still to do, in the order they start: one per run, or with ``pack``
    (N or auto) the runs that can train together in packs (training.pack.plan_packs), each run that cannot
    alone with a line saying why."""
    if pack == "1" or len(plan) < 2:
        return [Job([run], trainer.command(run)) for run in plan]
    if Path(trainer.script).resolve() != TRAINER:
        say(f"--pack {pack}: each run trains alone with {trainer.script} (a pack needs train_sdxl_lora.py's flags)")
        return [Job([run], trainer.command(run)) for run in plan]
    import torch

    from utils.training.flags import parse_training_args
    from utils.training.pack import plan_packs

    runs = [parse_training_args(trainer.command(run)[len(trainer.launcher) + 1:]) for run in plan]
    device = torch.device("cuda" if pack == "auto" and torch.cuda.is_available() else "cpu")
    groups, lines = plan_packs(runs, pack, device, [_resume_step(run) for run in plan])
    for line in lines:
        say(line)
    jobs = []
    for group in groups:
        members = [plan[index] for index in group]
        jobs.append(Job(members, trainer.command(members[0]) if len(members) == 1 else trainer.pack_command(members)))
        if len(members) > 1:
            say(f"pack of {len(members)}: {', '.join(run.name for run in members)} (one process; its output in "
                f"{members[0].folder / RUN_LOG_FILE})")
    return jobs


def _resume_step(run: PlannedRun) -> int:
    """The step an earlier attempt of ``run`` resumes from (0: none)."""
    from utils.training.checkpoints import checkpoints_of

    found = checkpoints_of(Path(run.resume)) if run.resume else []
    return RunLayout.checkpoint_step(found[-1]) if found else 0


def say(text: str) -> None:
    """One line for a person, above the progress bar when there is one."""
    from tqdm.auto import tqdm

    tqdm.write(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr)


class Stop:
    """The signals that stop a sweep. In a local sweep the trainings run in their own sessions, so a stop is
    passed on to each as one SIGTERM (a second one would make it exit without saving). In a SLURM task the
    training shares the task's process group and gets SIGINT/SIGTERM from SLURM itself; only SLURM's time-limit
    warning (SIGUSR1, sent to the batch shell alone) is passed on."""

    def __init__(self, jobs: list[Job], forward_stop: bool) -> None:
        self.jobs, self.forward_stop = jobs, forward_stop
        self.signal_number: int | None = None
        self.warned = False

    def install(self) -> None:
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(number, self._handle)

    def _handle(self, number: int, frame) -> None:
        if self.forward_stop and self.requested and number != signal.SIGUSR1:
            self.kill_all()  # a second Ctrl-C: no more waiting for the saves
            return
        self.signal_number = self.signal_number or number
        self.warned = self.warned or number == signal.SIGUSR1
        if self.forward_stop or number == signal.SIGUSR1:
            for job in self.jobs:
                self.terminate(job)

    def kill_all(self) -> None:
        for job in self.jobs:
            if job.process is not None and job.process.poll() is None:
                try:
                    os.killpg(job.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def terminate(self, job: Job) -> None:
        if job.process is None or job.signalled or job.process.poll() is not None:
            return
        job.signalled = True
        try:
            if self.forward_stop:
                os.killpg(job.process.pid, signal.SIGTERM)
            else:
                job.process.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    @property
    def exit_code(self) -> int:
        return 128 + (signal.SIGINT if self.signal_number == signal.SIGINT else signal.SIGTERM)


def start_job(job: Job, slot: str, trainer: Trainer, new_session: bool) -> None:
    """Record each run as running, then start its training with its output appended to the run's train.log."""
    job.slot = slot
    for run in job.runs:
        start_status(run.folder / STATUS_FILE, run.rank, run.alpha, trainer.learning_rate, run.number,
                     trainer.runs_dir, slot, run.folder / RUN_LOG_FILE, None, trainer.train_args, job.command)
        if run.resume:
            job.run_dirs[run.name] = Path(run.resume)
        where = f" on GPU {slot}" if slot else ""
        say(f"start {run.name}{where} -> {run.resume or trainer.runs_dir + '/ (a new run folder)'}")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": slot} if slot else None
    log_path = job.runs[0].folder / RUN_LOG_FILE
    for run in job.runs[1:]:  # a pack: one output, in its first run's log
        with open(run.folder / RUN_LOG_FILE, "a") as log:
            log.write(f"trained in one process with {', '.join(r.name for r in job.runs if r is not run)}: "
                      f"the training's output is in {log_path}\n")
    with open(log_path, "ab") as log:
        try:
            job.process = subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=env, start_new_session=new_session)
        except OSError as error:  # no such launcher or interpreter: every run would fail the same way
            for run in job.runs:
                end_status(run.folder / STATUS_FILE, 127)
            raise SweepError(f"{job.command[0]}: cannot start the training ({error.strerror}); set PYTHON or "
                             f"TRAIN_LAUNCHER") from None
    logger.debug("%s: %s", log_path.parent.name, shlex.join(job.command))
    for run in job.runs:
        _set_process_group(run.folder / STATUS_FILE, job.process.pid)


def _set_process_group(status_file: Path, pid: int) -> None:
    status = read_json(status_file) or {}
    write_json(status_file, {**status, "process_group": pid})


def exit_code_of(process: subprocess.Popen) -> int:
    """The shell's view of an exit: a death by signal N is 128 + N."""
    code = process.returncode
    return 128 - code if code < 0 else code


def end_job(job: Job) -> list[dict]:
    """Record how each run of the job ended, with the run folder its LoRA is in. A pack that ends with an error
    may have finished some of its runs (one run stopping leaves the others training): those are finished."""
    code = exit_code_of(job.process)
    statuses = []
    for run in job.runs:
        finished = len(job.runs) > 1 and code == 2 and _has_final_model(run)
        status = end_status(run.folder / STATUS_FILE, 0 if finished else code, stopped=job.signalled)
        statuses.append(status)
        place = status.get("run_dir") or "no run folder"
        if status["state"] == "finished":
            place = RunLayout(Path(status["run_dir"])).final_model
        say(f"end   {run.name}: {status['state']}, exit code {code} -> {place} (log: {run.folder / RUN_LOG_FILE})")
    return statuses


def _has_final_model(run: PlannedRun) -> bool:
    run_dir = reported_run_dir(run.folder)
    return bool(run_dir) and RunLayout(Path(run_dir)).has_model()


def note_run_dirs(job: Job) -> None:
    """Say once where each run of a running job trains, as soon as the trainer has named its folder."""
    for run in job.runs:
        if run.name not in job.run_dirs:
            found = reported_run_dir(run.folder)
            if found:
                job.run_dirs[run.name] = found
                say(f"      {run.name}: run folder {found}")


class Progress:
    """Runs done out of the runs to do, with the running runs' steps; tqdm's ETA comes from the finished
    runs' rate. Off when stderr is not a terminal (logs, SLURM): the start and end lines say it all there."""

    def __init__(self, total: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="run", desc="sweep", file=sys.stderr, disable=not sys.stderr.isatty())

    def show(self, running: list[Job]) -> None:
        if self.bar.disable:
            return
        steps = []
        for job in running:
            for run in job.runs:
                run_dir = job.run_dirs.get(run.name)
                steps.append(f"{run.name} step {_steps_logged(run_dir)}" if run_dir else f"{run.name} loading")
        self.bar.set_postfix_str("; ".join(steps), refresh=True)

    def done(self, runs: int) -> None:
        self.bar.update(runs)

    def close(self) -> None:
        self.bar.close()


def _steps_logged(run_dir: Path) -> int:
    try:
        with open(RunLayout(run_dir).step_log) as log:
            return max(0, sum(1 for _ in log) - 1)
    except OSError:
        return 0


def run_jobs(jobs: list[Job], slots: list[str], trainer: Trainer, stop: Stop, new_session: bool = True,
             grace: float = STOP_GRACE_S) -> list[dict]:
    """Start the jobs in order, each on the first free slot, until all have ended or a stop came; then the
    running ones get ``grace`` seconds to save. Returns the status of every run that ran."""
    queue, running, statuses = list(jobs), {}, []
    progress = Progress(sum(len(job.runs) for job in jobs))
    try:
        while (queue and not stop.requested) or running:
            for index, slot in enumerate(slots):
                if index not in running and queue and not stop.requested:
                    running[index] = job = queue.pop(0)
                    start_job(job, slot, trainer, new_session)
                    if stop.requested:  # the stop came while it started
                        stop.terminate(job)
            if stop.requested:
                _wait_for_stop(list(running.values()), stop, grace)
            for index, job in list(running.items()):
                if job.process.poll() is None:
                    note_run_dirs(job)
                    continue
                statuses += end_job(job)
                progress.done(len(job.runs))
                del running[index]
            progress.show(list(running.values()))
            if running:
                _wait_for_an_end(list(running.values()), TICK_S)
    finally:
        progress.close()
    return statuses


def _wait_for_an_end(jobs: list[Job], timeout: float) -> None:
    """Until one of the trainings ends, or ``timeout`` seconds (the progress is redrawn that often)."""
    handles = []
    try:
        handles = [os.pidfd_open(job.process.pid) for job in jobs]
        select.select(handles, [], [], timeout)
    except OSError:  # no pidfd (a kernel before 5.3): look again after the timeout
        time.sleep(timeout)
    finally:
        for handle in handles:
            os.close(handle)


def _wait_for_stop(running: list[Job], stop: Stop, grace: float) -> None:
    """Wait for the stopped trainings to save and end: within ``grace`` in a local sweep, then SIGKILL; in a
    SLURM task as long as SLURM lets them (it kills the task itself)."""
    if running:
        say(f"Stopping the sweep: waiting for {len(running)} training(s) to save...")
    deadline = time.monotonic() + grace
    for job in running:
        if stop.forward_stop:
            stop.terminate(job)
        try:
            job.process.wait(timeout=max(0.0, deadline - time.monotonic()) if stop.forward_stop else None)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not end within %.0f s of the stop: killed", job.runs[0].name, grace)
            stop.kill_all()
            job.process.wait()
