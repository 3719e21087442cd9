"""A sweep run's status.json: written when the run starts (earlier attempts kept in its history) and
when it ends (its state, times, exit code and the run folder the trainer made), with the original's
experiment_{R}_{A}.json written from it."""

from __future__ import annotations

import logging
import shlex
from datetime import datetime
from pathlib import Path

from utils.compat.sweep_records import write_experiment_record
from utils.core.atomic import write_json
from utils.core.layout import CONFIG_FILE, RUN_DIR_FILE, RunLayout
from utils.core.secrets import mask_argv
from utils.sweep.records import INTERRUPTED_CODES, SweepError, now_iso, read_json, run_lora_type

logger = logging.getLogger("sweep_runs")


def is_finished(status: dict | None) -> bool:
    """Finished with exit code 0, and its final model is still there."""
    return (bool(status) and status.get("state") == "finished" and status.get("exit_code") == 0
            and bool(status.get("run_dir")) and RunLayout(Path(status["run_dir"])).has_model())


def earlier_run_dir(folder: Path, status: dict | None) -> Path | None:
    """The run folder of an earlier attempt: recorded in its status, else named by the trainer."""
    if status and status.get("run_dir"):
        return Path(status["run_dir"])
    return reported_run_dir(folder)


def reported_run_dir(folder: Path) -> Path | None:
    """The run folder the trainer wrote into ``{folder}/run_dir.txt`` (its --run_dir_file)."""
    try:
        text = (folder / RUN_DIR_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return Path(text) if text else None


def start_status(status_file: Path, rank: str, alpha: str, learning_rate: str, number: int, output_dir: str,
                 gpu: str, log: Path, process_group: int | None, train_args: list[str], command: list[str]) -> dict:
    """Write the status of a run that starts now; earlier attempts move into its history."""
    previous = read_json(status_file) or {}
    history = list(previous.get("history", []))
    if previous:
        history.append({key: previous.get(key) for key in ("state", "started_at", "ended_at", "exit_code",
                                                              "run_dir")})
    status = {
        "rank": int(rank), "alpha": float(alpha), "learning_rate": float(learning_rate),
        "rank_text": rank, "alpha_text": alpha, "experiment_number": number,
        "state": "running", "started_at": now_iso(), "ended_at": None, "duration_s": None,
        "exit_code": None, "run_dir": None, "output_dir": str(Path(output_dir).resolve()), "gpu": gpu or None,
        "process_group": process_group, "attempts": int(previous.get("attempts", 0)) + 1, "log": str(log),
        "train_args": mask_argv(train_args), "command": shlex.join(mask_argv(command)),
        "history": history,
    }
    write_json(status_file, status)
    return status


def _new_run_dir(status_file: Path, status: dict) -> Path | None:
    """The run folder this attempt trained in: the one the trainer reported (--run_dir_file), else (a trainer
    without that flag) the newest folder in the output folder whose config has this rank, alpha and learning
    rate and was written after the start."""
    found = reported_run_dir(status_file.parent)
    if found:
        return found
    output_dir = Path(status.get("output_dir") or "")
    if not output_dir.is_dir():
        return None
    started = datetime.fromisoformat(status["started_at"]).timestamp() - 1
    candidates = []
    for config_path in output_dir.glob(f"*/{CONFIG_FILE}"):
        config = read_json(config_path) or {}
        same = (config.get("lora_rank") == status["rank"] and float(config.get("lora_alpha", -1)) == status["alpha"]
                and float(config.get("learning_rate", -1)) == status["learning_rate"])
        if same and config_path.stat().st_mtime >= started:
            candidates.append(config_path.parent)
    return max(candidates, key=lambda p: (p / CONFIG_FILE).stat().st_mtime).resolve() if candidates else None


def end_status(status_file: Path, exit_code: int, stopped: bool = False) -> dict:
    """Record how a run ended (status.json and the original's experiment_{R}_{A}.json); ``stopped``: the sweep
    stopped it, so any failing exit (killed after the grace time included) counts as interrupted."""
    status = read_json(status_file)
    if status is None:
        raise SweepError(f"{status_file}: no status to end (the run was never started)")
    run_dir = _new_run_dir(status_file, status)
    if run_dir is not None and run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()  # stopped before it wrote anything: leave no empty folder among the runs
        (status_file.parent / RUN_DIR_FILE).unlink(missing_ok=True)
        logger.info("%s: removed the empty run folder %s", status_file.parent.name, run_dir)
        run_dir = None
    has_model = run_dir is not None and RunLayout(run_dir).has_model()
    if exit_code == 0 and has_model:
        state = "finished"
    elif exit_code in INTERRUPTED_CODES or (stopped and exit_code != 0):
        state = "interrupted"
    else:
        state = "failed"
    ended = datetime.now().astimezone()
    started = datetime.fromisoformat(status["started_at"])
    status.update(state=state, ended_at=ended.isoformat(timespec="seconds"), exit_code=exit_code,
                  duration_s=round((ended - started).total_seconds(), 1), run_dir=str(run_dir) if run_dir else None)
    if exit_code == 0 and not has_model:
        status["error"] = "the trainer exited 0 but left no final_model"
    write_json(status_file, status)
    write_experiment_record(status_file.parent.parent.parent, status, run_lora_type(status))
    logger.debug("%s: %s (exit code %d) after %.0f s", status_file.parent.name, state, exit_code,
                status["duration_s"])
    return status
