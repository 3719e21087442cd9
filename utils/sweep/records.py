"""The files of a rank x alpha sweep: where each lies, the runs' states and the summary.

run_experiments.sh trains every run into the trainer's own folder, ``{runs_dir}/{ts}_{type}_r{R}_a{A}_lr{LR}/``
(default output_ghibli), and keeps its bookkeeping under ``{results_dir}`` (default experiment_results);
every name comes from utils/core/layout.py (SweepLayout):

    {results_dir}/experiment_{R}_{A}.json   the original's record of a run (utils/compat/sweep_records.py)
    {results_dir}/summary.json              the original's summary (total_experiments, start_time, end_time)
                                            plus the state and adapter type of every run, and lora_types
    {results_dir}/runs/r{R}_a{A}_lr{LR}/    status.json (state, times, exit code, the run folder the trainer
                                            made, earlier attempts), train.log and run_dir.txt
    {results_dir}/loss_curves.png, .sweep.lock

The driver (driver.py) writes them. Which runs are still to do is in plan.py, a run's status.json in
status.py, finding the runs in runs.py, reading their images in outputs.py, making them in series.py. Only
the standard library is imported at module level.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path

from utils.core.atomic import write_json
from utils.core.errors import UserError
from utils.core.layout import (CONFIG_FILE, FINAL_MODEL, STATUS_FILE, TIMESTAMP_FORMAT, RunLayout, SweepLayout,
                               model_info_file)
from utils.core.secrets import mask_argv

logger = logging.getLogger("sweep_runs")

INTERRUPTED_CODES = {130, 143}  # SIGINT, SIGTERM


class SweepError(UserError, ValueError):
    """Bad input to a sweep command; the message names the file or value and the reason."""


# ----------------------------------------------------------------------------- small helpers


def now_iso() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when the file does not exist."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as error:
        raise SweepError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(data, dict):
        raise SweepError(f"{path}: expected a JSON object")
    return data


# ----------------------------------------------------------------------------- where each file lies


def status_folder(results_dir: Path, rank: str, alpha: str, learning_rate: str) -> Path:
    return SweepLayout(results_dir).run_status_dir(rank, alpha, learning_rate)


def experiment_file(results_dir: Path, rank: str, alpha: str) -> Path:
    return SweepLayout(results_dir).record(rank, alpha)


def config_lora_type(config: dict) -> str:
    """--lora_type of a run's experiment_config.json ('lora' for a config without the key)."""
    return str(config.get("lora_type") or "lora")


def run_lora_type(status: dict) -> str | None:
    """The adapter type the run of this status trained; None before the trainer wrote its config."""
    config = read_json(Path(status["run_dir"]) / CONFIG_FILE) if status.get("run_dir") else None
    return config_lora_type(config) if config else None


def _final_eval_loss(status: dict) -> float | None:
    if not status.get("run_dir"):
        return None
    layout = RunLayout(Path(status["run_dir"]))
    info = read_json(layout.final_model / model_info_file(FINAL_MODEL)) or {}
    return info.get("final_eval_loss")


def sweep_statuses(results_dir: Path, ranks: list[str], alphas: list[str], learning_rate: str) -> list[dict]:
    """The status of every run of the grid, in grid order (state 'pending' when never started)."""
    statuses = []
    for rank in ranks:
        for alpha in alphas:
            folder = status_folder(results_dir, rank, alpha, learning_rate)
            statuses.append(read_json(folder / STATUS_FILE) or {
                "rank": int(rank), "alpha": float(alpha), "learning_rate": float(learning_rate), "state": "pending"})
    return statuses


def write_summary(results_dir: Path, ranks: list[str], alphas: list[str], learning_rate: str, gpus: str,
                  train_args: list[str], stopped: bool, start_time: str) -> dict:
    """summary.json: the original's total_experiments, start_time and end_time, then every run's state."""
    runs, counts = [], {"finished": 0, "failed": 0, "interrupted": 0, "running": 0, "pending": 0}
    for rank, alpha, status in zip([r for r in ranks for _ in alphas], [a for _ in ranks for a in alphas],
                                   sweep_statuses(results_dir, ranks, alphas, learning_rate)):
        entry = {key: status.get(key) for key in ("rank", "alpha", "learning_rate", "state", "exit_code",
                                                  "started_at", "ended_at", "duration_s", "attempts",
                                                  "gpu", "run_dir")}
        entry.update(experiment_file=experiment_file(results_dir, rank, alpha).name,
                     final_eval_loss=_final_eval_loss(status), lora_type=run_lora_type(status))
        counts[entry["state"]] = counts.get(entry["state"], 0) + 1
        runs.append(entry)
    summary = {
        "total_experiments": len(runs), "start_time": start_time,
        "end_time": datetime.now().strftime(TIMESTAMP_FORMAT),
        "results_dir": str(results_dir.resolve()), "ranks": [int(r) for r in ranks],
        "alphas": [float(a) for a in alphas], "learning_rate": float(learning_rate),
        "gpus": [g for g in gpus.split(",") if g] or None, "train_args": mask_argv(train_args),
        "stopped_by_signal": stopped, "complete": counts["finished"] == len(runs), "counts": counts, "runs": runs,
        "lora_types": sorted({run["lora_type"] for run in runs if run["lora_type"]}),
    }
    write_json(SweepLayout(results_dir).summary, summary)
    return summary
