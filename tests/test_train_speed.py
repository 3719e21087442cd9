"""Fast by default: the gradient-checkpointing decision, the evaluation budget, step losses read without a
host sync per step, the device-side skip of non-finite steps, and the disk cache shared by later runs."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import run_in_process
from utils.training.evaluation import EVAL_BUDGET, plan_evaluation
from utils.training.loss_log import StepLosses
from utils.training.memory import GIB, choose_gradient_checkpointing, estimate_activation_bytes


def test_gradient_checkpointing_flag_keeps_the_original_form_and_defaults_to_auto():
    from train_sdxl_lora import parse_args

    assert parse_args([]).gradient_checkpointing == "auto"
    assert parse_args(["--gradient_checkpointing"]).gradient_checkpointing is True  # the original's flag
    assert parse_args(["--gradient_checkpointing", "--resolution", "64"]).gradient_checkpointing is True
    assert parse_args(["--no-gradient_checkpointing"]).gradient_checkpointing is False
    assert parse_args(["--gradient_checkpointing", "off"]).gradient_checkpointing is False
    with pytest.raises(SystemExit):
        parse_args(["--gradient_checkpointing", "--no-gradient_checkpointing"])


def test_auto_checkpointing_is_off_on_cpu_and_on_a_gpu_only_when_the_step_does_not_fit():
    assert choose_gradient_checkpointing(True, "cpu")[0] is True
    assert choose_gradient_checkpointing(False, "cuda", GIB, 100 * GIB)[0] is False
    on, reason = choose_gradient_checkpointing("auto", "cpu")
    assert on is False and "CPU" in reason
    on, reason = choose_gradient_checkpointing("auto", "cuda", free_bytes=80 * GIB, activation_bytes=20 * GIB)
    assert on is False and "fits" in reason and "20.0 GiB" in reason
    on, reason = choose_gradient_checkpointing("auto", "cuda", free_bytes=16 * GIB, activation_bytes=20 * GIB)
    assert on is True and "would not fit" in reason


def test_activation_estimate_grows_with_resolution_and_batch(tiny_model_dir):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    config = UNet2DConditionModel.load_config(tiny_model_dir, subfolder="unet")

    def estimate(resolution: int, batch: int, dtype=torch.float32) -> int:
        lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"])
        return estimate_activation_bytes(config, resolution, batch, dtype, lora)

    small = estimate(128, 1)
    assert small > 0
    assert 3.0 < estimate(256, 1) / small < 6.0  # activations follow the pixel count (attention adds a little)
    assert estimate(128, 2) == pytest.approx(2 * small, rel=0.05)
    assert estimate(128, 1, torch.bfloat16) < small


@pytest.mark.parametrize("steps, batch, epochs", [(16, 1, 2), (48, 4, 8), (16, 4, 1), (1000, 1, 10), (2500, 4, 100)])
def test_evaluation_costs_at_most_five_percent_and_always_measures_before_and_after(steps, batch, epochs):
    plan = plan_evaluation(steps * batch, epochs)
    assert plan.measurements >= 2 and plan.samples >= 1
    assert plan.after_epoch(epochs - 1, epochs - 1)  # the loss after training is always measured
    assert plan.share <= EVAL_BUDGET + 1e-9 or plan.samples == 1


def test_evaluation_plan_for_a_100_image_10_epoch_run_measures_every_epoch():
    plan = plan_evaluation(100 * 10, 10)
    assert plan.every_epochs == 1 and plan.measurements == 11 and 8 <= plan.samples <= 32
    assert plan.share <= EVAL_BUDGET
    small = plan_evaluation(16, 2)  # the 16-step demo: only before and after, on what the budget buys
    assert small.every_epochs == 2 and small.measurements == 2
    assert small.share <= EVAL_BUDGET + 1e-9 or small.samples == 1  # one triple is the least it can measure
    assert plan_evaluation(1000, 10, every=0).every_epochs == 0  # off
    explicit = plan_evaluation(1000, 10, every=1, samples=32)
    assert (explicit.every_epochs, explicit.samples, explicit.measurements) == (1, 32, 11)


def test_step_losses_are_read_in_one_transfer_every_n_steps_with_their_skip_flags():
    losses = StepLosses(read_every=4)
    values = [1.0, float("nan"), 0.5, 0.25, 0.125, 0.0625]
    read = []
    for step, value in enumerate(values, start=1):
        loss = torch.tensor(value)
        losses.add(0, step, 1e-3, loss, ~torch.isfinite(loss))
        if losses.due(step):
            read += losses.read()
    assert [r.step for r in read] == [1, 2, 3, 4] and len(losses.pending) == 2
    read += losses.read()  # e.g. at the epoch's end
    assert [r.step for r in read] == list(range(1, 7))
    assert [r.skipped for r in read] == [False, True, False, False, False, False]
    assert read[0].loss == 1.0 and read[5].loss == 0.0625
    assert losses.read() == [] and not losses.pending


def test_a_nonfinite_step_is_skipped_on_the_device_without_reading_the_flag():
    """The protocol recipe.train_step uses with the fused AdamW: ``found_inf`` set from the step's device flag
    (never read by the host) means no update of the weights, the moments or the step count."""
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)

    def step(loss_value: float) -> torch.Tensor:
        loss = (weight * loss_value).sum()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([weight], 1.0)
        skipped = ~torch.isfinite(loss.detach()) | ~torch.isfinite(norm)
        optimizer.grad_scale, optimizer.found_inf = None, skipped.float()
        optimizer.step()
        del optimizer.found_inf, optimizer.grad_scale
        optimizer.zero_grad(set_to_none=True)
        return skipped

    assert not step(1.0)
    after_good = weight.detach().clone()
    state = {k: v.clone() for k, v in optimizer.state[weight].items()}
    assert step(float("nan"))
    torch.testing.assert_close(weight.detach(), after_good)
    for key, value in optimizer.state[weight].items():
        torch.testing.assert_close(value, state[key])
    assert not step(1.0) and not torch.equal(weight.detach(), after_good)


FAST = ["--resolution", "64", "--train_batch_size", "4", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
        "--lora_rank", "4", "--lora_alpha", "4", "--report_to", "none", "--save_steps", "100",
        "--max_train_steps", "3", "--cache_latents_to_disk", "--eval_loss_epochs", "0"]


@pytest.mark.slow
def test_a_later_run_reads_the_disk_cache_and_evaluation_off_selects_by_training_loss(tiny_model_dir,
                                                                                      tiny_dataset_dir, tmp_path):
    common = ["train_sdxl_lora.py", "--pretrained_model_name_or_path", str(tiny_model_dir),
              "--dataset_dir", str(tiny_dataset_dir), "--output_dir", str(tmp_path), *FAST]
    first = run_in_process(*common, "--lora_rank", "2")
    second = run_in_process(*common)
    assert "Text embeddings read from" not in first.stderr
    assert "Text embeddings read from" in second.stderr
    cache = tmp_path / ".latent_cache"
    assert len(list(cache.glob("text_*.safetensors"))) == 1 and len(list(cache.glob("*.safetensors"))) == 13
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name.endswith("_r4_a4.0_lr0.001")]
    best = json.loads((run_dir / "best_model" / "best_model_info.json").read_text())
    assert best["selected_by"] == "train_loss" and best["eval_loss"] is None
    final = json.loads((run_dir / "final_model" / "final_model_info.json").read_text())
    assert final["initial_eval_loss"] is None and final["final_eval_loss"] is None
    config = json.loads((run_dir / "experiment_config.json").read_text())
    assert config["resolved_gradient_checkpointing"] is False and config["gradient_checkpointing"] == "auto"
    timings = json.loads((run_dir / "logs" / "timings.json").read_text())
    assert timings["steps"] == 3 and 0 < timings["time_to_first_step_s"] < timings["wall_s"]
    assert {"model loading", "caching"} <= set(timings["setup_phases_s"])
    assert "Gradient checkpointing off: auto: off on CPU" in second.stderr
