"""run_experiments.sh --slurm on a real one-node SLURM cluster (tests/slurm_cluster.py): one job array, the
records and folders of a local sweep, scancel and resume, a cache filled by two tasks at once, one-line errors.

The module's ``sweeps`` fixture runs the same 2 x 2 sweep twice: locally, and on SLURM, where one array task
is cancelled (scancel) in the middle of its training and the same command is run again with --wait.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers import assert_same_lora, read_status, run_bash, run_folders, wait_for
from tests.slurm_cluster import missing_programs, one_node_cluster
from utils.core.names import LORA_WEIGHT_NAME

pytestmark = pytest.mark.slow

FLAGS = ["--resolution", "32", "--train_batch_size", "1", "--num_train_epochs", "3", "--save_steps", "1",
         "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--report_to", "none", "--mixed_precision", "no",
         "--no-gradient_checkpointing"]
GRID = ["--ranks", "2 4", "--alphas", "2 4"]
PAIRS = [("2", "2"), ("2", "4"), ("4", "2"), ("4", "4")]
CANCELLED = ("4", "2")  # task 2 of the array


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_programs()
    if missing:
        reason = f"SLURM is not installed ({', '.join(missing)} missing; apt-get install slurm-wlm munge)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    with one_node_cluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


def _tail(tiny_model_dir: Path, dataset: Path) -> list[str]:
    return ["--", "--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_dir", str(dataset), *FLAGS]


def _steps_logged(work: Path, rank: str, alpha: str) -> int:
    run_file = work / "experiment_results" / "runs" / f"r{rank}_a{alpha}_lr1e-4" / "run_dir.txt"
    if not run_file.is_file():
        return 0
    log = Path(run_file.read_text().strip()) / "logs" / "training_steps.csv"
    return max(0, len(log.read_text().splitlines()) - 1) if log.is_file() else 0


@pytest.fixture(scope="module")
def sweeps(cluster, tiny_model_dir, tmp_path_factory) -> dict:
    from utils.tiny.sdxl import make_synthetic_dataset

    base = tmp_path_factory.mktemp("slurm_sweeps")
    dataset = make_synthetic_dataset(base / "data", num_images=4)
    local, remote = base / "local", base / "slurm"
    local.mkdir()
    remote.mkdir()
    env = {**cluster.env, "OMP_NUM_THREADS": "1"}
    tail = _tail(tiny_model_dir, dataset)
    record = {"local_dir": local, "work": remote, "dataset": dataset}
    first = run_bash("run_experiments.sh", *GRID, "--slurm", *tail, env=env, cwd=remote, timeout=120)
    record["first"] = first
    assert first.returncode == 0, first.stderr[-3000:]
    array = re.search(r"Submitted batch job (\d+)", first.stdout).group(1)
    wait_for(lambda: _steps_logged(remote, *CANCELLED) >= 2 or (read_status(remote, *CANCELLED) or {}).get(
        "state", "running") != "running", 240, "the cancelled task's training")
    record["steps_at_cancel"] = _steps_logged(remote, *CANCELLED)
    cluster.run("scancel", f"{array}_{PAIRS.index(CANCELLED)}")
    record["local"] = run_bash("run_experiments.sh", *GRID, *tail, cwd=local, timeout=300)
    wait_for(lambda: not cluster.run("squeue", "-h", "-j", array, check=False).stdout.strip(), 240, "the array")
    record["after_cancel"] = {pair: read_status(remote, *pair) for pair in PAIRS}
    record["folders_after_cancel"] = run_folders(remote)
    record["rerun"] = run_bash("run_experiments.sh", *GRID, "--slurm", "--wait", *tail, env=env, cwd=remote,
                              timeout=300)
    return record


def test_a_slurm_sweep_ends_with_a_local_sweeps_folders_and_records(sweeps):
    assert sweeps["local"].returncode == 0, sweeps["local"].stderr[-3000:]
    rerun = sweeps["rerun"]
    assert rerun.returncode == 0, rerun.stderr[-3000:] + rerun.stdout[-2000:]
    assert "array of 1: r4 a2" in rerun.stdout  # only the cancelled run was submitted again
    work, local = sweeps["work"], sweeps["local_dir"]
    assert len(run_folders(work)) == 4 and run_folders(work) == sweeps["folders_after_cancel"]
    for pair in PAIRS:
        record = json.loads((work / "experiment_results" / f"experiment_{pair[0]}_{pair[1]}.json").read_text())
        assert record["status"] == "성공" and record["lora_rank"] == int(pair[0])
        assert record["experiment_number"] == PAIRS.index(pair) + 1
    summary = json.loads((work / "experiment_results" / "summary.json").read_text())
    assert summary["total_experiments"] == 4 and summary["complete"] is True
    assert _files(work) == _files(local)


def _files(work: Path) -> set[str]:
    """Every file of the sweep, run folders named by their rank and alpha; what only SLURM or a resume
    adds (the job scripts and output, resumable checkpoints, the model saved at the stop) left out."""
    found = set()
    for path in work.rglob("*"):
        relative = path.relative_to(work).as_posix()
        relative = re.sub(r"^output_ghibli/\d{8}_\d{6}_", "output_ghibli/", relative)
        if path.is_file() and not re.search(r"(^experiment_results/slurm/|/checkpoints/|/interrupted_model/|\.latent_cache/|"
                                             r"\.sweep\.lock|events\.out)", relative):
            found.add(relative)
    return found


def test_a_cancelled_task_resumes_in_its_own_folder_and_matches_an_uninterrupted_run(sweeps):
    work, local = sweeps["work"], sweeps["local_dir"]
    cancelled = sweeps["after_cancel"][CANCELLED]
    assert cancelled["state"] == "interrupted" and cancelled["exit_code"] == 143, cancelled
    assert 0 < sweeps["steps_at_cancel"] < 12
    for pair in PAIRS:
        if pair != CANCELLED:
            assert sweeps["after_cancel"][pair]["state"] == "finished"
            assert read_status(work, *pair)["attempts"] == 1  # not trained again
    resumed = read_status(work, *CANCELLED)
    assert resumed["attempts"] == 2 and resumed["run_dir"] == cancelled["run_dir"]
    assert "--resume_from_checkpoint" in resumed["command"]
    reference = [p for p in run_folders(local) if "_r4_a2.0_" in p.name][0]
    assert_same_lora(Path(resumed["run_dir"]) / "final_model" / LORA_WEIGHT_NAME,
                     reference / "final_model" / LORA_WEIGHT_NAME, rtol=1e-5)


def test_two_tasks_filling_an_empty_cache_at_once_leave_every_entry_whole(sweeps):
    cache = sweeps["work"] / "output_ghibli" / ".latent_cache"
    local_cache = sweeps["local_dir"] / "output_ghibli" / ".latent_cache"
    entries = sorted(p.name for p in cache.glob("*.safetensors"))
    assert entries == sorted(p.name for p in local_cache.glob("*.safetensors")) and len(entries) == 5
    assert not [p for p in cache.iterdir() if p.name.startswith(".")], "a temporary file was left behind"
    for name in entries:
        mine, theirs = load_file(str(cache / name)), load_file(str(local_cache / name))
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert mine[key].equal(theirs[key]), (name, key)
    from datetime import datetime
    started = sorted(datetime.fromisoformat(read_status(sweeps["work"], *pair)["started_at"]) for pair in PAIRS[:2])
    assert (started[1] - started[0]).total_seconds() < 10  # tasks 0 and 1 began together (a CPU each)


def test_dry_run_prints_the_array_the_grid_and_the_sbatch_args(tmp_path):
    result = run_bash("run_experiments.sh", *GRID, "--slurm", "--dry_run", "--requeue", "--sbatch_args",
                      "--partition=gpu --gres=gpu:1 --time=08:00:00", cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "#SBATCH --array=0-3" in out and "#SBATCH --requeue" in out
    assert "grid: ranks 2 4 x alphas 2 4" in out and "task 3: rank 4, alpha 4" in out
    assert "sbatch --parsable --partition=gpu --gres=gpu:1 --time=08:00:00 < array.sbatch" in out
    assert "--dependency=afterany:<array job id>" in out and "slurm_task finish" in out
    assert not (tmp_path / "experiment_results" / "slurm").exists()


def test_bad_sbatch_args_or_no_controller_give_one_line_and_no_record(cluster, tiny_model_dir, tmp_path):
    from utils.tiny.sdxl import make_synthetic_dataset

    dataset = make_synthetic_dataset(tmp_path / "data", num_images=2)
    tail = _tail(tiny_model_dir, dataset)
    bad = run_bash("run_experiments.sh", *GRID, "--slurm", "--sbatch_args", "--no-such-flag", *tail,
                   env=cluster.env, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error: sbatch refused the job (--no-such-flag): ") and "no-such-flag" in last[45:]
    dead_conf = tmp_path / "dead.conf"
    dead_conf.write_text(re.sub(r"SlurmctldPort=\d+", f"SlurmctldPort={_closed_port()}",
                                Path(cluster.env["SLURM_CONF"]).read_text()))
    dead = run_bash("run_experiments.sh", *GRID, "--slurm", *tail, env={**cluster.env, "SLURM_CONF": str(dead_conf)},
                    cwd=tmp_path, timeout=180)
    assert dead.returncode == 2 and dead.stderr.strip().splitlines()[-1].startswith("error: sbatch refused the job")
    assert "controller" in dead.stderr.strip().splitlines()[-1].lower()
    results = tmp_path / "experiment_results"
    assert sorted(p.name for p in results.iterdir()) == [".sweep.lock"]  # no record, no half-written script


def _closed_port() -> int:
    from tests.helpers import free_port
    return free_port()


def test_the_tools_talk_to_this_tests_own_cluster(cluster):
    result = cluster.run("scontrol", "show", "config")
    assert str(cluster.folder / "state") in result.stdout
