"""The bookkeeping of a rank x alpha sweep: the plan, a status per run, the original's records, the summary.

run_experiments.sh trains every run into the trainer's own folder, ``{output_dir}/{ts}_{type}_r{R}_a{A}_lr{LR}/``
(default output_ghibli), and keeps its bookkeeping under ``{results_dir}`` (default experiment_results):

    {results_dir}/experiment_{R}_{A}.json   the original's record of a run (experiment_number, lora_rank,
                                            lora_alpha, learning_rate, start_time, status "성공"/"실패")
                                            plus state, end_time, exit_code, run_dir, lora_type
    {results_dir}/summary.json              the original's summary (total_experiments, start_time, end_time)
                                            plus the state and adapter type of every run, and lora_types
    {results_dir}/runs/r{R}_a{A}_lr{LR}/    status.json (state, times, exit code, the run folder the trainer
                                            made, earlier attempts) and train.log (the trainer's output)
    {results_dir}/loss_curves.png, .sweep.lock

through the ``plan``/``status-*``/``summary`` subcommands of utils/sweep_report.py. Finding the runs is in
runs.py, reading their images in outputs.py, making them in series.py. Only the standard library is
imported at module level, so the bookkeeping calls start in a fraction of a second.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shlex
from datetime import datetime
from pathlib import Path

from utils.core.atomic import write_json
from utils.core.errors import UserError
from utils.core.names import CONFIG_FILE, LORA_WEIGHT_NAME, TIMESTAMP_FORMAT
from utils.core.secrets import mask_argv

logger = logging.getLogger("sweep_runs")

STATUS_FILE = "status.json"
SUMMARY_FILE = "summary.json"
LOG_FILE = "train.log"
WEIGHTS_FILE = LORA_WEIGHT_NAME
INTERRUPTED_CODES = {130, 143}  # SIGINT, SIGTERM
TIME_FORMAT = TIMESTAMP_FORMAT  # the original's start_time / end_time
SUCCESS, FAILURE = "성공", "실패"  # the original's status values
RUN_DIR_FILE = "run_dir.txt"  # the trainer writes its run folder here (train_sdxl_lora.py --run_dir_file)


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


def json_number(text: str) -> int | float:
    """A grid value as the original wrote it into JSON: 4 stays 4, 1e-4 becomes 0.0001."""
    return int(text) if re.fullmatch(r"-?\d+", text) else float(text)


# ----------------------------------------------------------------------------- sweep plan and status files


def run_folder_name(rank: str, alpha: str, learning_rate: str) -> str:
    return f"r{rank}_a{alpha}_lr{learning_rate}"


def status_folder(results_dir: Path, rank: str, alpha: str, learning_rate: str) -> Path:
    return results_dir / "runs" / run_folder_name(rank, alpha, learning_rate)


def experiment_file(results_dir: Path, rank: str, alpha: str) -> Path:
    return results_dir / f"experiment_{rank}_{alpha}.json"


def _positive(value: str, kind: type, name: str) -> None:
    try:
        ok = kind(value) > 0 and math.isfinite(float(value))
    except ValueError:
        ok = False
    if not ok:
        what = "a positive integer" if kind is int else "a positive number"
        raise SweepError(f"{name} {value!r}: must be {what}")


def validate_grid(ranks: list[str], alphas: list[str], learning_rate: str) -> None:
    if not ranks or not alphas:
        raise SweepError("--ranks and --alphas need at least one value each")
    for rank in ranks:
        _positive(rank, int, "--ranks value")
    for alpha in alphas:
        _positive(alpha, float, "--alphas value")
    _positive(learning_rate, float, "--lr")
    for values, name in ((ranks, "--ranks"), (alphas, "--alphas")):
        if len(set(values)) != len(values):
            raise SweepError(f"{name} {' '.join(values)!r}: a value is repeated")


def is_finished(status: dict | None) -> bool:
    """Finished with exit code 0, and its final model is still there."""
    return (bool(status) and status.get("state") == "finished" and status.get("exit_code") == 0
            and bool(status.get("run_dir")) and (Path(status["run_dir"]) / "final_model" / WEIGHTS_FILE).is_file())


def _check_learning_rate(results_dir: Path, rank: str, alpha: str, learning_rate: str) -> None:
    """experiment_{R}_{A}.json has no learning rate in its name: one results folder holds one learning rate."""
    record = read_json(experiment_file(results_dir, rank, alpha))
    if record and "learning_rate" in record and float(record["learning_rate"]) != float(learning_rate):
        raise SweepError(f"{experiment_file(results_dir, rank, alpha)}: recorded for learning rate "
                         f"{record['learning_rate']}, this sweep uses {learning_rate}; pass another --results_dir")


def plan_runs(results_dir: Path, ranks: list[str], alphas: list[str], learning_rate: str,
              train_args: list[str]) -> list[tuple[str, str, Path, int, str]]:
    """(rank, alpha, status folder, experiment number, run folder to resume or '') of every run still to do.

    Finished runs are skipped. A run that an earlier attempt left behind continues in that attempt's run
    folder: from its latest resumable checkpoint, or from the start when it stopped before the first.
    """
    validate_grid(ranks, alphas, learning_rate)
    todo, number = [], 0
    for rank in ranks:
        for alpha in alphas:
            number += 1
            _check_learning_rate(results_dir, rank, alpha, learning_rate)
            folder = status_folder(results_dir, rank, alpha, learning_rate)
            status = read_json(folder / STATUS_FILE)
            if is_finished(status):
                if status.get("train_args") != mask_argv(train_args):
                    logger.warning("%s finished earlier with other trainer flags (%s); delete %s to "
                                   "train it again", folder.name, " ".join(status.get("train_args") or []),
                                   folder / STATUS_FILE)
                logger.info("Skipping %s: finished at %s in %s", folder.name, status.get("ended_at"),
                            status.get("run_dir"))
                continue
            earlier = _earlier_run_dir(folder, status)
            resume = str(earlier) if earlier and earlier.is_dir() else ""
            todo.append((rank, alpha, folder, number, resume))
    return todo


def _earlier_run_dir(folder: Path, status: dict | None) -> Path | None:
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
                 gpu: str, log: str, process_group: int | None, train_args: list[str], command: str) -> dict:
    """Write the status of a run that starts now; earlier attempts move into its history."""
    previous = read_json(status_file) or {}
    history = list(previous.get("history", []))
    if previous:
        history.append({key: previous.get(key) for key in ("state", "started_at", "ended_at", "exit_code",
                                                              "run_dir")})
    log_path = Path(log)
    status = {
        "rank": int(rank), "alpha": float(alpha), "learning_rate": float(learning_rate),
        "rank_text": rank, "alpha_text": alpha, "experiment_number": number,
        "state": "running", "started_at": now_iso(), "ended_at": None, "duration_s": None,
        "exit_code": None, "run_dir": None, "output_dir": str(Path(output_dir).resolve()), "gpu": gpu or None,
        "process_group": process_group, "attempts": int(previous.get("attempts", 0)) + 1, "log": str(log_path),
        "log_offset": log_path.stat().st_size if log_path.is_file() else 0,
        "train_args": mask_argv(train_args), "command": shlex.join(mask_argv(shlex.split(command))),
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


def end_status(status_file: Path, exit_code: int) -> dict:
    """Record how a run ended (status.json and the original's experiment_{R}_{A}.json)."""
    status = read_json(status_file)
    if status is None:
        raise SweepError(f"{status_file}: no status to end (the run was never started)")
    run_dir = _new_run_dir(status_file, status)
    if run_dir is not None and run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()  # stopped before it wrote anything: leave no empty folder among the runs
        (status_file.parent / RUN_DIR_FILE).unlink(missing_ok=True)
        logger.info("%s: removed the empty run folder %s", status_file.parent.name, run_dir)
        run_dir = None
    has_model = run_dir is not None and (run_dir / "final_model" / WEIGHTS_FILE).is_file()
    if exit_code == 0 and has_model:
        state = "finished"
    elif exit_code in INTERRUPTED_CODES:
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
    write_experiment_record(status_file.parent.parent.parent, status)
    logger.info("%s: %s (exit code %d) after %.0f s", status_file.parent.name, state, exit_code,
                status["duration_s"])
    return status


def write_experiment_record(results_dir: Path, status: dict) -> Path:
    """experiment_{R}_{A}.json: the original's keys and values (start_time is the real start), then extras."""
    rank, alpha = status["rank_text"], status["alpha_text"]
    record = {
        "experiment_number": status["experiment_number"], "lora_rank": json_number(rank),
        "lora_alpha": json_number(alpha), "learning_rate": status["learning_rate"],
        "start_time": _original_time(status["started_at"]),
        "status": SUCCESS if status["state"] == "finished" else FAILURE,
        "end_time": _original_time(status["ended_at"]) if status.get("ended_at") else None,
        "state": status["state"], "exit_code": status["exit_code"], "run_dir": status["run_dir"],
        "attempts": status["attempts"], "log": status["log"], "lora_type": run_lora_type(status),
    }
    path = experiment_file(results_dir, rank, alpha)
    write_json(path, record)
    return path


def _original_time(iso: str) -> str:
    return datetime.fromisoformat(iso).strftime(TIME_FORMAT)


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
    info = read_json(Path(status["run_dir"]) / "final_model" / "final_model_info.json") or {}
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
        "end_time": datetime.now().strftime(TIME_FORMAT),
        "results_dir": str(results_dir.resolve()), "ranks": [int(r) for r in ranks],
        "alphas": [float(a) for a in alphas], "learning_rate": float(learning_rate),
        "gpus": [g for g in gpus.split(",") if g] or None, "train_args": mask_argv(train_args),
        "stopped_by_signal": stopped, "complete": counts["finished"] == len(runs), "counts": counts, "runs": runs,
        "lora_types": sorted({run["lora_type"] for run in runs if run["lora_type"]}),
    }
    write_json(results_dir / SUMMARY_FILE, summary)
    return summary
