"""run_experiments.sh, the rank x alpha sweep: the original's folders and records, interrupt and resume,
GPU slots, one-line errors.

The shared ``sweep`` fixture (tests/conftest.py) runs the script as the original's user does: in a working
folder, with no flags but the tiny model's (after --). It trains rank 4 x alphas 4, 8 into output_ghibli/
(stopped with SIGTERM during its second run, then restarted, then run once more to show it skips finished
runs), then rank 2 is added to the same records.
"""

from __future__ import annotations

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

from tests.helpers import ROOT, SCRIPT_ENV, processes_mentioning, read_status, run_bash, run_folders, wait_for
from utils.core.names import LORA_WEIGHT_NAME

ORIGINAL_RECORD_KEYS = ["experiment_number", "lora_rank", "lora_alpha", "learning_rate", "start_time", "status"]
TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")

def test_sweep_trains_into_output_ghibli_with_the_originals_records(sweep):
    work = sweep["work"]
    assert sweep["rerun"].returncode == 0, sweep["rerun"].stderr[-3000:]
    folders = sweep["folders_after_rerun"]
    assert len(folders) == 2, [p.name for p in folders]  # the interrupted run continued in its own folder
    for folder in folders:
        assert re.fullmatch(r"\d{8}_\d{6}_ghibli_r4_a(4|8)\.0_lr0\.0001(_\d+)?", folder.name), folder.name
        assert (folder / "final_model" / LORA_WEIGHT_NAME).is_file()
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
            from utils.sweep.runs import read_loss_log
            steps, losses = read_loss_log(run_dir)
            assert steps == [1, 2, 3, 4] and all(np.isfinite(losses))


def test_a_results_folder_holds_one_learning_rate(sweep):
    result = run_bash("run_experiments.sh", "--ranks", "4", "--alphas", "4", "--lr", "1e-3", cwd=sweep["work"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: experiment_results/experiment_4_4.json: "
                                                             "recorded for learning rate 0.0001")


def test_later_runs_of_a_sweep_read_the_first_runs_cache(sweep):
    """One latent and text-embedding cache per sweep (output_dir/.latent_cache), read by every later run."""
    work = sweep["work"]
    cache = work / "output_ghibli" / ".latent_cache"
    assert len(list(cache.glob("text_*.safetensors"))) == 1
    logs = sorted((work / "experiment_results" / "runs").glob("*/train.log"))
    assert logs and any("Text embeddings read from" in log.read_text() for log in logs)


@pytest.mark.slow
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
    result = run_bash("run_experiments.sh", "--ranks", "4 8 16", "--alphas", "4", "--gpus", "0,1",
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


@pytest.mark.slow
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
    env = {**SCRIPT_ENV, "TRAIN_SCRIPT": str(stub)}
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
    result = run_bash("run_experiments.sh", "--ranks", "4", "--alphas", "4", env={"TRAIN_SCRIPT": str(stub)},
                  cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    status = read_status(tmp_path, "4", "4")
    run = (tmp_path / "output_ghibli" / "run_r4").resolve()
    assert status["run_dir"] == str(run) and f"--resume_from_checkpoint {run}" in status["command"]
    record = json.loads((tmp_path / "experiment_results" / "experiment_4_4.json").read_text())
    assert record["status"] == "성공" and record["run_dir"] == str(run) and record["attempts"] == 2
    assert [p.name for p in run_folders(tmp_path)] == ["run_r4"]


def test_trainer_flags_that_every_run_would_fail_on_stop_the_sweep_before_any_run(tmp_path):
    """The original's command in a folder without dataset_ghibli, a mistyped trainer flag, a base-model folder
    that is not a pipeline, --help: one line and exit status 2 at once, no run started, no record written."""
    from utils.tiny.demo_model import DEMO_MODELS_DIR, DEMO_SDXL_DIR

    cases = [
        ([], "error: dataset_ghibli: dataset directory not found"),
        (["--", "--lora_rnk", "3"], "error: the trainer flags after --: unrecognized arguments: --lora_rnk 3; "
                                          "did you mean --lora_rank?"),
        (["--", "--dataset_dir", str(tmp_path), "--pretrained_model_name_or_path", str(DEMO_MODELS_DIR)],
         f"error: --pretrained_model_name_or_path {DEMO_MODELS_DIR}: a folder without model_index.json, so not a "
         f"saved diffusers pipeline; did you mean {DEMO_SDXL_DIR}?"),
        (["--", "--help"], "error: -h/--help after --: python train_sdxl_lora.py --help lists the trainer's flags"),
    ]
    for flags, error in cases:
        result = run_bash("run_experiments.sh", *flags, cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [error], (flags, result.stderr)
        assert "start r=" not in result.stdout + result.stderr
        assert not list((tmp_path / "experiment_results").glob("**/*.json")) and not run_folders(tmp_path)


def test_bad_flags_end_with_one_line_errors(tmp_path):
    result = run_bash("run_experiments.sh", "--ranks", "4 x", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        "error: --ranks value 'x': must be a positive integer")
    result = run_bash("run_experiments.sh", "--", "--lora_rank", "4", cwd=tmp_path)
    assert result.returncode == 2 and "--lora_rank is set by the sweep" in result.stderr
    result = run_bash("run_inference_experiments.sh", "--sweep_dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and f"error: {tmp_path}: no finished runs" in result.stderr
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    result = run_bash("run_inference_experiments.sh", cwd=fresh)
    assert result.returncode == 2 and "error: output_ghibli: folder not found" in result.stderr
    result = run_bash("run_checkpoint_inference.sh", "--run_dir", str(tmp_path / "nowhere"), cwd=fresh)
    assert result.returncode == 2 and "nowhere: folder not found" in result.stderr
    (fresh / "output_ghibli").mkdir()
    result = run_bash("run_checkpoint_inference.sh", cwd=fresh)
    assert result.returncode == 2 and "output_ghibli: no run with checkpoint_epoch_N folders" in result.stderr


# A stand-in trainer for the driver's own behaviour: it makes its run folder (or continues the one it is given),
# reports it, and on SIGTERM saves a resumable state and exits 143, counting the signals it got.
STUB_TRAINER = """\
import argparse, json, pathlib, signal, sys, time
p = argparse.ArgumentParser()
for flag in ('--output_dir', '--lora_rank', '--lora_alpha', '--learning_rate', '--resume_from_checkpoint',
             '--run_dir_file', '--seconds', '--slow_save'):
    p.add_argument(flag)
a, _ = p.parse_known_args()
run = pathlib.Path(a.resume_from_checkpoint or pathlib.Path(a.output_dir) / f'run_r{a.lora_rank}_a{a.lora_alpha}')
run.mkdir(parents=True, exist_ok=True)
pathlib.Path(a.run_dir_file).write_text(str(run.resolve()))
(run / 'experiment_config.json').write_text(json.dumps({'lora_rank': int(a.lora_rank),
    'lora_alpha': float(a.lora_alpha), 'learning_rate': float(a.learning_rate)}))
signals = []
def stop(number, frame):
    signals.append(number)
    if len(signals) == 1:
        time.sleep(60 if a.slow_save else 0.5)  # saving
        (run / 'checkpoints' / 'checkpoint-1').mkdir(parents=True, exist_ok=True)
        (run / 'signals.json').write_text(json.dumps(signals))
        sys.exit(143)
signal.signal(signal.SIGTERM, stop)
time.sleep(float(a.seconds or 0))
(run / 'final_model').mkdir(exist_ok=True)
(run / 'final_model' / 'pytorch_lora_weights.safetensors').write_bytes(b'')
"""


def _stub(tmp_path: Path) -> Path:
    stub = tmp_path / "stub_trainer.py"
    stub.write_text(STUB_TRAINER)
    return stub


@pytest.mark.slow
def test_a_sweep_starts_one_interpreter_besides_its_trainings(tmp_path):
    """A `python` first on PATH logs each start: the sweep itself once, then one per training."""
    wrapper_dir = tmp_path / "bin"
    wrapper_dir.mkdir()
    starts = tmp_path / "starts.log"
    (wrapper_dir / "python").write_text(f'#!/bin/sh\necho "$*" >> {starts}\nexec {sys.executable} "$@"\n')
    (wrapper_dir / "python").chmod(0o755)
    env = {"PATH": f"{wrapper_dir}:{os.environ['PATH']}", "PYTHON": "", "TRAIN_SCRIPT": str(_stub(tmp_path))}
    result = run_bash("run_experiments.sh", "--ranks", "4", "--alphas", "4 8", env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = starts.read_text().splitlines()
    assert len(lines) == 3, lines
    assert "sweep_report.py run_experiments" in lines[0] and all("stub_trainer.py" in line for line in lines[1:])


@pytest.mark.slow
def test_sigterm_stops_two_trainings_at_once_and_the_same_command_resumes_both(tmp_path):
    """--gpus 0,0: two trainings on one GPU; SIGTERM to the sweep reaches each as ONE SIGTERM, both save and are
    recorded interrupted within the grace time, and the rerun continues both in their own folders."""
    env = {**SCRIPT_ENV, "TRAIN_SCRIPT": str(_stub(tmp_path))}
    command = ["bash", str(ROOT / "run_experiments.sh"), "--ranks", "4", "--alphas", "4 8", "--gpus", "0,0", "--",
               "--seconds", "60"]
    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: (tmp_path / "first.log").read_text().count(": run folder ") == 2, 30, "both run folders")
        stopped_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=40) == 143
        assert time.monotonic() - stopped_at < 30
    finally:
        if process.poll() is None:
            process.kill()
    for alpha in ("4", "8"):
        status = read_status(tmp_path, "4", alpha)
        assert status["state"] == "interrupted" and status["exit_code"] == 143 and status["gpu"] == "0"
        assert json.loads((Path(status["run_dir"]) / "signals.json").read_text()) == [signal.SIGTERM]
    output = (tmp_path / "first.log").read_text()
    for alpha in ("4", "8"):  # the run folder, as each run started and ended
        run = (tmp_path / "output_ghibli" / f"run_r4_a{alpha}").resolve()
        assert f"r=4 a={alpha}: run folder {run}" in output and f"interrupted, exit code 143 -> {run}" in output
    result = run_bash("run_experiments.sh", "--ranks", "4", "--alphas", "4 8", "--gpus", "0,0",
                      env={"TRAIN_SCRIPT": env["TRAIN_SCRIPT"]}, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    for alpha in ("4", "8"):
        status = read_status(tmp_path, "4", alpha)
        run = (tmp_path / "output_ghibli" / f"run_r4_a{alpha}").resolve()
        assert status["state"] == "finished" and status["attempts"] == 2 and status["run_dir"] == str(run)
        assert f"--resume_from_checkpoint {run}" in status["command"]
        assert f"start r=4 a={alpha} on GPU 0 -> {run}" in result.stderr
        assert f"finished, exit code 0 -> {run / 'final_model'}" in result.stderr
    assert "log_offset" not in read_status(tmp_path, "4", "4")


@pytest.mark.slow
def test_the_folder_of_runs_is_runs_dir_in_every_script_with_the_old_names_kept(tmp_path):
    env = {"TRAIN_SCRIPT": str(_stub(tmp_path))}
    for flag, folder in (("--runs_dir", "runs_a"), ("--output_dir", "runs_b")):
        result = run_bash("run_experiments.sh", "--ranks", "2", "--alphas", "2", flag, folder, "--results_dir",
                          f"results_{folder}", env=env, cwd=tmp_path, timeout=60)
        assert result.returncode == 0, result.stderr[-3000:]
        assert (tmp_path / folder / "run_r2_a2" / "final_model").is_dir()
    for script in ("run_inference_experiments.sh", "run_checkpoint_inference.sh"):
        for flag in ("--runs_dir", "--sweep_dir") if script.startswith("run_inference") else ("--runs_dir",):
            result = run_bash(script, flag, "nowhere", cwd=tmp_path)
            assert result.returncode == 2 and result.stderr.strip() == "error: nowhere: folder not found", result.stderr
    # No abbreviations: a flag cut short is not taken for another.
    result = run_bash("run_experiments.sh", "--rank", "4", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: unrecognized arguments: --rank 4")


@pytest.mark.slow
def test_a_second_signal_kills_a_training_that_is_still_saving(tmp_path):
    env = {**SCRIPT_ENV, "TRAIN_SCRIPT": str(_stub(tmp_path))}
    command = ["bash", str(ROOT / "run_experiments.sh"), "--ranks", "4", "--alphas", "4", "--", "--seconds", "60",
               "--slow_save", "1"]
    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: ": run folder " in (tmp_path / "first.log").read_text(), 30, "the run folder")
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: "Stopping the sweep" in (tmp_path / "first.log").read_text(), 10, "the stop")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 143
    finally:
        if process.poll() is None:
            process.kill()
    status = read_status(tmp_path, "4", "4")
    assert status["state"] == "interrupted" and status["exit_code"] == 137  # killed while saving, by the sweep
    assert not processes_mentioning(str(tmp_path / "stub_trainer.py"))
