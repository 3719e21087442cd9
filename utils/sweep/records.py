"""The runs of a rank x alpha sweep: bookkeeping, the plan, the summary, discovery, and their images.

run_experiments.sh trains every run into the trainer's own folder, ``{output_dir}/{ts}_{type}_r{R}_a{A}_lr{LR}/``
(default output_ghibli), and keeps its bookkeeping under ``{results_dir}`` (default experiment_results):

    {results_dir}/experiment_{R}_{A}.json   the original's record of a run (experiment_number, lora_rank,
                                            lora_alpha, learning_rate, start_time, status "성공"/"실패")
                                            plus state, end_time, exit_code, run_dir
    {results_dir}/summary.json              the original's summary (total_experiments, start_time, end_time)
                                            plus the state of every run
    {results_dir}/runs/r{R}_a{A}_lr{LR}/    status.json (state, times, exit code, the run folder the trainer
                                            made, earlier attempts) and train.log (the trainer's output)
    {results_dir}/loss_curves.png, .sweep.lock

through the ``plan``/``status-*``/``summary`` subcommands of utils/sweep_report.py. The inference scripts
find finished runs and epoch checkpoints and generate every LoRA's images with one pipeline
(``generate_series``). Only the standard library is imported at module level, so the bookkeeping calls
start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shlex
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from utils.core.atomic import write_json

logger = logging.getLogger("sweep_runs")

STATUS_FILE = "status.json"
SUMMARY_FILE = "summary.json"
LOG_FILE = "train.log"
WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
CONFIG_FILE = "experiment_config.json"
INTERRUPTED_CODES = {130, 143}  # SIGINT, SIGTERM
SECRET_FLAG_WORDS = ("token", "key", "secret", "password")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"  # the original's start_time / end_time
SUCCESS, FAILURE = "성공", "실패"  # the original's status values
RUN_DIR_LINE = re.compile(r"Run directory: (.+?)\s*$")  # the trainer's log line naming its run folder


class SweepError(ValueError):
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


def masked(args: list[str]) -> list[str]:
    """Command-line arguments with the values of secret-looking flags replaced by '***'."""
    shown, hide_next = [], False
    for arg in args:
        flag = arg.split("=", 1)[0].lstrip("-").lower() if arg.startswith("-") else ""
        secret = bool(flag) and any(word in flag for word in SECRET_FLAG_WORDS)
        if hide_next:
            shown.append("***")
        elif secret and "=" in arg:
            shown.append(arg.split("=", 1)[0] + "=***")
        else:
            shown.append(arg)
        hide_next = secret and "=" not in arg and not hide_next
    return shown


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


def has_resumable_state(run_dir: Path) -> bool:
    return any((run_dir / "checkpoints").glob("*/training_state.json"))


def plan_runs(results_dir: Path, ranks: list[str], alphas: list[str], learning_rate: str,
              train_args: list[str]) -> list[tuple[str, str, Path, int, str]]:
    """(rank, alpha, status folder, experiment number, run folder to resume or '') of every run still to do.

    Finished runs are skipped. A run that an earlier attempt left with a resumable checkpoint continues
    in that attempt's run folder.
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
                if status.get("train_args") != masked(train_args):
                    logger.warning("%s finished earlier with other trainer flags (%s); delete %s to "
                                   "train it again", folder.name, " ".join(status.get("train_args") or []),
                                   folder / STATUS_FILE)
                logger.info("Skipping %s: finished at %s in %s", folder.name, status.get("ended_at"),
                            status.get("run_dir"))
                continue
            earlier = _earlier_run_dir(status) if status else None
            resume = str(earlier) if earlier and has_resumable_state(earlier) else ""
            todo.append((rank, alpha, folder, number, resume))
    return todo


def _earlier_run_dir(status: dict) -> Path | None:
    if status.get("run_dir"):
        return Path(status["run_dir"])
    return run_dir_from_log(Path(status.get("log") or ""), int(status.get("log_offset") or 0))


def run_dir_from_log(log: Path, offset: int = 0) -> Path | None:
    """The run folder the trainer named in its log (the last 'Run directory:' line after ``offset``)."""
    try:
        with open(log, "rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", errors="replace")
    except (FileNotFoundError, IsADirectoryError):
        return None
    found = [match.group(1) for match in map(RUN_DIR_LINE.search, text.splitlines()) if match]
    return Path(found[-1]).resolve() if found else None


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
        "train_args": masked(train_args), "command": shlex.join(masked(shlex.split(command))), "history": history,
    }
    write_json(status_file, status)
    return status


def _new_run_dir(status: dict) -> Path | None:
    """The run folder this attempt trained in: named in its log, else the newest folder in the output
    folder whose config has this rank, alpha and learning rate and was written after the start."""
    found = run_dir_from_log(Path(status["log"]), int(status.get("log_offset") or 0))
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
    run_dir = _new_run_dir(status)
    if run_dir is not None and run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()  # stopped before it wrote anything: leave no empty folder among the runs
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
        "attempts": status["attempts"], "log": status["log"],
    }
    path = experiment_file(results_dir, rank, alpha)
    write_json(path, record)
    return path


def _original_time(iso: str) -> str:
    return datetime.fromisoformat(iso).strftime(TIME_FORMAT)


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
                     final_eval_loss=_final_eval_loss(status))
        counts[entry["state"]] = counts.get(entry["state"], 0) + 1
        runs.append(entry)
    summary = {
        "total_experiments": len(runs), "start_time": start_time,
        "end_time": datetime.now().strftime(TIME_FORMAT),
        "results_dir": str(results_dir.resolve()), "ranks": [int(r) for r in ranks],
        "alphas": [float(a) for a in alphas], "learning_rate": float(learning_rate),
        "gpus": [g for g in gpus.split(",") if g] or None, "train_args": masked(train_args),
        "stopped_by_signal": stopped, "complete": counts["finished"] == len(runs), "counts": counts, "runs": runs,
    }
    write_json(results_dir / SUMMARY_FILE, summary)
    return summary


# ----------------------------------------------------------------------------- run discovery


@dataclass(frozen=True)
class RunInfo:
    run_dir: Path
    rank: int
    alpha: float
    learning_rate: float
    config: dict = field(compare=False, repr=False)

    @property
    def label(self) -> str:
        return f"r{self.rank}_a{self.alpha:g}_lr{self.learning_rate:g}"


def load_run(run_dir: Path) -> RunInfo:
    config = read_json(run_dir / CONFIG_FILE)
    if config is None:
        raise SweepError(f"{run_dir}: not a training run (no {CONFIG_FILE})")
    try:
        return RunInfo(run_dir, int(config["lora_rank"]), float(config["lora_alpha"]),
                       float(config["learning_rate"]), config)
    except (KeyError, TypeError, ValueError) as error:
        raise SweepError(f"{run_dir / CONFIG_FILE}: missing or bad field {error}") from None


def _run_dirs(root: Path) -> list[Path]:
    """``root`` itself when it is a training run, else its subfolders that are (``ls -d root/*/``), by name."""
    if not root.is_dir():
        raise SweepError(f"{root}: folder not found")
    if (root / CONFIG_FILE).is_file():
        return [root]
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / CONFIG_FILE).is_file())


def find_runs(root: Path, model: str = "final_model") -> list[RunInfo]:
    """Every run folder in ``root`` that has ``model``/ (final_model, best_model), in name (= start time) order."""
    return [load_run(run_dir) for run_dir in _run_dirs(root) if (run_dir / model / WEIGHTS_FILE).is_file()]


def newest_checkpoint_run(root: Path) -> Path:
    """The run folder in ``root`` whose newest checkpoint_epoch_N was written last."""
    newest: tuple[float, Path] | None = None
    for run_dir in _run_dirs(root):
        times = [(folder / WEIGHTS_FILE).stat().st_mtime for _, folder in epoch_checkpoints(run_dir)]
        if times and (newest is None or max(times) > newest[0]):
            newest = (max(times), run_dir)
    if newest is None:
        raise SweepError(f"{root}: no run with checkpoint_epoch_N folders (train with --save_steps N, or pass "
                         f"--run_dir)")
    logger.info("No --run_dir: using the newest run with epoch checkpoints, %s", newest[1])
    return newest[1]


def resolve_run_dir(path: Path) -> Path:
    """A run directory given itself, or a sweep run folder (r4_a8_lr1e-4/) holding one."""
    if (path / CONFIG_FILE).is_file():
        return path
    status = read_json(path / STATUS_FILE)
    if status and status.get("run_dir"):
        return Path(status["run_dir"])
    if not path.is_dir():
        raise SweepError(f"{path}: folder not found")
    runs = sorted(p for p in path.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file())
    if len(runs) != 1:
        raise SweepError(f"{path}: expected one training run (a folder with {CONFIG_FILE}), found {len(runs)}")
    return runs[0]


def epoch_checkpoints(run_dir: Path, include_final: bool = False) -> list[tuple[str, Path]]:
    """(label, folder) of the run's checkpoint_epoch_N folders in epoch order, then final_model if asked."""
    found = []
    for folder in run_dir.glob("checkpoint_epoch_*"):
        number = folder.name.rsplit("_", 1)[-1]
        if number.isdigit() and (folder / WEIGHTS_FILE).is_file():
            found.append((int(number), f"epoch_{number}", folder))
    series = [(label, folder) for _, label, folder in sorted(found)]
    if include_final and (run_dir / "final_model" / WEIGHTS_FILE).is_file():
        series.append(("final", run_dir / "final_model"))
    return series


# ----------------------------------------------------------------------------- reading inference output


@dataclass
class Generation:
    """What one inference_sdxl_ghibli.py call left in its folder (its newest call there)."""

    folder: Path
    lora_path: Path | None
    prompts: list[str]
    seeds: list[list[int]]
    base: list[list[Path]]
    lora: list[list[Path]]
    settings: dict | None = None
    base_model: str | None = None


def read_generation(folder: Path) -> Generation | None:
    """The newest set of metadata_prompt{k}_{ts}.json in ``folder``, or None when there is none."""
    by_stamp: dict[str, dict[int, dict]] = {}
    for path in folder.glob("metadata_prompt*_*.json"):
        match = re.fullmatch(r"metadata_prompt(\d+)_(.+)\.json", path.name)
        if match:
            by_stamp.setdefault(match.group(2), {})[int(match.group(1))] = read_json(path)
    if not by_stamp:
        return None
    stamp = max(by_stamp)
    metas = by_stamp[stamp]
    if sorted(metas) != list(range(1, len(metas) + 1)):
        raise SweepError(f"{folder}: metadata files of {stamp} are incomplete (prompts {sorted(metas)})")
    ordered = [metas[k] for k in sorted(metas)]
    lora = ordered[0].get("lora_model_path")
    return Generation(
        folder=folder, lora_path=Path(lora) if lora else None, prompts=[m["prompt"] for m in ordered],
        seeds=[m.get("seeds") or [] for m in ordered],
        base=[[folder / n for n in m.get("base_images", [])] for m in ordered],
        lora=[[folder / n for n in m.get("lora_images", [])] for m in ordered],
        settings=ordered[0].get("settings"), base_model=ordered[0].get("base_model"),
    )


def lora_generations(inference_dir: Path, folders: list[str] | None = None) -> list[Generation]:
    """Every subfolder of ``inference_dir`` (or those named in ``folders``) that holds LoRA images,
    checked to share prompts and seeds."""
    if not inference_dir.is_dir():
        raise SweepError(f"{inference_dir}: folder not found")
    found = []
    chosen = [inference_dir / name for name in folders] if folders else inference_dir.iterdir()
    for folder in sorted(p for p in chosen if p.is_dir()):
        generation = read_generation(folder)
        if generation and generation.lora_path and all(generation.lora):
            found.append(generation)
    if not found:
        raise SweepError(f"{inference_dir}: no LoRA images found (no metadata_prompt*.json with lora_images)")
    reference = found[0]
    for generation in found[1:]:
        if generation.prompts != reference.prompts or generation.seeds != reference.seeds:
            raise SweepError(f"{generation.folder}: generated with other prompts or seeds than "
                             f"{reference.folder}; compare runs only on the same prompts and seeds")
    return found


def base_images(generations: list[Generation]) -> list[list[Path]]:
    for generation in generations:
        if all(generation.base):
            return generation.base
    raise SweepError(f"{generations[0].folder.parent}: no base images saved (run with --run_base_inference)")


# ----------------------------------------------------------------------------- generation

BASE_RESULTS_FOLDER = "base_model_results"
RESERVED_INFERENCE_FLAGS = ("--output_dir", "--lora_model_path", "--base_results_dir")


def _already_done(folder: Path, lora: str, args: argparse.Namespace, settings: dict) -> bool:
    """True when ``folder`` holds this LoRA's images for exactly these prompts, seeds and settings."""
    from utils.inference.generation import seeds_for

    done = read_generation(folder)
    return bool(done and done.lora_path == Path(lora) and done.prompts == args.prompts and all(done.lora)
                and done.seeds == [seeds_for(k, args.num_images, args.seed) for k in range(len(args.prompts))]
                and done.settings == settings and done.base_model == args.pretrained_model_name_or_path)


def generate_series(loras: list[tuple[str, str]], output_dir: Path, inference_argv: list[str],
                    skip_existing: bool = False, base_dir: Path | None = None) -> list[str]:
    """Base-vs-LoRA images for every (label, LoRA) into ``output_dir/label/``, with one pipeline in memory.

    ``inference_argv`` are inference_sdxl_ghibli.py flags (model, prompts, size, steps, seed, ...), read by
    that script's own parser, so every LoRA gets the same prompts, seeds and settings. The base images are
    made once, into ``base_dir`` (default: ``output_dir/base_model_results``) unless it already holds them for these
    settings, and every LoRA's folder reuses them (the --base_results_dir mechanism); each LoRA is loaded,
    used and deleted again before the next. Returns the labels that failed.
    """
    from dataclasses import asdict

    import torch
    from tqdm.auto import tqdm

    import inference_sdxl_ghibli as inference
    from utils.inference.generation import (ADAPTER_NAME, GenerationSettings, base_images_ready, generator_device, pick_device, resolve_lora_source, run_comparison)
    from utils.core.sdxl import load_pipeline

    for arg in inference_argv:
        if arg.split("=", 1)[0] in RESERVED_INFERENCE_FLAGS:
            raise SweepError(f"{arg.split('=', 1)[0]}: set by the sweep scripts, not a pass-through flag")
    args = inference.parse_args(inference_argv)
    for _, lora in loras:
        resolve_lora_source(lora)  # a missing LoRA fails now, not after loading SDXL
    settings = GenerationSettings(args.negative_prompt, args.num_inference_steps, args.guidance_scale,
                                  args.height, args.width)
    model = args.pretrained_model_name_or_path
    base_dir = base_dir or output_dir / BASE_RESULTS_FOLDER
    todo = []
    for label, lora in loras:
        if skip_existing and _already_done(output_dir / label, lora, args, asdict(settings)):
            logger.info("Skipping %s: its images are already in %s", label, output_dir / label)
        else:
            todo.append((label, lora))
    if not todo:
        return []
    device = pick_device(args.device)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipe = load_pipeline(model, args.revision, args.variant, dtype).to(device)
    if not base_images_ready(base_dir, args.prompts, args.num_images, args.seed, settings, model,
                             generator_device(pipe)):
        logger.info("Base images into %s", base_dir)
        run_comparison(pipe, args.prompts, None, args.lora_scale, settings, args.num_images, args.seed, base_dir,
                       model, run_base=True, base_results_dir=None, create_grid=False)
    failed = []
    for label, lora in tqdm(todo, desc="LoRAs"):
        try:
            run_comparison(pipe, args.prompts, lora, args.lora_scale, settings, args.num_images, args.seed,
                           output_dir / label, model, run_base=True, base_results_dir=base_dir, create_grid=True)
        except Exception as error:  # noqa: BLE001 - one bad LoRA must not end the series; it is reported
            logger.error("%s (%s): %s", label, lora, error)
            failed.append(label)
        finally:
            if ADAPTER_NAME in {name for names in pipe.get_list_adapters().values() for name in names}:
                pipe.delete_adapters(ADAPTER_NAME)
    return failed
