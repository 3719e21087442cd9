"""The runs of a rank x alpha sweep: status files, the plan, the summary, discovery, and their images.

    {sweep_dir}/sweep_summary.json
    {sweep_dir}/r{rank}_a{alpha}_lr{lr}/status.json, train.log, and the trainer's run directory

run_experiments.sh keeps one status JSON per run (state, real start and end times, exit code, the
run directory the trainer made, earlier attempts) through the ``plan``/``status-*``/``summary``
subcommands of utils/sweep_report.py. The inference scripts find finished runs and epoch checkpoints
here and generate every LoRA's images with one pipeline (``generate_series``). Only the standard
library is imported at module level, so the bookkeeping calls start in a fraction of a second.
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

from utils.atomic import write_json

logger = logging.getLogger("sweep_runs")

STATUS_FILE = "status.json"
SUMMARY_FILE = "sweep_summary.json"
WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
CONFIG_FILE = "experiment_config.json"
INTERRUPTED_CODES = {130, 143}  # SIGINT, SIGTERM
SECRET_FLAG_WORDS = ("token", "key", "secret", "password")


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


# ----------------------------------------------------------------------------- sweep plan and status files


def run_folder_name(rank: str, alpha: str, learning_rate: str) -> str:
    return f"r{rank}_a{alpha}_lr{learning_rate}"


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
    return bool(status) and status.get("state") == "finished" and status.get("exit_code") == 0


def plan_runs(sweep_dir: Path, ranks: list[str], alphas: list[str], learning_rate: str,
              train_args: list[str]) -> list[tuple[str, str, Path, bool]]:
    """(rank, alpha, folder, has_earlier_attempt) of every run still to do; finished runs are skipped."""
    validate_grid(ranks, alphas, learning_rate)
    todo = []
    for rank in ranks:
        for alpha in alphas:
            folder = sweep_dir / run_folder_name(rank, alpha, learning_rate)
            status = read_json(folder / STATUS_FILE)
            if is_finished(status):
                if status.get("train_args") != masked(train_args):
                    logger.warning("%s finished earlier with other trainer flags (%s); delete its %s to "
                                   "train it again", folder.name, " ".join(status.get("train_args") or []),
                                   STATUS_FILE)
                logger.info("Skipping %s: finished at %s", folder.name, status.get("ended_at"))
                continue
            todo.append((rank, alpha, folder, status is not None))
    return todo


def start_status(status_file: Path, rank: str, alpha: str, learning_rate: str, gpu: str, log: str,
                 process_group: int | None, train_args: list[str], command: str) -> dict:
    """Write the status of a run that starts now; earlier attempts move into its history."""
    previous = read_json(status_file) or {}
    history = list(previous.get("history", []))
    if previous:
        history.append({key: previous.get(key) for key in ("state", "started_at", "ended_at", "exit_code",
                                                              "run_dir")})
    status = {
        "rank": int(rank), "alpha": float(alpha), "learning_rate": float(learning_rate),
        "state": "running", "started_at": now_iso(), "ended_at": None, "duration_s": None,
        "exit_code": None, "run_dir": None, "gpu": gpu or None, "process_group": process_group,
        "attempts": int(previous.get("attempts", 0)) + 1, "log": log,
        "train_args": masked(train_args), "command": shlex.join(masked(shlex.split(command))), "history": history,
    }
    write_json(status_file, status)
    return status


def find_run_dir(folder: Path) -> Path | None:
    """The trainer's run directory inside a sweep run folder: the one with the newest final model,
    else the one started last (a failed attempt)."""
    runs = [p for p in folder.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file()] if folder.is_dir() else []
    finished = [p for p in runs if (p / "final_model" / WEIGHTS_FILE).is_file()]
    if finished:
        return max(finished, key=lambda p: (p / "final_model" / WEIGHTS_FILE).stat().st_mtime)
    return max(runs, key=lambda p: (p / CONFIG_FILE).stat().st_mtime) if runs else None


def end_status(status_file: Path, exit_code: int) -> dict:
    """Record how a run ended: end time, duration, exit code, state and the run directory it made."""
    status = read_json(status_file)
    if status is None:
        raise SweepError(f"{status_file}: no status to end (the run was never started)")
    run_dir = find_run_dir(status_file.parent)
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
                  duration_s=round((ended - started).total_seconds(), 1),
                  run_dir=str(run_dir.resolve()) if run_dir else None)
    if exit_code == 0 and not has_model:
        status["error"] = "the trainer exited 0 but left no final_model"
    write_json(status_file, status)
    logger.info("%s: %s (exit code %d) after %.0f s", status_file.parent.name, state, exit_code,
                status["duration_s"])
    return status


def _final_eval_loss(status: dict) -> float | None:
    if not status.get("run_dir"):
        return None
    info = read_json(Path(status["run_dir"]) / "final_model" / "final_model_info.json") or {}
    return info.get("final_eval_loss")


def write_summary(sweep_dir: Path, ranks: list[str], alphas: list[str], learning_rate: str, gpus: str,
                  train_args: list[str], stopped: bool) -> dict:
    """sweep_summary.json: every run of the grid with its status (pending when never started)."""
    runs, counts = [], {"finished": 0, "failed": 0, "interrupted": 0, "running": 0, "pending": 0}
    for rank in ranks:
        for alpha in alphas:
            folder = sweep_dir / run_folder_name(rank, alpha, learning_rate)
            status = read_json(folder / STATUS_FILE) or {"rank": int(rank), "alpha": float(alpha),
                                                         "learning_rate": float(learning_rate), "state": "pending"}
            entry = {key: status.get(key) for key in ("rank", "alpha", "learning_rate", "state", "exit_code",
                                                      "started_at", "ended_at", "duration_s", "attempts",
                                                      "gpu", "run_dir")}
            entry.update(folder=folder.name, final_eval_loss=_final_eval_loss(status))
            counts[entry["state"]] = counts.get(entry["state"], 0) + 1
            runs.append(entry)
    summary = {
        "sweep_dir": str(sweep_dir.resolve()), "ranks": [int(r) for r in ranks],
        "alphas": [float(a) for a in alphas], "learning_rate": float(learning_rate),
        "gpus": [g for g in gpus.split(",") if g] or None, "train_args": masked(train_args),
        "updated_at": now_iso(), "stopped_by_signal": stopped, "complete": counts["finished"] == len(runs),
        "counts": counts, "runs": runs,
    }
    write_json(sweep_dir / SUMMARY_FILE, summary)
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


def _candidate_run_dirs(root: Path) -> list[Path]:
    """Run directories at most two levels below ``root`` (a sweep's r*_a*_lr*/<run>/, or <output_dir>/<run>/)."""
    found = [root] if (root / CONFIG_FILE).is_file() else []
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        status = read_json(child / STATUS_FILE)
        if status is not None:  # a sweep folder: its status names the run, stale attempts are ignored
            if is_finished(status) and status.get("run_dir"):
                found.append(Path(status["run_dir"]))
            continue
        if (child / CONFIG_FILE).is_file():
            found.append(child)
        else:
            found += sorted(p for p in child.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file())
    return found


def find_runs(root: Path, model: str = "final_model") -> list[RunInfo]:
    """Finished runs under ``root`` that have ``model``/ (final_model, best_model), sorted by rank, alpha, lr.

    Two runs with the same rank, alpha and learning rate: the newer (by name, which starts with
    the start time) is kept and the other named in a warning.
    """
    if not root.is_dir():
        raise SweepError(f"{root}: folder not found")
    by_key: dict[tuple, RunInfo] = {}
    for run_dir in _candidate_run_dirs(root):
        if not (run_dir / model / WEIGHTS_FILE).is_file():
            continue
        run = load_run(run_dir)
        key = (run.rank, run.alpha, run.learning_rate)
        if key in by_key:
            older, newer = sorted([by_key[key], run], key=lambda r: r.run_dir.name)
            logger.warning("Two runs for %s: using %s, ignoring %s", run.label, newer.run_dir, older.run_dir)
            run = newer
        by_key[key] = run
    return [by_key[key] for key in sorted(by_key)]


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
    if sorted(metas) != list(range(len(metas))):
        raise SweepError(f"{folder}: metadata files of {stamp} are incomplete (prompts {sorted(metas)})")
    ordered = [metas[k] for k in range(len(metas))]
    lora = ordered[0].get("lora_model_path")
    return Generation(
        folder=folder, lora_path=Path(lora) if lora else None, prompts=[m["prompt"] for m in ordered],
        seeds=[m["seeds"] for m in ordered], base=[[folder / n for n in m.get("base_images", [])] for m in ordered],
        lora=[[folder / n for n in m.get("lora_images", [])] for m in ordered],
        settings=ordered[0].get("settings"), base_model=ordered[0].get("base_model"),
    )


def lora_generations(inference_dir: Path) -> list[Generation]:
    """Every subfolder of ``inference_dir`` that holds LoRA images, checked to share prompts and seeds."""
    if not inference_dir.is_dir():
        raise SweepError(f"{inference_dir}: folder not found")
    found = []
    for folder in sorted(p for p in inference_dir.iterdir() if p.is_dir()):
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

RESERVED_INFERENCE_FLAGS = ("--output_dir", "--lora_model_path", "--base_results_dir")


def _already_done(folder: Path, lora: str, args: argparse.Namespace, settings: dict) -> bool:
    """True when ``folder`` holds this LoRA's images for exactly these prompts, seeds and settings."""
    from utils.comparison import seeds_for

    done = read_generation(folder)
    return bool(done and done.lora_path == Path(lora) and done.prompts == args.prompts and all(done.lora)
                and done.seeds == [seeds_for(k, args.num_images, args.seed) for k in range(len(args.prompts))]
                and done.settings == settings and done.base_model == args.pretrained_model_name_or_path)


def generate_series(loras: list[tuple[str, str]], output_dir: Path, inference_argv: list[str],
                    skip_existing: bool = False) -> list[str]:
    """Base-vs-LoRA images for every (label, LoRA) into ``output_dir/label/``, with one pipeline in memory.

    ``inference_argv`` are inference_sdxl_ghibli.py flags (model, prompts, size, steps, seed, ...), read by
    that script's own parser, so every LoRA gets the same prompts, seeds and settings. The base images are
    made once, in the first LoRA's folder, and reused from there by every later one (the
    --base_results_dir mechanism); each LoRA is loaded, used and deleted again before the next.
    Returns the labels that failed.
    """
    from dataclasses import asdict

    import torch
    from tqdm.auto import tqdm

    import inference_sdxl_ghibli as inference
    from utils.comparison import ADAPTER_NAME, GenerationSettings, pick_device, resolve_lora_source, run_comparison
    from utils.sdxl import load_pipeline

    for arg in inference_argv:
        if arg.split("=", 1)[0] in RESERVED_INFERENCE_FLAGS:
            raise SweepError(f"{arg.split('=', 1)[0]}: set by the sweep scripts, not a pass-through flag")
    args = inference.parse_args(inference_argv)
    for _, lora in loras:
        resolve_lora_source(lora)  # a missing LoRA fails now, not after loading SDXL
    device = pick_device(args.device)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipe = load_pipeline(args.pretrained_model_name_or_path, args.revision, args.variant, dtype).to(device)
    settings = GenerationSettings(args.negative_prompt, args.num_inference_steps, args.guidance_scale,
                                  args.height, args.width)
    base_dir, failed = output_dir / loras[0][0], []
    for label, lora in tqdm(loras, desc="LoRAs"):
        folder = output_dir / label
        if skip_existing and _already_done(folder, lora, args, asdict(settings)):
            logger.info("Skipping %s: its images are already in %s", label, folder)
            continue
        try:
            run_comparison(pipe, args.prompts, lora, args.lora_scale, settings, args.num_images, args.seed, folder,
                           args.pretrained_model_name_or_path, run_base=True, base_results_dir=base_dir,
                           create_grid=True)
        except Exception as error:  # noqa: BLE001 - one bad LoRA must not end the series; it is reported
            logger.error("%s (%s): %s", label, lora, error)
            failed.append(label)
        finally:
            if ADAPTER_NAME in {name for names in pipe.get_list_adapters().values() for name in names}:
                pipe.delete_adapters(ADAPTER_NAME)
    return failed
