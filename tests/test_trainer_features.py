"""Trainer features: caching, buckets and SDXL conditioning, min-SNR, resume, text-encoder LoRA."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.helpers import assert_same_lora, csv_rows, only_run_dir, read_json, run_in_process
from utils.lora.files import LORA_WEIGHT_NAME, read_tensors

FAST = ["--resolution", "128", "--train_batch_size", "2", "--learning_rate", "1e-2", "--lr_warmup_steps", "0",
        "--lora_rank", "4", "--lora_alpha", "4", "--report_to", "none", "--save_steps", "100"]


def train(tiny_model_dir, dataset_dir, output_dir, *extra) -> Path:
    run_in_process("train_sdxl_lora.py", "--pretrained_model_name_or_path", str(tiny_model_dir),
               "--dataset_dir", str(dataset_dir), "--output_dir", str(output_dir), *FAST, *extra)
    return only_run_dir(output_dir)


def rows(run_dir, name: str = "training_steps.csv") -> list[dict]:
    return csv_rows(run_dir / "logs" / name)


def losses(run_dir) -> list[float]:
    return [float(row["loss"]) for row in rows(run_dir)]


def learning_rates(run_dir) -> list[float]:
    return [float(row["learning_rate"]) for row in rows(run_dir)]


@pytest.mark.slow
def test_cached_run_matches_uncached_run(tiny_model_dir, tiny_dataset_dir, tmp_path):
    common = ["--max_train_steps", "6", "--random_flip", "--caption_dropout", "0.3", "--noise_offset", "0.05"]
    cached = train(tiny_model_dir, tiny_dataset_dir, tmp_path / "cached", *common)
    uncached = train(tiny_model_dir, tiny_dataset_dir, tmp_path / "uncached", "--no-cache", *common)
    assert len(losses(cached)) == 6
    torch.testing.assert_close(torch.tensor(losses(cached)), torch.tensor(losses(uncached)), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_resumed_run_ends_with_the_same_weights(tiny_model_dir, tiny_dataset_dir, tmp_path):
    """Straight 8 steps vs. resumed from the step-4 checkpoint (mid-epoch, with accumulation)."""
    common = ["--max_train_steps", "8", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "4",
              "--random_flip", "--caption_dropout", "0.2", "--lr_scheduler", "linear"]
    straight = train(tiny_model_dir, tiny_dataset_dir, tmp_path / "straight", *common)
    copy = tmp_path / "resumed" / straight.name
    shutil.copytree(straight, copy)
    shutil.rmtree(copy / "final_model")
    shutil.rmtree(copy / "checkpoints" / "checkpoint-8")
    run_in_process("train_sdxl_lora.py", "--pretrained_model_name_or_path", str(tiny_model_dir),
                   "--dataset_dir", str(tiny_dataset_dir), "--output_dir", str(tmp_path / "resumed"), *FAST, *common,
               "--resume_from_checkpoint", "latest")
    assert_same_lora(straight / "final_model" / LORA_WEIGHT_NAME, copy / "final_model" / LORA_WEIGHT_NAME)
    assert losses(copy) == pytest.approx(losses(straight), rel=1e-5)
    # The per-epoch log too: epoch 1 (steps 4-6) was cut by the checkpoint at step 4, and its mean still
    # covers all three of its steps; epoch 2 is the partial last one.
    resumed_epochs, straight_epochs = rows(copy, "training_log.csv"), rows(straight, "training_log.csv")
    assert [(r["epoch"], r["step"]) for r in resumed_epochs] == [("0", "3"), ("1", "6"), ("2", "8")]
    assert [(r["epoch"], r["step"]) for r in straight_epochs] == [("0", "3"), ("1", "6"), ("2", "8")]
    assert [float(r["loss"]) for r in resumed_epochs] == pytest.approx([float(r["loss"]) for r in straight_epochs],
                                                                       rel=1e-5)
    # A checkpoint at an epoch's last step is written after that epoch's own work (log row, eval).
    state = read_json(straight / "checkpoints" / "checkpoint-8" / "training_state.json")
    final = read_json(straight / "final_model" / "final_model_info.json")
    assert state["last_eval_loss"] == final["final_eval_loss"]
    # The schedule counts optimizer steps: 12 images / batch 2 / accumulation 2 = 3 steps per epoch,
    # 8 steps in all, and the linear schedule reaches 0 at the last one.
    assert len(learning_rates(straight)) == 8 and learning_rates(straight)[-1] == 0.0


@pytest.mark.slow
def test_text_encoder_lora_loads_and_changes_prompt_embeddings(tiny_model_dir, tiny_dataset_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    run_dir = train(tiny_model_dir, tiny_dataset_dir, tmp_path / "te", "--max_train_steps", "4",
                    "--train_text_encoder", "--save_kohya")
    keys = read_tensors(run_dir / "final_model" / LORA_WEIGHT_NAME).keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("text_encoder_2.") for k in keys)
    kohya_keys = read_tensors(run_dir / "final_model" / "kohya_lora.safetensors").keys()
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_"):
        assert any(k.startswith(prefix) and k.endswith(".alpha") for k in kohya_keys), prefix
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir)
    before = pipe.encode_prompt("a village in ghibli style", do_classifier_free_guidance=False)
    pipe.load_lora_weights(run_dir / "final_model")
    after = pipe.encode_prompt("a village in ghibli style", do_classifier_free_guidance=False)
    assert (after[0] - before[0]).abs().max() > 1e-4  # prompt embeddings (both encoders)
    assert (after[2] - before[2]).abs().max() > 1e-4  # pooled embedding (second encoder)


def test_buckets_give_one_shape_per_batch_and_real_time_ids(tmp_path):
    from utils.training.buckets import make_buckets, nearest_bucket
    from utils.data.records import Example
    from utils.training.batches import BucketBatchSampler, PixelDataset, assign_buckets

    sizes = {"wide": (300, 100), "tall": (100, 300), "wide2": (320, 110), "tall2": (90, 290)}
    examples = []
    for name, size in sizes.items():
        Image.new("RGB", size, (200, 100, 50)).save(tmp_path / f"{name}.png")
        examples.append(Example(tmp_path / f"{name}.png", name))
    items = assign_buckets(examples, 128, use_buckets=True, seed=0)
    assert items[0].bucket == nearest_bucket(300, 100, make_buckets(128))
    assert items[0].bucket[0] > items[0].bucket[1] and items[1].bucket[0] < items[1].bucket[1]
    dataset = PixelDataset(items, center_crop=True)
    sampler = BucketBatchSampler([item.bucket for item in items], batch_size=2, seed=0)
    for batch in sampler:
        shapes = {dataset[i]["pixels"].shape for i in batch}
        assert len(shapes) == 1 and len(batch) == 2
    wide = dataset[0]
    width, height = items[0].bucket
    assert wide["pixels"].shape == (3, height, width)
    original_h, original_w, top, left, target_h, target_w = wide["time_ids"][0].tolist()
    assert (original_h, original_w) == (100, 300) and (target_h, target_w) == (height, width)
    # The mirrored image's crop is measured from the other edge.
    resized_w = round(300 * max(width / 300, height / 100))
    assert wide["time_ids"][1][3].item() == resized_w - left - width


def test_min_snr_weights_follow_the_formula():
    from diffusers import DDPMScheduler

    from utils.training.loss import min_snr_weights

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    timesteps = torch.tensor([0, 10, 200, 500, 999])
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    gamma = 5.0
    torch.testing.assert_close(min_snr_weights(scheduler, timesteps, gamma), torch.clamp(snr, max=gamma) / snr)
    scheduler.register_to_config(prediction_type="v_prediction")
    torch.testing.assert_close(min_snr_weights(scheduler, timesteps, gamma),
                               torch.clamp(snr, max=gamma) / (snr + 1))
    weights = min_snr_weights(DDPMScheduler(beta_schedule="scaled_linear"), timesteps, gamma)
    assert weights[0] < 1 and weights[-1] == 1  # low-noise steps are damped, high-noise steps kept


def test_bucket_assignment_reads_the_upright_size_without_decoding(tmp_path):
    from utils.data.images import open_rgb, upright_size

    image = Image.new("RGB", (300, 100), (10, 20, 30))
    exif = image.getexif()
    exif[0x0112] = 6  # rotated 90°: shown as 100 wide, 300 tall
    image.save(tmp_path / "rotated.jpg", exif=exif)
    image.save(tmp_path / "plain.png")
    assert upright_size(tmp_path / "rotated.jpg") == open_rgb(tmp_path / "rotated.jpg").size == (100, 300)
    assert upright_size(tmp_path / "plain.png") == (300, 100)


@pytest.mark.slow
def test_product_dataset_in_the_original_layout_trains_at_resolution_72(tiny_model_dir, tiny_product_dataset_dir,
                                                                         tmp_path):
    """captions.json {"id": {"product", "prompt"}} + products/ + styled/{id}.png, at a multiple of 8 only."""
    run_dir = train(tiny_model_dir, tiny_product_dataset_dir, tmp_path / "product", "--dataset_type", "product",
                    "--resolution", "72", "--max_train_steps", "2")
    assert "_product_r4_" in run_dir.name
    config = read_json(run_dir / "experiment_config.json")
    assert config["num_train_images"] == 4 and config["resolution"] == 72
    assert [int(r["step"]) for r in rows(run_dir)] == [1, 2]
    assert (run_dir / "final_model" / LORA_WEIGHT_NAME).is_file()


def test_resolution_must_be_a_multiple_of_8(tiny_model_dir, tiny_dataset_dir, tmp_path):
    result = run_in_process("train_sdxl_lora.py", "--pretrained_model_name_or_path", str(tiny_model_dir),
                            "--dataset_dir", str(tiny_dataset_dir), "--output_dir", str(tmp_path / "out"),
                            "--resolution", "100", check=False)
    assert result.returncode == 2
    assert "error: --resolution 100 must be a positive multiple of 8" in result.stderr
    assert not (tmp_path / "out").exists()


def test_square_training_crops_the_centre_at_exactly_the_resolution(tmp_path):
    """The original's Resize(resolution) + CenterCrop(resolution); random crops only with --random_crop."""
    from train_sdxl_lora import parse_args
    from utils.training.buckets import make_buckets
    from utils.data.records import Example
    from utils.training.batches import PixelDataset, assign_buckets

    assert parse_args([]).center_crop is True
    assert parse_args(["--center_crop"]).center_crop is True
    assert parse_args(["--random_crop"]).center_crop is False
    with pytest.raises(SystemExit):
        parse_args(["--center_crop", "--random_crop"])

    Image.new("RGB", (300, 100), (200, 100, 50)).save(tmp_path / "wide.png")
    Image.new("RGB", (90, 270), (20, 100, 50)).save(tmp_path / "tall.png")
    examples = [Example(tmp_path / "wide.png", "wide"), Example(tmp_path / "tall.png", "tall")]
    items = assign_buckets(examples, 72, use_buckets=False, seed=0)
    assert [item.bucket for item in items] == [(72, 72), (72, 72)]
    centred = PixelDataset(items, center_crop=True)
    wide, tall = centred[0], centred[1]
    assert wide["pixels"].shape == tall["pixels"].shape == (3, 72, 72)
    # (original h, w, crop top, crop left, target h, w): short side resized to 72, the centre kept.
    assert wide["time_ids"][0].tolist() == [100, 300, 0, (216 - 72) // 2, 72, 72]
    assert tall["time_ids"][0].tolist() == [270, 90, (216 - 72) // 2, 0, 72, 72]
    random_lefts = {PixelDataset(assign_buckets(examples, 72, False, seed), center_crop=False)[0]["time_ids"][0][3]
                    .item() for seed in range(6)}
    assert len(random_lefts) > 1
    # With buckets, square images still train at exactly the resolution, other sides are multiples of 64.
    buckets = make_buckets(800)
    assert (800, 800) in buckets and all(w % 64 == 0 and h % 64 == 0 for w, h in buckets if w != h)
