"""A whole run of diffusers' example ``train_text_to_image_lora_sdxl.py`` beside ours (benchmark_train.py
--diffusers_script PATH): same saved model, same images, resolution, rank and steps, the example on its own
defaults otherwise. The example is not part of this project; the user points at their own copy.

Its step times come from its tqdm bar ("Steps: n/N"), read from stderr as it is written and stamped on
arrival; peak RSS of each run from ``os.wait4``."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger("benchmark_train")

STEP_PATTERN = re.compile(rb"Steps:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")
DIFFUSERS_KEY = "diffusers-example"


def launch(command: list[str], env: dict[str, str], step_stamps: bool = False) -> dict:
    """Run ``command`` to exit; return its wall time, peak RSS, exit status, stderr tail and, when asked,
    the arrival time of each new tqdm step count on stderr."""
    launched = time.time()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    stamps: dict[int, float] = {}
    tail = b""
    with process.stderr:
        while chunk := os.read(process.stderr.fileno(), 65536):
            now = time.time()
            tail = (tail + chunk)[-20000:]
            if step_stamps:
                for match in STEP_PATTERN.finditer(tail[-len(chunk) - 200:]):
                    stamps.setdefault(int(match.group(1)), now)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return {"launched": launched, "ended": time.time(), "returncode": process.returncode,
            "peak_rss_bytes": usage.ru_maxrss * 1024, "stderr": tail.decode(errors="replace"),
            "stamps": {step: stamp for step, stamp in stamps.items() if step > 0}}


def failure(result: dict) -> str:
    """A failed launch in one line: the last non-empty line of its stderr, else its exit status."""
    lines = [line for line in re.split(r"[\r\n]", result["stderr"]) if line.strip()]
    return lines[-1] if lines else f"exit status {result['returncode']}"


def write_imagefolder(dataset_dir: Path, folder: Path) -> Path:
    """The benchmark's images (``images/`` + ``captions.json``) as a datasets imagefolder: links to the same
    files and a metadata.jsonl with file_name and text."""
    folder.mkdir(parents=True, exist_ok=True)
    captions = json.loads((Path(dataset_dir) / "captions.json").read_text())
    lines = []
    for name, caption in captions.items():
        link = folder / name
        if not link.exists():
            link.symlink_to((Path(dataset_dir) / "images" / name).resolve())
        lines.append(json.dumps({"file_name": name, "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def step_figures(launched: float, stamps: dict[int, float]) -> dict:
    """Time to first step, first-to-last-step rate and steady rate (median interval) from step stamps."""
    steps = sorted(stamps)
    times = [stamps[step] for step in steps]
    intervals = sorted((b - a) / (n - m) for (m, a), (n, b) in zip(zip(steps, times), zip(steps[1:], times[1:])))
    first_to_last = (steps[-1] - steps[0]) / (times[-1] - times[0]) if len(steps) > 1 else None
    steady = 1 / intervals[len(intervals) // 2] if intervals and intervals[len(intervals) // 2] > 0 else None
    return {"time_to_first_step_s": times[0] - launched, "first_to_last_steps_per_s": first_to_last,
            "steady_steps_per_s": steady, "steps": steps[-1]}


def diffusers_run(config: dict, script: str, steps: int) -> dict:
    """The example, start to exit, on the benchmark's model and images; its figures as ``whole_run``'s."""
    from utils.training.flags import parse_training_args

    rank = parse_training_args([]).lora_rank  # ours (the example's own default is 4): both train the same rank
    output_dir = Path(config["output_dir"]) / "whole_diffusers_example"
    data_dir = write_imagefolder(Path(config["dataset_dir"]), Path(config["output_dir"]) / "imagefolder")
    command = [sys.executable, str(script), "--pretrained_model_name_or_path", config["model_dir"],
               "--train_data_dir", str(data_dir), "--output_dir", str(output_dir),
               "--resolution", str(config["resolution"]), "--train_batch_size", str(config["train_batch_size"]),
               "--max_train_steps", str(steps), "--rank", str(rank),
               "--mixed_precision", config["mixed_precision"], "--seed", "0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_MININTERVAL": "0",
           "TQDM_MINITERS": "1", "OMP_NUM_THREADS": str(config["num_threads"]), "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}
    logger.info("whole run: diffusers' example %s", script)
    result = launch(command, env, step_stamps=True)
    if result["returncode"] != 0 or not result["stamps"]:
        logger.error("diffusers' example failed (exit %d):\n%s", result["returncode"], result["stderr"][-3000:])
        return {"failed": failure(result)}
    return {"wall_s": result["ended"] - result["launched"], "peak_rss_bytes": result["peak_rss_bytes"],
            **step_figures(result["launched"], result["stamps"])}
