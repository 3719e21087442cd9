"""Session-wide fixtures: one tiny SDXL model, one synthetic dataset, one trained run, and one rank x alpha sweep
with its images and report, shared by all tests; and which tests are slow (`pytest -m "not slow"`).

Tests that only read these must not modify them; tests that need to change files copy them first.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import (ROOT, SCRIPT_ENV, processes_mentioning, read_status, run_bash,  # noqa: E402
                           run_folders, run_in_process, wait_for)

pytest_plugins = ["tests.budget"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per process: tests run training subprocesses beside the pytest process on 2 cores,
# and torch's default of one thread per core oversubscribes them (measured 4x slower under load).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Settings of the shared run: alpha differs from rank on purpose (the scale must survive saving).
TRAINED_RANK = 4
TRAINED_ALPHA = 16.0
# 4 epochs of 12 steps (12 images, batch 1): 48 optimizer steps, checkpoint_epoch_1 and _3 (--save_steps 2).
SHARED_RUN_ARGS = [
    "--resolution", "128", "--train_batch_size", "1", "--num_train_epochs", "4",
    "--learning_rate", "1e-2", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
    "--lora_rank", str(TRAINED_RANK), "--lora_alpha", str(TRAINED_ALPHA), "--random_flip",
    "--checkpointing_steps", "12", "--save_steps", "2", "--report_to", "none",
    "--validation_prompt", "a village in ghibli style", "--num_validation_images", "1",
    "--validation_epochs", "2", "--validation_steps", "2",
    # The fixed-noise loss after every epoch on 32 triples (the default budget would measure only before and
    # after, on 3): the tests compare it across epochs and before/after with a fixed margin.
    "--eval_loss_epochs", "1", "--eval_loss_samples", "32",
]
# The sweep the sweep tests share (rank x alpha over a 4-image dataset, 2 epochs at 64 x 64), and the
# inference flags of its images.
SWEEP_PROMPTS = ["a village in ghibli style", "a cat on a roof"]
SWEEP_IMAGE_SIZE = 64
SWEEP_TRAIN_FLAGS = ["--resolution", "64", "--train_batch_size", "2", "--num_train_epochs", "2", "--save_steps", "1",
                     "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--report_to", "none",
                     "--mixed_precision", "no", "--no-gradient_checkpointing"]
SWEEP_INFERENCE_FLAGS = ["--prompts", *SWEEP_PROMPTS, "--num_images", "2", "--height", str(SWEEP_IMAGE_SIZE),
                         "--width", str(SWEEP_IMAGE_SIZE), "--num_inference_steps", "2"]


# `pytest -m "not slow"` leaves out what trains a model or runs a sweep (about a minute for the rest): every
# test that uses one of these fixtures, and the tests marked `@pytest.mark.slow` themselves.
SLOW_FIXTURES = {"trained_run", "sweep", "sweep_inference", "two_rank_run", "straight_run"}


# Under pytest-xdist (`-n`, see pytest.ini) each worker builds its own session fixtures, so the tests that
# share an expensive one run on the same worker (`--dist loadgroup`): the sweep is made once, the trained
# run once. Every other test stays with its module, whose module-scoped fixtures are then made once too.
SHARED_GROUPS = (("sweep", {"sweep", "sweep_inference"}), ("trained_run", {"trained_run"}))


def worker_group(item) -> str:
    for group, fixtures in SHARED_GROUPS:
        if fixtures & set(item.fixturenames):
            return group
    return item.path.name


def pytest_itemcollected(item) -> None:  # before xdist's collection hook, which reads the groups into the ids
    item.add_marker(pytest.mark.xdist_group(worker_group(item)))


# The groups that take a minute or more on 2 cores go to the workers first (pytest.ini turns off xdist's own
# order, largest group first, which left a slow one-test group for the end and one worker idle meanwhile); then
# the other groups with slow tests; the quick groups last, where they fill in the gaps.
LONG_GROUPS = ("test_gpu_check.py", "sweep", "test_slurm.py", "trained_run", "test_adapter_roundtrip.py",
               "test_pack.py")


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
    slow_groups = {worker_group(item) for item in items if item.get_closest_marker("slow")}

    def hand_out_order(item) -> tuple[int, int]:
        group = worker_group(item)
        if group in LONG_GROUPS:
            return 0, LONG_GROUPS.index(group)
        return (1 if group in slow_groups else 2), 0

    items.sort(key=hand_out_order)  # stable: each group keeps its tests' order


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from utils.tiny.sdxl import save_tiny_sdxl
    return save_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny_sdxl")


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory) -> Path:
    from utils.tiny.sdxl import make_synthetic_dataset
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "dataset_ghibli", num_images=12)


@pytest.fixture(scope="session")
def tiny_product_dataset_dir(tmp_path_factory) -> Path:
    """A small dataset in the original's product layout (captions.json, products/, styled/{id}.png)."""
    from utils.tiny.sdxl import make_synthetic_product_dataset
    return make_synthetic_product_dataset(tmp_path_factory.mktemp("data") / "dataset_product", num_images=4)


@pytest.fixture(scope="session")
def trained_run(tiny_model_dir, tiny_dataset_dir, tmp_path_factory) -> Path:
    """The run directory of one training of the tiny model, through the real CLI."""
    output_dir = tmp_path_factory.mktemp("runs")
    run_in_process("train_sdxl_lora.py", "--pretrained_model_name_or_path", str(tiny_model_dir),
               "--dataset_dir", str(tiny_dataset_dir), "--output_dir", str(output_dir), *SHARED_RUN_ARGS)
    (run_dir,) = [p for p in output_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return run_dir


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from utils.tiny.clip import save_tiny_clip
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_clip")


@pytest.fixture(scope="session")
def sweep(tiny_model_dir, tmp_path_factory) -> dict:
    """rank 4 x alphas 4, 8 with no sweep flags: stopped by SIGTERM during the second run, rerun, rerun again;
    then ranks 2 4 x alphas 4 8 into the same records (only rank 2 trains)."""
    from utils.tiny.sdxl import make_synthetic_dataset

    work = tmp_path_factory.mktemp("sweep")
    dataset = make_synthetic_dataset(work / "data", num_images=4)
    tail = ["--", "--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_dir", str(dataset),
            *SWEEP_TRAIN_FLAGS]
    args = ["--ranks", "4", "--alphas", "4 8", *tail]
    first, second = ("4", "4"), ("4", "8")
    output = work / "first_attempt.log"
    with open(output, "w") as log:
        process = subprocess.Popen(["bash", str(ROOT / "run_experiments.sh"), *args], cwd=work, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True, env=SCRIPT_ENV)
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
    record["rerun"] = run_bash("run_experiments.sh", *args, cwd=work)
    record["records_after_rerun"] = {ra: json.loads((work / "experiment_results" / f"experiment_{ra[0]}_{ra[1]}.json")
                                                    .read_text()) for ra in (first, second)}
    record["folders_after_rerun"] = run_folders(work)
    record["third"] = run_bash("run_experiments.sh", *args, cwd=work)
    record["folders_after_third"] = run_folders(work)
    record["grown"] = run_bash("run_experiments.sh", "--ranks", "2 4", "--alphas", "4 8", *tail, cwd=work)
    return record


@pytest.fixture(scope="session")
def sweep_inference(sweep, tiny_model_dir, tiny_clip_dir) -> Path:
    """run_inference_experiments.sh with no flags but the model's, then again for the CLIP metrics."""
    work = sweep["work"]
    plain = run_bash("run_inference_experiments.sh", "--", "--pretrained_model_name_or_path", str(tiny_model_dir),
                 *SWEEP_INFERENCE_FLAGS, cwd=work, env={"HF_HUB_OFFLINE": "1"})
    assert plain.returncode == 0, plain.stdout[-2000:] + plain.stderr[-4000:]
    out = work / "output_visualization_additional_2"
    sweep["inference_plain"] = plain
    sweep["inference_plain_files"] = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    metrics = run_bash("run_inference_experiments.sh", "--skip_existing", "--clip_model", str(tiny_clip_dir), "--",
                   "--pretrained_model_name_or_path", str(tiny_model_dir), *SWEEP_INFERENCE_FLAGS, cwd=work)
    assert metrics.returncode == 0, metrics.stdout[-2000:] + metrics.stderr[-4000:]
    sweep["inference_metrics"] = metrics
    return out
