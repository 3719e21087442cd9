"""The original run_experiments.sh's record of a run, ``experiment_{R}_{A}.json``, with its Korean status values.

The original wrote ``{experiment_number, lora_rank, lora_alpha, learning_rate, start_time, status}`` with
status "성공" (success) or "실패" (failure); those keys come first and keep their values, and the sweep's own
facts (state, end time, exit code, run folder, attempts, log, adapter type) follow them.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

from utils.core.atomic import write_json
from utils.core.layout import TIMESTAMP_FORMAT, SweepLayout

SUCCESS, FAILURE = "성공", "실패"  # the original's status values


def json_number(text: str) -> int | float:
    """A grid value as the original wrote it into JSON: 4 stays 4, 1e-4 becomes 0.0001."""
    return int(text) if re.fullmatch(r"-?\d+", text) else float(text)


def original_time(iso: str) -> str:
    """An ISO time as the original's start_time / end_time (``%Y-%m-%d %H:%M:%S``)."""
    return datetime.fromisoformat(iso).strftime(TIMESTAMP_FORMAT)


def write_experiment_record(results_dir: Path, status: dict, lora_type: str | None) -> Path:
    """experiment_{R}_{A}.json from a run's status: the original's keys and values (start_time is the real
    start), then the sweep's own."""
    rank, alpha = status["rank_text"], status["alpha_text"]
    record = {
        "experiment_number": status["experiment_number"], "lora_rank": json_number(rank),
        "lora_alpha": json_number(alpha), "learning_rate": status["learning_rate"],
        "start_time": original_time(status["started_at"]),
        "status": SUCCESS if status["state"] == "finished" else FAILURE,
        "end_time": original_time(status["ended_at"]) if status.get("ended_at") else None,
        "state": status["state"], "exit_code": status["exit_code"], "run_dir": status["run_dir"],
        "attempts": status["attempts"], "log": status["log"], "lora_type": lora_type,
    }
    path = SweepLayout(results_dir).record(rank, alpha)
    write_json(path, record)
    return path
