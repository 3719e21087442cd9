"""Faults that must never cost a run: SIGTERM, kill -9 during a checkpoint save, NaN losses."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, assert_same_lora, only_run_dir, run_in_process, wait_for
from utils.lora.files import LORA_WEIGHT_NAME, read_tensors
from utils.training.checkpoints import checkpoints_of
from utils.training.loss_log import read_rows

ARGS = ["--resolution", "128", "--train_batch_size", "2", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
        "--lora_rank", "4", "--lora_alpha", "8", "--report_to", "none", "--save_steps", "100",
        "--max_train_steps", "16", "--random_flip", "--lr_scheduler", "cosine"]


def command(tiny_model_dir, dataset_dir, output_dir, *extra) -> list[str]:
    return [sys.executable, str(ROOT / "train_sdxl_lora.py"), "--pretrained_model_name_or_path", str(tiny_model_dir),
            "--dataset_dir", str(dataset_dir), "--output_dir", str(output_dir), *ARGS, *extra]


def step_rows(output_dir: Path) -> int:
    """How many step rows the run under ``output_dir`` has logged so far."""
    runs = [p for p in output_dir.glob("*/logs/training_steps.csv")]
    return len(read_rows(runs[0])) if runs else 0


def log_rows(run_dir: Path, name: str) -> list[tuple[int, int, float]]:
    """(epoch, step, loss) of each row of logs/{name}."""
    return [(int(r["epoch"]), int(r["step"]), float(r["loss"])) for r in read_rows(run_dir / "logs" / name)]


@pytest.mark.slow
def test_sigterm_saves_state_and_resume_matches_an_uninterrupted_run(tiny_model_dir, tiny_dataset_dir, tmp_path):
    run_in_process(*command(tiny_model_dir, tiny_dataset_dir, tmp_path / "straight")[1:])
    straight = only_run_dir(tmp_path / "straight")
    output = tmp_path / "interrupted"
    process = subprocess.Popen(command(tiny_model_dir, tiny_dataset_dir, output), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for(lambda: step_rows(output) >= 3, 300, "three logged steps", process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Resume with:" in stderr and "--resume_from_checkpoint" in stderr
    run_dir = only_run_dir(output)
    stopped_at = int(checkpoints_of(run_dir)[-1].name.split("-")[1])
    assert 3 <= stopped_at < 16
    assert (run_dir / "interrupted_model" / LORA_WEIGHT_NAME).is_file()
    # 12 images in batches of 2: epochs end at steps 6 and 12, and the 16th step ends the partial epoch 2.
    assert [step for _, step, _ in log_rows(run_dir, "training_steps.csv")] == list(range(1, stopped_at + 1))
    assert [step for _, step, _ in log_rows(run_dir, "training_log.csv")] == [s for s in (6, 12) if s <= stopped_at]

    run_in_process(*command(tiny_model_dir, tiny_dataset_dir, output, "--resume_from_checkpoint", "latest")[1:])
    assert_same_lora(straight / "final_model" / LORA_WEIGHT_NAME, run_dir / "final_model" / LORA_WEIGHT_NAME)
    assert not (run_dir / "interrupted_model").exists()  # the stop's LoRA does not stay beside the final one
    for name, expected in (("training_steps.csv", [(i // 6, i + 1) for i in range(16)]),
                           ("training_log.csv", [(0, 6), (1, 12), (2, 16)])):
        resumed, uninterrupted = log_rows(run_dir, name), log_rows(straight, name)
        assert [(epoch, step) for epoch, step, _ in resumed] == expected, name
        assert [(epoch, step) for epoch, step, _ in uninterrupted] == expected, name
        assert [loss for *_, loss in resumed] == pytest.approx([loss for *_, loss in uninterrupted], rel=1e-5)


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_save_leaves_the_previous_one_intact(tiny_model_dir, tiny_dataset_dir, tmp_path):
    output = tmp_path / "killed"
    process = subprocess.Popen(command(tiny_model_dir, tiny_dataset_dir, output, "--checkpointing_steps", "2"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def saving_after_a_complete_checkpoint() -> bool:
        runs = [p for p in output.glob("*/checkpoints")] if output.exists() else []
        return bool(runs) and bool(checkpoints_of(runs[0].parent)) and any(runs[0].glob(".checkpoint-*.tmp"))

    wait_for(saving_after_a_complete_checkpoint, 300, "a checkpoint save after a complete one", process)
    process.kill()
    process.wait()
    run_dir = only_run_dir(output)
    complete = checkpoints_of(run_dir)
    assert complete, "the earlier checkpoint must survive"
    newest = complete[-1]
    assert (newest / "lora_unet.safetensors").is_file() and (newest / "optimizer.bin").is_file()
    read_tensors(newest / "lora_unet.safetensors")  # loads: not truncated

    result = run_in_process(*command(tiny_model_dir, tiny_dataset_dir, output, "--checkpointing_steps", "2",
                                     "--resume_from_checkpoint", "latest")[1:])
    assert f"Resumed from {newest}" in result.stderr
    assert not list((run_dir / "checkpoints").glob(".checkpoint-*.tmp"))
    assert (run_dir / "final_model" / LORA_WEIGHT_NAME).is_file()


@pytest.mark.slow
def test_nonfinite_losses_stop_training_without_writing_nan_weights(tiny_model_dir, tiny_dataset_dir, tmp_path):
    output = tmp_path / "blowup"
    result = run_in_process(*command(tiny_model_dir, tiny_dataset_dir, output, "--learning_rate", "1e12")[1:],
                            check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert "NaN/Inf" in line and "--learning_rate" in line and "fp16" in line
    assert "Traceback" not in result.stderr
    run_dir = only_run_dir(output)
    assert not (run_dir / "final_model").exists()
    for path in run_dir.rglob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in read_tensors(path).values()), path


def test_refuses_to_save_nan_lora(tiny_model_dir, tmp_path):
    import pytest
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from utils.lora.files import save_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]))
    with torch.no_grad():
        next(p for n, p in unet.named_parameters() if "lora_B" in n).fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        save_lora(tmp_path / "best_model", unet)
    assert not (tmp_path / "best_model").exists()
