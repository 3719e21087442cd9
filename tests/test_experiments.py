"""Rank x alpha sweeps: the original's folders and records, interrupt and resume, GPU slots, the grid, the
epoch strip, CLIP metrics and the verdict.

The scripts run as the original's user runs them: in a working folder, with no flags but the tiny
model's (after --). run_experiments.sh trains rank 4 x alphas 4, 8 into output_ghibli/ (stopped with
SIGTERM after its first run, then restarted, then run once more to show it skips finished runs), then
rank 2 is added to the same records; run_inference_experiments.sh and run_checkpoint_inference.sh read
what it left.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT

PROMPTS = ["a village in ghibli style", "a cat on a roof"]
IMAGE_SIZE = 64
WEIGHTS = "pytorch_lora_weights.safetensors"
TRAIN_FLAGS = ["--resolution", "64", "--train_batch_size", "2", "--num_train_epochs", "2", "--save_steps", "1",
               "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--report_to", "none",
               "--mixed_precision", "no", "--no-gradient_checkpointing"]
INFERENCE_FLAGS = ["--prompts", *PROMPTS, "--num_images", "2", "--height", str(IMAGE_SIZE), "--width",
                   str(IMAGE_SIZE), "--num_inference_steps", "2"]
ORIGINAL_RECORD_KEYS = ["experiment_number", "lora_rank", "lora_alpha", "learning_rate", "start_time", "status"]
TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


# One thread per process: on a shared 2-core machine, torch's thread pools oversubscribe the cores and
# a 6-second tiny training can take ten times as long.
ENV = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}


def bash(script: str, *args: str, env: dict | None = None, timeout: int = 300,
         cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**ENV, **(env or {})})


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (zombies have an empty command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def read_status(work: Path, rank: str, alpha: str, lr: str = "1e-4") -> dict | None:
    path = work / "experiment_results" / "runs" / f"r{rank}_a{alpha}_lr{lr}" / "status.json"
    return json.loads(path.read_text()) if path.is_file() else None


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def find_tile(grid: np.ndarray, tile: np.ndarray) -> tuple[int, int]:
    """(y, x) of the top-left corner where ``tile`` sits in ``grid``."""
    height, width = tile.shape[:2]
    ys, xs = np.nonzero(np.all(grid[: grid.shape[0] - height + 1, : grid.shape[1] - width + 1] == tile[0, 0], -1))
    for y, x in zip(ys, xs):
        if np.array_equal(grid[y:y + height, x:x + width], tile):
            return int(y), int(x)
    raise AssertionError("tile not found in grid")


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def run_folders(work: Path) -> list[Path]:
    """What the original's user sees: ``ls -d output_ghibli/*/``."""
    return sorted(p for p in (work / "output_ghibli").iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from utils.make_tiny_clip import save_tiny_clip
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_clip")


@pytest.fixture(scope="module")
def sweep(tiny_model_dir, tmp_path_factory) -> dict:
    """rank 4 x alphas 4, 8 with no sweep flags: stopped by SIGTERM during the second run, rerun, rerun again;
    then ranks 2 4 x alphas 4 8 into the same records (only rank 2 trains)."""
    from utils.make_tiny_sdxl import make_synthetic_dataset

    work = tmp_path_factory.mktemp("sweep")
    dataset = make_synthetic_dataset(work / "data", num_images=4)
    tail = ["--", "--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_dir", str(dataset),
            *TRAIN_FLAGS]
    args = ["--ranks", "4", "--alphas", "4 8", *tail]
    first, second = ("4", "4"), ("4", "8")
    output = work / "first_attempt.log"
    with open(output, "w") as log:
        process = subprocess.Popen(["bash", str(ROOT / "run_experiments.sh"), *args], cwd=work, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True, env=ENV)
    try:
        wait_for(lambda: (read_status(work, *first) or {}).get("state") == "finished", 240, "the first run")
        second_log = work / "experiment_results" / "runs" / "r4_a8_lr1e-4" / "train.log"
        wait_for(lambda: second_log.is_file() and "Run directory:" in second_log.read_text(), 120,
                 "the second run's folder")
        process.send_signal(signal.SIGTERM)  # to the script only: its trap must stop the training
        process.wait(timeout=60)
        left_running = processes_mentioning(str(dataset))
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        for pid in processes_mentioning(str(dataset)):
            os.kill(pid, signal.SIGKILL)
    record = {
        "work": work, "dataset": dataset, "stopped_code": process.returncode, "stopped_output": output.read_text(),
        "left_running": left_running, "after_stop": {ra: read_status(work, *ra) for ra in (first, second)},
        "summary_after_stop": json.loads((work / "experiment_results" / "summary.json").read_text()),
    }
    record["rerun"] = bash("run_experiments.sh", *args, cwd=work)
    record["records_after_rerun"] = {ra: json.loads((work / "experiment_results" / f"experiment_{ra[0]}_{ra[1]}.json")
                                                    .read_text()) for ra in (first, second)}
    record["folders_after_rerun"] = run_folders(work)
    record["third"] = bash("run_experiments.sh", *args, cwd=work)
    record["folders_after_third"] = run_folders(work)
    record["grown"] = bash("run_experiments.sh", "--ranks", "2 4", "--alphas", "4 8", *tail, cwd=work)
    return record


@pytest.fixture(scope="module")
def sweep_inference(sweep, tiny_model_dir, tiny_clip_dir) -> Path:
    """run_inference_experiments.sh with no flags but the model's, then again for the CLIP metrics."""
    work = sweep["work"]
    plain = bash("run_inference_experiments.sh", "--", "--pretrained_model_name_or_path", str(tiny_model_dir),
                 *INFERENCE_FLAGS, cwd=work, env={"HF_HUB_OFFLINE": "1"})
    assert plain.returncode == 0, plain.stdout[-2000:] + plain.stderr[-4000:]
    out = work / "output_visualization_additional_2"
    sweep["inference_plain"] = plain
    sweep["inference_plain_files"] = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    metrics = bash("run_inference_experiments.sh", "--skip_existing", "--clip_model", str(tiny_clip_dir), "--",
                   "--pretrained_model_name_or_path", str(tiny_model_dir), *INFERENCE_FLAGS, cwd=work)
    assert metrics.returncode == 0, metrics.stdout[-2000:] + metrics.stderr[-4000:]
    sweep["inference_metrics"] = metrics
    return out


# ----------------------------------------------------------------------------- the sweep


def test_sweep_trains_into_output_ghibli_with_the_originals_records(sweep):
    work = sweep["work"]
    assert sweep["rerun"].returncode == 0, sweep["rerun"].stderr[-3000:]
    folders = sweep["folders_after_rerun"]
    assert len(folders) == 2, [p.name for p in folders]  # the interrupted run continued in its own folder
    for folder in folders:
        assert re.fullmatch(r"\d{8}_\d{6}_ghibli_r4_a(4|8)\.0_lr0\.0001(_\d+)?", folder.name), folder.name
        assert (folder / "final_model" / WEIGHTS).is_file()
    records = sweep["records_after_rerun"]
    for number, (ra, record) in enumerate(records.items(), start=1):
        assert list(record)[:6] == ORIGINAL_RECORD_KEYS
        assert record["experiment_number"] == number and record["lora_rank"] == 4
        assert record["lora_alpha"] == int(ra[1]) and record["learning_rate"] == 1e-4
        assert record["status"] == "성공" and TIME.fullmatch(record["start_time"])
        assert record["start_time"] <= record["end_time"]
        assert Path(record["run_dir"]) in [p.resolve() for p in folders]
    summary = json.loads((work / "experiment_results" / "summary.json").read_text())
    assert list(summary)[:3] == ["total_experiments", "start_time", "end_time"]
    assert TIME.fullmatch(summary["start_time"]) and summary["start_time"] <= summary["end_time"]
    # Nothing of the sweep's own bookkeeping sits among the run folders.
    assert sorted(p.name for p in (work / "experiment_results").iterdir()) == [
        ".sweep.lock", "experiment_2_4.json", "experiment_2_8.json", "experiment_4_4.json", "experiment_4_8.json",
        "loss_curves.png", "runs", "summary.json"]


def test_sweep_records_its_start_before_the_runs(sweep):
    summary = sweep["summary_after_stop"]
    first = sweep["after_stop"][("4", "4")]
    assert summary["total_experiments"] == 2 and summary["stopped_by_signal"] is True
    started = time.mktime(time.strptime(summary["start_time"], "%Y-%m-%d %H:%M:%S"))
    from datetime import datetime
    assert started <= datetime.fromisoformat(first["started_at"]).timestamp()


def test_sweep_stops_cleanly_and_resumes_in_the_same_run_folder(sweep):
    work, after_stop = sweep["work"], sweep["after_stop"]
    first, second = ("4", "4"), ("4", "8")
    assert sweep["stopped_code"] == 143, sweep["stopped_output"][-3000:]
    assert sweep["left_running"] == [], "a training outlived the stopped sweep"
    assert after_stop[first]["state"] == "finished" and after_stop[first]["exit_code"] == 0
    assert after_stop[second]["state"] == "interrupted" and after_stop[second]["exit_code"] == 143
    resumed = read_status(work, *second)
    assert resumed["attempts"] == 2 and resumed["history"][0]["state"] == "interrupted"
    if after_stop[second]["run_dir"]:  # stopped while training: it saved a checkpoint and continues there
        assert resumed["run_dir"] == after_stop[second]["run_dir"], "resumed in the interrupted run's folder"
        assert "--resume_from_checkpoint" in resumed["command"]
    else:  # stopped while loading: its empty run folder was removed, the rerun trained from the start
        assert "--resume_from_checkpoint" not in resumed["command"]
    with open(Path(resumed["run_dir"]) / "experiment_config.json") as handle:
        assert json.load(handle)["lora_alpha"] == 8.0
    # The interrupted attempt's record said so; the rerun's says success.
    assert sweep["records_after_rerun"][second]["status"] == "성공"


def test_a_rerun_skips_finished_runs(sweep):
    third, work = sweep["third"], sweep["work"]
    assert third.returncode == 0, third.stderr[-3000:]
    assert "0 run(s) to do" in third.stderr and third.stderr.count("Skipping r4_a") == 2
    assert sweep["folders_after_third"] == sweep["folders_after_rerun"]
    grown = sweep["grown"]
    assert grown.returncode == 0, grown.stderr[-3000:]
    assert "2 run(s) to do" in grown.stderr
    assert len(run_folders(work)) == 4
    numbers = {ra: json.loads((work / "experiment_results" / f"experiment_{ra}.json").read_text())["experiment_number"]
               for ra in ("2_4", "2_8")}
    assert numbers == {"2_4": 1, "2_8": 2}
    for rank in ("2", "4"):
        for alpha in ("4", "8"):
            status = read_status(work, rank, alpha)
            run_dir = Path(status["run_dir"])
            from utils.sweep_report import read_loss_log
            steps, losses = read_loss_log(run_dir)
            assert steps == [1, 2, 3, 4] and all(np.isfinite(losses))


def test_a_results_folder_holds_one_learning_rate(sweep):
    result = bash("run_experiments.sh", "--ranks", "4", "--alphas", "4", "--lr", "1e-3", cwd=sweep["work"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: experiment_results/experiment_4_4.json: "
                                                             "recorded for learning rate 0.0001")


def test_runs_spread_over_gpus_one_at_a_time(tmp_path):
    """Scheduling only: a stand-in trainer records the GPU it was given and when it ran."""
    stub = tmp_path / "stub_trainer.py"
    stub.write_text(
        "import argparse, json, os, time, pathlib\n"
        "p = argparse.ArgumentParser(); [p.add_argument(f) for f in ('--output_dir', '--lora_rank', "
        "'--lora_alpha', '--learning_rate')]\n"
        "a, _ = p.parse_known_args(); start = time.time()\n"
        "run = pathlib.Path(a.output_dir) / f'stub_r{a.lora_rank}_a{a.lora_alpha}'; run.mkdir(parents=True)\n"
        "print(f'Run directory: {run}', flush=True); time.sleep(1.0)\n"
        "(run / 'final_model').mkdir()\n"
        "(run / 'final_model' / 'pytorch_lora_weights.safetensors').write_bytes(b'')\n"
        "(run / 'experiment_config.json').write_text(json.dumps({'lora_rank': int(a.lora_rank), "
        "'lora_alpha': float(a.lora_alpha), 'learning_rate': float(a.learning_rate)}))\n"
        "(run / 'ran.json').write_text(json.dumps({'gpu': "
        "os.environ.get('CUDA_VISIBLE_DEVICES'), 'start': start, 'end': time.time()}))\n")
    result = bash("run_experiments.sh", "--ranks", "4 8 16", "--alphas", "4", "--gpus", "0,1",
                  env={"TRAIN_SCRIPT": str(stub)}, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ran = [json.loads(p.read_text()) for p in sorted((tmp_path / "output_ghibli").glob("*/ran.json"))]
    assert len(ran) == 3 and {r["gpu"] for r in ran} == {"0", "1"}
    for i, a in enumerate(ran):
        for b in ran[i + 1:]:
            overlap = a["start"] < b["end"] and b["start"] < a["end"]
            assert not (overlap and a["gpu"] == b["gpu"]), "two runs shared a GPU"
    assert any(a["start"] < b["end"] and b["start"] < a["end"] for i, a in enumerate(ran) for b in ran[i + 1:])
    statuses = [json.loads(p.read_text()) for p in (tmp_path / "experiment_results" / "runs").glob("*/status.json")]
    assert sorted(s["gpu"] for s in statuses) == sorted(r["gpu"] for r in ran)
    assert sorted(Path(s["run_dir"]).name for s in statuses) == ["stub_r16_a4", "stub_r4_a4", "stub_r8_a4"]


def test_an_interrupted_run_resumes_in_its_own_run_folder(tmp_path):
    """A stand-in trainer: its first attempt saves a resumable state and waits to be stopped; the rerun must
    hand it back that run folder (--resume_from_checkpoint), and the records follow."""
    stub = tmp_path / "stub_trainer.py"
    stub.write_text(
        "import argparse, json, pathlib, signal, sys, time\n"
        "p = argparse.ArgumentParser(); [p.add_argument(f) for f in ('--output_dir', '--lora_rank', "
        "'--lora_alpha', '--learning_rate', '--resume_from_checkpoint')]\n"
        "a, _ = p.parse_known_args()\n"
        "run = pathlib.Path(a.resume_from_checkpoint or pathlib.Path(a.output_dir) / f'run_r{a.lora_rank}')\n"
        "run.mkdir(parents=True, exist_ok=True); print(f'Run directory: {run}', flush=True)\n"
        "(run / 'experiment_config.json').write_text(json.dumps({'lora_rank': int(a.lora_rank), "
        "'lora_alpha': float(a.lora_alpha), 'learning_rate': float(a.learning_rate)}))\n"
        "if not a.resume_from_checkpoint:\n"
        "    (run / 'checkpoints' / 'checkpoint-1').mkdir(parents=True)\n"
        "    (run / 'checkpoints' / 'checkpoint-1' / 'training_state.json').write_text('{}')\n"
        "    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)); time.sleep(60)\n"
        "(run / 'final_model').mkdir()\n"
        "(run / 'final_model' / 'pytorch_lora_weights.safetensors').write_bytes(b'')\n")
    env = {**ENV, "TRAIN_SCRIPT": str(stub)}
    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen(["bash", str(ROOT / "run_experiments.sh"), "--ranks", "4", "--alphas", "4"],
                                   cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: (tmp_path / "output_ghibli" / "run_r4" / "checkpoints").is_dir(), 30, "the checkpoint")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 143
    finally:
        if process.poll() is None:
            process.kill()
    stopped = json.loads((tmp_path / "experiment_results" / "experiment_4_4.json").read_text())
    assert stopped["status"] == "실패" and stopped["state"] == "interrupted"
    result = bash("run_experiments.sh", "--ranks", "4", "--alphas", "4", env={"TRAIN_SCRIPT": str(stub)},
                  cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    status = read_status(tmp_path, "4", "4")
    run = (tmp_path / "output_ghibli" / "run_r4").resolve()
    assert status["run_dir"] == str(run) and f"--resume_from_checkpoint {run}" in status["command"]
    record = json.loads((tmp_path / "experiment_results" / "experiment_4_4.json").read_text())
    assert record["status"] == "성공" and record["run_dir"] == str(run) and record["attempts"] == 2
    assert [p.name for p in run_folders(tmp_path)] == ["run_r4"]


def test_bad_flags_end_with_one_line_errors(tmp_path):
    result = bash("run_experiments.sh", "--ranks", "4 x", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        "error: --ranks value 'x': must be a positive integer")
    result = bash("run_experiments.sh", "--", "--lora_rank", "4", cwd=tmp_path)
    assert result.returncode == 2 and "--lora_rank is set by the sweep" in result.stderr
    result = bash("run_inference_experiments.sh", "--sweep_dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and f"error: {tmp_path}: no finished runs" in result.stderr
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    result = bash("run_inference_experiments.sh", cwd=fresh)
    assert result.returncode == 2 and "error: output_ghibli: folder not found" in result.stderr
    result = bash("run_checkpoint_inference.sh", "--run_dir", str(tmp_path / "nowhere"), cwd=fresh)
    assert result.returncode == 2 and "nowhere: folder not found" in result.stderr
    (fresh / "output_ghibli").mkdir()
    result = bash("run_checkpoint_inference.sh", cwd=fresh)
    assert result.returncode == 2 and "output_ghibli: no run with checkpoint_epoch_N folders" in result.stderr


# ----------------------------------------------------------------------------- inference over the runs


def test_inference_experiments_write_the_originals_folders(sweep, sweep_inference):
    runs = run_folders(sweep["work"])
    files = sweep["inference_plain_files"]
    for run in runs:
        names = [f.split("/", 1)[1] for f in files if f.startswith(run.name + "/")]
        for kind in ("base", "lora"):
            assert len([n for n in names if re.fullmatch(rf"{kind}_prompt[12]_\d{{8}}_\d{{6}}_[12]\.png", n)]) == 4
        assert len([n for n in names if re.fullmatch(r"comparison_grid_prompt[12]_\d{8}_\d{6}\.png", n)]) == 2
        assert len([n for n in names if re.fullmatch(r"metadata_prompt[12]_\d{8}_\d{6}\.json", n)]) == 2
    assert {f.split("/")[0] for f in files} == {r.name for r in runs} | {"base_model_results", "report"}
    assert {"report/exp_result.png", "report/loss_curves.png"} <= set(files)
    # Offline, the default CLIP model cannot load: one warning, the pictures are still made.
    assert "No CLIP metrics" in sweep["inference_plain"].stderr
    assert sweep["inference_metrics"].stderr.count("Skipping") == 4


def test_grid_places_each_run_at_its_rank_and_alpha(sweep_inference):
    report = sweep_inference / "report"
    layout = json.loads((report / "exp_result.json").read_text())
    assert layout["ranks"] == [2, 4] and layout["alphas"] == [4.0, 8.0] and layout["prompt"] == PROMPTS[0]
    grid = pixels(report / "exp_result.png")
    positions = {}
    for cell in layout["cells"]:
        tile = pixels(Path(cell["image"]))
        assert tile.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE)
        positions[(cell["rank"], cell["alpha"])] = find_tile(grid, tile)
    assert len(set(positions.values())) == 4, "four distinct cells"
    for rank in (2, 4):
        assert positions[(rank, 4.0)][0] == positions[(rank, 8.0)][0]  # one row per rank
        assert positions[(rank, 4.0)][1] < positions[(rank, 8.0)][1]
    for alpha in (4.0, 8.0):
        assert positions[(2, alpha)][1] == positions[(4, alpha)][1]  # one column per alpha
        assert positions[(2, alpha)][0] < positions[(4, alpha)][0]
    left = min(x for _, x in positions.values())
    right = max(x for _, x in positions.values()) + IMAGE_SIZE
    top = min(y for y, _ in positions.values())
    # Labels: ink left of each row (rank) and above each column (alpha), only white outside the cells.
    for y, _ in {p for p in positions.values() if p[1] == left}:
        assert (grid[y:y + IMAGE_SIZE, :left - 2] < 128).any(), "row label missing"
    for _, x in {p for p in positions.values() if p[0] == top}:
        assert (grid[top - 20:top - 2, x:x + IMAGE_SIZE] < 128).any(), "column label missing"
    assert (grid[top:, right + 1:] == 255).all()
    assert grid.shape[1] == right + 4  # the grid's right margin


def test_one_pipeline_for_all_runs_gives_the_images_of_separate_calls(sweep, sweep_inference, tiny_model_dir,
                                                                      tmp_path):
    """The last run's images, made after three other LoRAs were loaded and deleted, match a fresh CLI call."""
    folders = [sweep_inference / run.name for run in run_folders(sweep["work"])]
    metas = [json.loads(next(folder.glob("metadata_prompt2_*.json")).read_text()) for folder in folders]
    assert all(m["seeds"] == [44, 45] and m["prompt"] == PROMPTS[1] and m["prompt_idx"] == 2 for m in metas)
    base_dir = sweep_inference / "base_model_results"
    base_meta = json.loads(next(base_dir.glob("metadata_prompt2_*.json")).read_text())
    first_base = [pixels(base_dir / name) for name in base_meta["base_model_images"]]
    for folder, meta in zip(folders, metas):  # base images made once, reused bit for bit
        assert all(np.array_equal(a, pixels(folder / n)) for a, n in zip(first_base, meta["base_model_images"]))
    result = subprocess.run(
        [sys.executable, str(ROOT / "inference_sdxl_ghibli.py"), "--pretrained_model_name_or_path", str(tiny_model_dir),
         "--lora_model_path", metas[-1]["lora_model_path"], "--output_dir", str(tmp_path), *INFERENCE_FLAGS],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    alone = json.loads(next(tmp_path.glob("metadata_prompt2_*.json")).read_text())
    for mine, theirs in zip(metas[-1]["lora_model_images"], alone["lora_model_images"]):
        assert np.array_equal(pixels(folders[-1] / mine), pixels(tmp_path / theirs))
    assert not np.array_equal(pixels(folders[-1] / metas[-1]["lora_model_images"][0]), first_base[0])


def test_checkpoint_inference_with_no_flags_writes_the_originals_folders(sweep, sweep_inference, tiny_model_dir):
    work = sweep["work"]
    result = bash("run_checkpoint_inference.sh", "--", "--pretrained_model_name_or_path", str(tiny_model_dir),
                  *INFERENCE_FLAGS, cwd=work)
    assert result.returncode == 0, result.stderr[-4000:]
    newest = max(run_folders(work), key=lambda run: max(
        (p / WEIGHTS).stat().st_mtime for p in run.glob("checkpoint_epoch_*")))
    out = work / "output_visualization" / f"{newest.name}_checkpoints"
    epochs = sorted(int(p.name.rsplit("_", 1)[1]) for p in newest.glob("checkpoint_epoch_*"))
    assert len(epochs) == 2
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(f"epoch_{n}" for n in epochs)
    base_dir = work / "output_visualization" / "base_model_results"
    assert len(list(base_dir.glob("base_prompt[12]_*_[12].png"))) == 4
    layout = json.loads((out / "epoch_strip.json").read_text())
    assert layout["columns"] == ["base"] + [f"epoch {n}" for n in epochs] and layout["prompts"] == PROMPTS
    names = [f"epoch_{n}" for n in epochs]
    metas = {name: json.loads(next((out / name).glob("metadata_prompt1_*.json")).read_text()) for name in names}
    assert all(m["lora_model_path"].endswith(f"checkpoint_epoch_{name[6:]}") for name, m in metas.items())
    # Same seeds, and the base images were made once and reused: identical pixels in both folders.
    assert metas[names[0]]["seeds"] == metas[names[1]]["seeds"] == [42, 43]
    assert np.array_equal(pixels(out / names[0] / metas[names[0]]["base_model_images"][0]),
                          pixels(out / names[1] / metas[names[1]]["base_model_images"][0]))
    strip = pixels(out / "epoch_strip.png")
    xs = [find_tile(strip, pixels(out / names[0] / metas[names[0]]["base_model_images"][0]))[1],
          find_tile(strip, pixels(out / names[0] / metas[names[0]]["lora_model_images"][0]))[1],
          find_tile(strip, pixels(out / names[1] / metas[names[1]]["lora_model_images"][0]))[1]]
    assert xs == sorted(xs) and len(set(xs)) == 3


def test_the_scripts_default_prompts_are_the_originals():
    """25 prompts in run_checkpoint_inference.sh, 5 in run_inference_experiments.sh (the last 5 of the 25),
    the first 16 the inference script's default."""
    from inference_sdxl_ghibli import DEFAULT_PROMPTS

    def prompts_of(script: str) -> list[str]:
        code = f'. <(sed -n "/^PROMPTS=(/,/^)/p" {ROOT / script}); printf "%s\\n" "${{PROMPTS[@]}}"'
        return subprocess.run(["bash", "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()

    checkpoint, experiments = prompts_of("run_checkpoint_inference.sh"), prompts_of("run_inference_experiments.sh")
    assert len(checkpoint) == 25 and checkpoint[:16] == DEFAULT_PROMPTS and checkpoint[-5:] == experiments
    assert checkpoint[16] == "A couple studying in a Japanese cafe in Ghibli style."
    assert experiments[0].startswith("The image is a full shot of Kiki from Kiki's Delivery Service")


def test_checkpoints_are_listed_in_epoch_order(tmp_path):
    from utils.sweep_report import epoch_checkpoints

    for epoch in (10, 2, 1):
        folder = tmp_path / f"checkpoint_epoch_{epoch}"
        folder.mkdir()
        (folder / WEIGHTS).write_bytes(b"")
    (tmp_path / "checkpoint_epoch_3").mkdir()  # no weights: an unfinished save is left out
    (tmp_path / "final_model").mkdir()
    (tmp_path / "final_model" / WEIGHTS).write_bytes(b"")
    assert [label for label, _ in epoch_checkpoints(tmp_path)] == ["epoch_1", "epoch_2", "epoch_10"]
    assert [label for label, _ in epoch_checkpoints(tmp_path, include_final=True)][-1] == "final"


# ----------------------------------------------------------------------------- metrics and the verdict


def test_tiny_clip_metrics_respond_to_the_images(tiny_clip_dir):
    from utils.sweep.clip_metrics import ClipEmbedder, centroid, clip_scores, diversity, score_image_set

    embedder = ClipEmbedder(str(tiny_clip_dir), device="cpu")
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(3)]
    flat = [Image.new("RGB", (48, 48), colour) for colour in ("red", "green", "blue")]
    noise_embeddings, flat_embeddings = embedder.images(noise), embedder.images(flat)
    text = embedder.texts(["a house in ghibli style"])[0]
    cosines = (flat_embeddings @ text).numpy()
    assert len(set(np.round(cosines, 6))) == 3, "prompt alignment must differ between different images"
    assert np.allclose(clip_scores(text, flat_embeddings).numpy(), 100 * np.maximum(cosines, 0), atol=1e-4)
    assert diversity(embedder.images([flat[0]] * 3)) == pytest.approx(0.0, abs=1e-5)
    assert diversity(flat_embeddings) > 1e-4
    target = centroid(noise_embeddings)
    on_noise = score_image_set(embedder, ["noise"], [noise], target)
    on_flat = score_image_set(embedder, ["noise"], [flat], target)
    assert on_noise.style != pytest.approx(on_flat.style) and on_noise.diversity != pytest.approx(on_flat.diversity)
    assert on_noise.style > on_flat.style  # images are closer to their own centroid


def test_verdict_follows_the_stated_rule():
    from utils.sweep_report import choose_best

    def row(name, gain, change):
        return {"run": name, "style_gain": gain, "alignment_change": change, "alignment": 30 + change}

    rows = [row("a", 0.09, -3.0), row("b", 0.05, -1.0), row("c", 0.02, 0.5)]
    best, reason = choose_best(rows, tolerance=2.0)
    assert best["run"] == "b" and "b has the highest style gain" in reason
    assert [r["within_tolerance"] for r in rows] == [False, True, True] and [r["best"] for r in rows] == [0, 1, 0]
    best, reason = choose_best([row("a", 0.09, -3.0), row("b", 0.05, -2.5)], tolerance=2.0)
    assert best["run"] == "b" and "loses the least" in reason
    assert choose_best(rows, tolerance=5.0)[0]["run"] == "a"


def test_metrics_table_heatmaps_and_verdict_agree_with_the_csv(sweep_inference):
    from matplotlib import colormaps

    from utils.sweep_report import HEATMAP_AXES, HEATMAP_CMAP, HEATMAP_DPI, HEATMAP_FIGSIZE, METRICS

    report = sweep_inference / "report"
    with open(report / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((int(r["rank"]), float(r["alpha"])) for r in rows) == [(2, 4.0), (2, 8.0), (4, 4.0), (4, 8.0)]
    for column in ("alignment", "style_similarity", "diversity"):
        assert len({r[column] for r in rows}) > 1, f"{column} is constant across runs"
    for r in rows:
        assert 0 < float(r["alignment_change_se"]) < 100
        assert float(r["style_gain"]) == pytest.approx(float(r["style_similarity"]) - float(r["style_similarity_base"]),
                                                       abs=1e-6)
    verdict = json.loads((report / "verdict.json").read_text())
    eligible = [r for r in rows if float(r["alignment_change"]) >= -verdict["alignment_tolerance"]]
    if eligible:
        expected = max(eligible, key=lambda r: (float(r["style_gain"]), float(r["alignment"])))
    else:
        expected = max(rows, key=lambda r: float(r["alignment"]))
    assert verdict["best_run"] == expected["run"]
    assert [r["run"] for r in rows if r["best"] == "yes"] == [expected["run"]]

    markdown = (report / "metrics.md").read_text()
    assert f"Best trade-off: {expected['run']}" in markdown and "Rule:" in markdown
    table = {cells[0].strip("*★ "): cells for cells in
             ([c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()
              if line.startswith("| ") and "---" not in line)}
    for r in rows:
        cells = table[r["run"]]
        for index, column, digits in ((3, "alignment", 2), (5, "style_similarity", 4), (6, "style_gain", 4),
                                      (7, "diversity", 4)):
            assert float(cells[index]) == pytest.approx(float(r[column]), abs=0.51 * 10 ** -digits)

    width, height = (int(v * HEATMAP_DPI) for v in HEATMAP_FIGSIZE)
    left, bottom, axes_w, axes_h = HEATMAP_AXES
    for column, stem, _, _ in METRICS:
        image = pixels(report / f"heatmap_{stem}.png")[..., :3]
        assert image.shape[:2] == (height, width)
        values = {(int(r["rank"]), float(r["alpha"])): float(r[column]) for r in rows}
        low, high = min(values.values()), max(values.values())
        for (rank, alpha), value in values.items():
            i, j = [2, 4].index(rank), [4.0, 8.0].index(alpha)
            x = int((left + axes_w * (j + 0.15) / 2) * width)
            y = int((1 - bottom - axes_h) * height + axes_h * height * (i + 0.15) / 2)
            expected_rgb = np.array(colormaps[HEATMAP_CMAP]((value - low) / (high - low))[:3]) * 255
            assert np.abs(image[y, x] - expected_rgb).max() <= 3, f"{stem} cell r{rank} a{alpha}"
    assert re.search(r"\| base model \| \| \| [\d.]+ \|", markdown)


def test_later_runs_of_a_sweep_read_the_first_runs_cache(sweep):
    """One latent and text-embedding cache per sweep (output_dir/.latent_cache), read by every later run."""
    work = sweep["work"]
    cache = work / "output_ghibli" / ".latent_cache"
    assert len(list(cache.glob("text_*.safetensors"))) == 1
    logs = sorted((work / "experiment_results" / "runs").glob("*/train.log"))
    assert logs and any("Text embeddings read from" in log.read_text() for log in logs)
