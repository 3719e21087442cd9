"""Session-wide fixtures: one tiny SDXL model, one synthetic dataset and one trained run, shared by all tests.

Tests that only read these must not modify them; tests that need to change files copy them first.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
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


def run_script(*args: str, env: dict | None = None, timeout: int = 600, check: bool = True,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run one of the project's scripts in a subprocess, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run([sys.executable, *args], cwd=cwd or ROOT, env=full_env, capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from utils.make_tiny_sdxl import save_tiny_sdxl
    return save_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny_sdxl")


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory) -> Path:
    from utils.make_tiny_sdxl import make_synthetic_dataset
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "dataset_ghibli", num_images=12)


@pytest.fixture(scope="session")
def tiny_product_dataset_dir(tmp_path_factory) -> Path:
    """A small dataset in the original's product layout (captions.json, products/, styled/{id}.png)."""
    from utils.make_tiny_sdxl import make_synthetic_product_dataset
    return make_synthetic_product_dataset(tmp_path_factory.mktemp("data") / "dataset_product", num_images=4)


@pytest.fixture(scope="session")
def trained_run(tiny_model_dir, tiny_dataset_dir, tmp_path_factory) -> Path:
    """The run directory of one training of the tiny model, through the real CLI."""
    output_dir = tmp_path_factory.mktemp("runs")
    run_script("train_sdxl_lora.py", "--pretrained_model_name_or_path", str(tiny_model_dir),
               "--dataset_dir", str(tiny_dataset_dir), "--output_dir", str(output_dir), *SHARED_RUN_ARGS)
    (run_dir,) = [p for p in output_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return run_dir
