"""Which runs of a rank x alpha sweep are still to do: the grid checked, finished runs skipped, an
interrupted run continued in its own run folder; and the trainer flags of those runs checked before any starts."""

from __future__ import annotations

import contextlib
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from utils.core.secrets import mask_argv
from utils.core.layout import STATUS_FILE
from utils.sweep.records import SweepError, experiment_file, read_json, status_folder
from utils.sweep.status import earlier_run_dir, is_finished

logger = logging.getLogger("sweep_runs")


@dataclass(frozen=True)
class PlannedRun:
    """A run of the grid still to do: its values as written on the command line, its status folder, its
    experiment_number and the run folder of an earlier attempt to resume ('' for none)."""

    rank: str
    alpha: str
    folder: Path
    number: int
    resume: str

    @property
    def name(self) -> str:
        return f"r={self.rank} a={self.alpha}"


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


def _check_learning_rate(results_dir: Path, rank: str, alpha: str, learning_rate: str) -> None:
    """experiment_{R}_{A}.json has no learning rate in its name: one results folder holds one learning rate."""
    record = read_json(experiment_file(results_dir, rank, alpha))
    if record and "learning_rate" in record and float(record["learning_rate"]) != float(learning_rate):
        raise SweepError(f"{experiment_file(results_dir, rank, alpha)}: recorded for learning rate "
                         f"{record['learning_rate']}, this sweep uses {learning_rate}; pass another --results_dir")


def check_grid(results_dir: Path, ranks: list[str], alphas: list[str], learning_rate: str) -> None:
    """The grid's values, and that the results folder records no other learning rate; reads, writes nothing."""
    validate_grid(ranks, alphas, learning_rate)
    for rank in ranks:
        for alpha in alphas:
            _check_learning_rate(results_dir, rank, alpha, learning_rate)


def plan_runs(results_dir: Path, ranks: list[str], alphas: list[str], learning_rate: str,
              train_args: list[str]) -> list[PlannedRun]:
    """Every run still to do, in grid order.

    Finished runs are skipped. A run that an earlier attempt left behind continues in that attempt's run
    folder: from its latest resumable checkpoint, or from the start when it stopped before the first.
    """
    check_grid(results_dir, ranks, alphas, learning_rate)
    todo, number = [], 0
    for rank in ranks:
        for alpha in alphas:
            number += 1
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
            earlier = earlier_run_dir(folder, status)
            resume = str(earlier) if earlier and earlier.is_dir() else ""
            todo.append(PlannedRun(rank, alpha, folder, number, resume))
    return todo


def check_trainer_flags(runs: list[tuple[str, str]], learning_rate: str, train_args: list[str]) -> None:
    """The flags of each (rank, alpha) run still to do, checked as train_sdxl_lora.py checks them before it loads
    anything (its parser, ``check_args``, the dataset folder's layout), so that a mistake every run would share
    stops the sweep here with one line instead of failing each run in turn."""
    from utils.data.listing import resolve_type
    from utils.training.checks import check_args

    if {"-h", "--help"} & set(train_args):
        raise SweepError("-h/--help after --: python train_sdxl_lora.py --help lists the trainer's flags")
    parsed = [_parse_trainer_flags(["--lora_rank", rank, "--lora_alpha", alpha, "--learning_rate", learning_rate,
                                    *train_args]) for rank, alpha in runs]
    if parsed:  # the dataset first: without one, nothing else matters
        resolve_type(parsed[0].dataset_type, Path(parsed[0].dataset_dir), parsed[0].dataset_name)
    for args in parsed:
        check_args(args)


def _parse_trainer_flags(argv: list[str]):
    """The trainer's parser on ``argv``; its error (an unknown flag, a bad value) as one SweepError line."""
    from utils.training.flags import parse_training_args

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parse_training_args(argv)
    except SystemExit:
        lines = stderr.getvalue().strip().splitlines() or ["invalid flags"]
        raise SweepError(f"the trainer flags after --: {lines[-1].split('error: ', 1)[-1]}") from None
