"""train_sdxl_lora.py under `accelerate launch` with two processes (DDP over gloo on the CPU).

`accelerate launch --cpu --num_processes 2` starts a single process unless MPI is used, so the
two ranks are started the way a multi-GPU launch starts them (torch.distributed.run, one process
per rank), with ACCELERATE_USE_CPU=1 so that accelerate runs them on the CPU.

Which images each rank trained on is read from the trainer's per-step debug line
("process R step S images [...] loss L"), shown with SDXL_LORA_LOG_LEVEL=DEBUG.
"""

from __future__ import annotations

import re
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_same_lora, csv_rows, free_port, only_run_dir, read_json, run_script
from utils.lora.files import LORA_WEIGHT_NAME, read_tensors

BATCH = 4
EPOCHS = 3
STEP_LINE = re.compile(r"process (\d+) step (\d+) images \[([\d, ]*)\] loss ([-\d.e+naninf]+)")

# 256 px puts the synthetic images in three aspect buckets, so some batches are shorter than
# --train_batch_size: the case where sharding by a fixed batch size loses or mixes images.
ARGS = ["--resolution", "256", "--train_batch_size", str(BATCH), "--num_train_epochs", str(EPOCHS),
        "--learning_rate", "1e-2", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--lora_rank", "4", "--lora_alpha", "4", "--checkpointing_steps", "3", "--save_steps", "1",
        "--report_to", "none"]


def launch_two_processes(tiny_model_dir: Path, dataset_dir: Path, output_dir: Path, *extra: str) -> str:
    """Run the training CLI on two ranks; return its combined output."""
    result = run_script(
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "train_sdxl_lora.py", "--pretrained_model_name_or_path", str(tiny_model_dir),
        "--dataset_dir", str(dataset_dir), "--output_dir", str(output_dir), *ARGS, *extra,
        env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "SDXL_LORA_LOG_LEVEL": "DEBUG"},
        timeout=900)
    return result.stdout + result.stderr


def step_records(output: str) -> dict[int, dict[int, tuple[list[int], float]]]:
    """step -> rank -> (image indices, that rank's loss), from the trainer's debug lines."""
    records: dict[int, dict[int, tuple[list[int], float]]] = defaultdict(dict)
    for rank, step, images, loss in STEP_LINE.findall(output):
        records[int(step)][int(rank)] = ([int(i) for i in images.split(",") if i.strip()], float(loss))
    return records


def log_rows(run_dir: Path, name: str = "training_steps.csv") -> list[dict]:
    return csv_rows(run_dir / "logs" / name)


@pytest.fixture(scope="module")
def two_rank_run(tiny_model_dir, tiny_dataset_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("ddp_runs")
    output = launch_two_processes(tiny_model_dir, tiny_dataset_dir, output_dir)
    return only_run_dir(output_dir), output


def run_config(run_dir: Path) -> dict:
    return read_json(run_dir / "experiment_config.json")


@pytest.mark.slow
def test_each_epoch_is_split_into_disjoint_halves(two_rank_run):
    run_dir, output = two_rank_run
    config = run_config(run_dir)
    per_epoch, num_images = config["steps_per_epoch"], config["num_train_images"]
    assert config["max_train_steps"] == EPOCHS * per_epoch
    records = step_records(output)
    assert sorted(records) == list(range(1, EPOCHS * per_epoch + 1)), output[-3000:]
    for epoch in range(EPOCHS):
        seen: dict[int, list[int]] = {0: [], 1: []}
        batch_sizes = []
        for step in range(epoch * per_epoch + 1, (epoch + 1) * per_epoch + 1):
            assert set(records[step]) == {0, 1}, f"step {step}: not every rank trained"
            for rank, (images, _) in records[step].items():
                seen[rank] += images
                batch_sizes.append(len(images))
        assert min(batch_sizes) < BATCH, "no short bucket batch: the test no longer covers that case"
        assert not set(seen[0]) & set(seen[1]), f"epoch {epoch + 1}: ranks shared images {seen}"
        assert sorted(seen[0] + seen[1]) == list(range(num_images)), f"epoch {epoch + 1}: {seen}"


@pytest.mark.slow
def test_loss_log_has_every_step_once_with_the_mean_over_ranks(two_rank_run):
    run_dir, output = two_rank_run
    records = step_records(output)
    rows = log_rows(run_dir)
    config = run_config(run_dir)
    per_epoch = config["steps_per_epoch"]
    assert [int(row["step"]) for row in rows] == list(range(1, EPOCHS * per_epoch + 1))
    assert [int(row["epoch"]) for row in rows] == [i // per_epoch for i in range(len(rows))]
    epoch_rows = log_rows(run_dir, "training_log.csv")
    assert [(int(r["epoch"]), int(r["step"])) for r in epoch_rows] == [(e, (e + 1) * per_epoch) for e in range(EPOCHS)]
    for epoch_row in epoch_rows:
        step_losses = [float(r["loss"]) for r in rows if r["epoch"] == epoch_row["epoch"]]
        assert float(epoch_row["loss"]) == pytest.approx(sum(step_losses) / len(step_losses))
    for row in rows:
        rank_losses = [loss for _, loss in records[int(row["step"])].values()]
        assert len(rank_losses) == 2
        assert float(row["loss"]) == pytest.approx(sum(rank_losses) / 2, rel=1e-4, abs=1e-6)
    assert config["num_processes"] == 2
    assert config["effective_batch_size"] == 2 * BATCH


@pytest.mark.slow
def test_the_lora_is_written_once_and_loads(two_rank_run, tiny_model_dir):
    from diffusers import StableDiffusionXLPipeline

    run_dir, output = two_rank_run
    assert output.count("Finished: ") == 1, "the final save ran on more than one rank"
    folder = run_dir / "final_model"
    assert sorted(p.name for p in folder.iterdir()) == sorted([LORA_WEIGHT_NAME, "final_model_info.json"])
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")], "temporary files left behind"
    weights = read_tensors(folder / LORA_WEIGHT_NAME)
    up_weights = [value for key, value in weights.items() if "lora.up" in key or "lora_B" in key]
    assert up_weights and any(value.abs().max() > 0 for value in up_weights), "the LoRA did not train"

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    embeds, pooled = torch.randn(1, 77, 64), torch.randn(1, 32)
    cond = {"text_embeds": pooled, "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]])}
    with torch.no_grad():
        before = pipe.unet(latents, 500, embeds, added_cond_kwargs=cond).sample
        pipe.load_lora_weights(str(folder))
        after = pipe.unet(latents, 500, embeds, added_cond_kwargs=cond).sample
    assert pipe.get_active_adapters(), "no adapter active after load_lora_weights"
    assert not torch.allclose(before, after, atol=1e-6), "the loaded LoRA does not change the UNet"


@pytest.mark.slow
def test_resume_under_two_processes_matches_the_straight_run(two_rank_run, tiny_model_dir, tiny_dataset_dir,
                                                             tmp_path):
    straight, straight_output = two_rank_run
    assert 3 % run_config(straight)["steps_per_epoch"], "checkpoint-3 should fall inside an epoch"
    copy = tmp_path / "resumed" / straight.name
    shutil.copytree(straight, copy)
    shutil.rmtree(copy / "final_model")  # so that the comparison below sees what the resumed run wrote
    output = launch_two_processes(tiny_model_dir, tiny_dataset_dir, tmp_path / "resumed",
                                  "--resume_from_checkpoint", str(copy / "checkpoints" / "checkpoint-3"))
    assert only_run_dir(tmp_path / "resumed") == copy
    resumed_records, straight_records = step_records(output), step_records(straight_output)
    later_steps = list(range(4, run_config(straight)["max_train_steps"] + 1))
    assert sorted(resumed_records) == later_steps
    for step in later_steps:  # the same images on the same ranks after the restart, mid-epoch included
        assert ({r: images for r, (images, _) in resumed_records[step].items()}
                == {r: images for r, (images, _) in straight_records[step].items()})
    for name in ("training_steps.csv", "training_log.csv"):
        resumed_rows, straight_rows = log_rows(copy, name), log_rows(straight, name)
        assert [row["step"] for row in resumed_rows] == [row["step"] for row in straight_rows], name
        for resumed_row, straight_row in zip(resumed_rows, straight_rows):
            assert float(resumed_row["loss"]) == pytest.approx(float(straight_row["loss"]), rel=1e-4, abs=1e-6)
    assert_same_lora(straight / "final_model" / LORA_WEIGHT_NAME, copy / "final_model" / LORA_WEIGHT_NAME)
