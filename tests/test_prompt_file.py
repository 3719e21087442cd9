"""Prompt files with kohya's inline options: parsed, used by the validation images and by
inference_sdxl_ghibli.py --prompts_file, where the options reach the images (size, steps, seed)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import only_run_dir, pixels
from utils.core.prompt_file import PromptFileError, PromptSpec, parse_prompt_line, read_prompt_file


def test_inline_options_are_parsed_and_missing_ones_are_none(tmp_path):
    assert parse_prompt_line("a cat, ghibli --n blurry, dark --w 64 --h 32 --s 3 --l 6.5 --d 11") == PromptSpec(
        "a cat, ghibli", "blurry, dark", 64, 32, 3, 6.5, 11)
    assert parse_prompt_line("  just a prompt ") == PromptSpec("just a prompt")
    path = tmp_path / "prompts.txt"
    path.write_text("# a comment\n\nfirst --d 3\nsecond --q ignored\n")
    assert read_prompt_file(path) == [PromptSpec("first", seed=3), PromptSpec("second")]
    path.write_text("x --w wide\n")
    with pytest.raises(PromptFileError, match=r"prompts.txt line 1: --w 'wide' is not a int"):
        read_prompt_file(path)


def run_inference(tiny_model_dir, out, *flags):
    from inference_sdxl_ghibli import main
    assert main(["--pretrained_model_name_or_path", str(tiny_model_dir), "--run_base_inference", "--num_images", "1",
                 "--output_dir", str(out), "--base_results_dir", "", "--device", "cpu", *flags]) == 0
    (metadata,) = sorted(out.glob("metadata_prompt2_*.json")) or [None]
    return sorted(out.glob("base_prompt*_*.png")), metadata


def test_prompts_file_options_reach_the_generated_images(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no output_ghibli here: base images only
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a village --h 64 --w 64 --s 2\na cat on a roof --w 64 --h 32 --s 3 --d 7 --n dark\n")
    images, metadata = run_inference(tiny_model_dir, tmp_path / "file", "--prompts_file", str(prompts),
                                     "--num_inference_steps", "5", "--height", "48", "--width", "48")
    assert [pixels(path).shape for path in images] == [(64, 64, 3), (32, 64, 3)]
    meta = json.loads(metadata.read_text())
    assert (meta["num_inference_steps"], meta["seed"], meta["seeds"], meta["negative_prompt"]) == (3, 7, [7], "dark")
    # The same image from the flags alone: the line's size, steps, seed and negative prompt were used.
    (alone,), _ = run_inference(tiny_model_dir, tmp_path / "flags", "--prompt", "a cat on a roof", "--width", "64",
                                "--height", "32", "--num_inference_steps", "3", "--seed", "7", "--negative_prompt",
                                "dark")
    assert (pixels(alone) == pixels(images[1])).all()


@pytest.mark.slow
def test_validation_images_follow_the_prompt_file(tiny_model_dir, tiny_dataset_dir, tmp_path):
    from utils.training.flags import parse_training_args
    from utils.training.recipe import train

    prompts = tmp_path / "validation.txt"
    prompts.write_text("a village --w 64 --h 32 --s 2 --d 5\na village --w 64 --h 32 --s 2 --d 5\n"
                       "a village --w 64 --h 32 --s 2 --d 6\na cat --s 2 --n blurry\n")
    run_dir = train(parse_training_args([
        "--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_dir", str(tiny_dataset_dir),
        "--output_dir", str(tmp_path / "runs"), "--resolution", "32", "--max_train_steps", "1",
        "--train_batch_size", "2", "--report_to", "none", "--mixed_precision", "no", "--eval_loss_epochs", "0",
        "--lr_warmup_steps", "0", "--num_validation_images", "1", "--validation_prompts_file", str(prompts)]))
    assert run_dir == only_run_dir(tmp_path / "runs")
    images = [pixels(run_dir / "validation" / f"epoch_001_prompt{k}_0.png") for k in range(4)]
    assert [image.shape for image in images] == [(32, 64, 3)] * 3 + [(32, 32, 3)]  # the last: --resolution
    assert (images[0] == images[1]).all() and not (images[0] == images[2]).all()  # --d seeds the image
