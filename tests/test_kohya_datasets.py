"""kohya-style dataset folders: N_name/ repeat counts, caption extensions, one report per run."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import assert_same_lora, csv_rows, free_port, only_run_dir, read_json, run_in_process, run_script
from utils import check_dataset, convert_dataset
from utils.data import preflight
from utils.data.listing import list_dataset
from utils.data.records import kohya_repeats
from utils.lora.files import LORA_WEIGHT_NAME
from utils.training.batches import BucketBatchSampler

# Batch 1, resolution 64, constant-free linear schedule: every step's learning rate is known.
TINY = ["--resolution", "64", "--train_batch_size", "1", "--learning_rate", "1e-2", "--lr_scheduler", "linear",
        "--lr_warmup_steps", "0", "--lora_rank", "4", "--lora_alpha", "4", "--report_to", "none",
        "--save_steps", "100", "--mixed_precision", "no"]


def write_image(path: Path, seed: int, size: tuple[int, int] = (64, 64)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_kohya(folder: Path, layout: dict[str, int], extension: str = ".txt") -> Path:
    """``layout``: sub-folder -> number of images, each with a caption file of ``extension``."""
    seed = 0
    for sub, count in layout.items():
        for index in range(count):
            seed += 1
            image = folder / sub / f"img{index}.png"
            write_image(image, seed)
            image.with_suffix(extension).write_text(f"{sub.split('_')[-1]} picture {index}, ghibli style\n")
    return folder


def rows(run_dir: Path, name: str) -> list[dict]:
    return csv_rows(run_dir / "logs" / name)


def train(model: Path, dataset: Path, output: Path, *extra: str) -> tuple[Path, str]:
    result = run_in_process("train_sdxl_lora.py", "--pretrained_model_name_or_path", str(model),
                            "--dataset_dir", str(dataset), "--output_dir", str(output), *TINY, *extra)
    return only_run_dir(output), result.stdout + result.stderr


# ----------------------------------------------------------------------------- listing and report


def test_repeat_count_is_the_number_before_the_first_underscore():
    assert kohya_repeats("10_ghibli") == 10
    assert kohya_repeats("3_two_words") == 3
    assert kohya_repeats("0_off") == 0
    assert kohya_repeats("7") == 7  # kohya: int(name.split("_")[0])
    for name in ("style", "v2_style", "_x", "-1_x", "1x_style", "ghibli_10"):
        assert kohya_repeats(name) is None, name


def test_folders_give_repeats_and_the_report_shows_them(tmp_path):
    dataset = write_kohya(tmp_path / "data", {"3_style": 3, "1_other": 2, "plain": 1, "0_off": 2})
    write_image(dataset / "root.png", 99)
    (dataset / "root.txt").write_text("at the root")
    write_image(dataset / "3_style" / "deeper" / "d.png", 98)  # nested: the top-level folder counts
    (dataset / "3_style" / "deeper" / "d.txt").write_text("deeper")
    report = preflight.check(list_dataset("auto", dataset))
    assert report.problems == []
    repeats = {e.image_path.relative_to(dataset).as_posix(): (e.folder, e.repeats) for e in report.examples}
    assert repeats == {"1_other/img0.png": ("1_other", 1), "1_other/img1.png": ("1_other", 1),
                       "3_style/img0.png": ("3_style", 3), "3_style/img1.png": ("3_style", 3),
                       "3_style/img2.png": ("3_style", 3), "3_style/deeper/d.png": ("3_style", 3),
                       "plain/img0.png": ("plain", 1), "root.png": (".", 1)}
    lines = report.lines()
    assert "0_off/: repeat count 0, its 2 image(s) left out (as kohya does)" in lines
    assert "folder 3_style/: 4 image(s) x 3 repeat(s) = 12 seen per epoch" in lines
    assert "folder 1_other/: 2 image(s) x 1 repeat(s) = 2 seen per epoch" in lines
    assert "folder plain/: 1 image(s) x 1 repeat(s) = 1 seen per epoch" in lines
    assert "images seen per epoch: 16 (8 distinct)" in lines


def test_caption_extension_and_the_line_for_an_image_without_one(tmp_path, capsys):
    dataset = write_kohya(tmp_path / "data", {"2_style": 2}, extension=".caption")
    write_image(dataset / "2_style" / "bare.png", 50)
    with_txt = list_dataset("kohya", dataset)  # the default .txt finds no caption
    assert [str(p) for p in preflight.check(with_txt).problems] == [
        "2_style/bare.png: image without caption (no 2_style/bare.txt)",
        "2_style/img0.png: image without caption (no 2_style/img0.txt; 2_style/img0.caption exists: "
        "use --caption_extension .caption)",
        "2_style/img1.png: image without caption (no 2_style/img1.txt; 2_style/img1.caption exists: "
        "use --caption_extension .caption)"]
    report = preflight.check(list_dataset("kohya", dataset, caption_extension=".caption"))
    assert [str(p) for p in report.problems] == ["2_style/bare.png: image without caption (no 2_style/bare.caption)"]
    assert sorted(e.caption for e in report.examples) == ["style picture 0, ghibli style",
                                                          "style picture 1, ghibli style"]
    (dataset / "2_style" / "lonely.caption").write_text("no image")
    assert check_dataset.main(["--dataset_dir", str(dataset), "--caption_extension", "caption"]) == 1
    out = capsys.readouterr().out
    assert "2_style/lonely.caption: caption without image (no image file of the same name)" in out
    assert "folder 2_style/: 2 image(s) x 2 repeat(s) = 4 seen per epoch" in out


def test_sampler_draws_each_image_its_repeats_per_epoch():
    sampler = BucketBatchSampler([(64, 64)] * 3 + [(64, 128)] * 2, 2, seed=0, repeats=[3, 3, 3, 1, 1])
    for epoch in range(3):
        sampler.use_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 5 + 1  # 9 square draws in 5 batches, 2 tall ones in 1
        drawn = sorted(i for batch in batches for i in batch)
        assert drawn == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 4]
        assert all(len({i < 3 for i in batch}) == 1 for batch in batches), "a batch mixed buckets"


def test_converter_keeps_repeats_and_says_when_a_layout_cannot(tmp_path, caplog):
    dataset = write_kohya(tmp_path / "data", {"3_style": 2, "1_other": 1, "0_off": 1}, extension=".caption")
    assert convert_dataset.main(["--dataset_dir", str(dataset), "--caption_extension", ".caption", "--to", "kohya",
                                 "--output_dir", str(tmp_path / "kohya")]) == 0
    kohya = preflight.check(list_dataset("auto", tmp_path / "kohya"))
    assert [(c.folder, c.images, c.repeats) for c in kohya.folders()] == [("1_other", 1, 1), ("3_style", 2, 3)]
    assert not (tmp_path / "kohya" / "0_off").exists()
    caplog.clear()
    assert convert_dataset.main(["--dataset_dir", str(tmp_path / "kohya"), "--to", "ghibli",
                                 "--output_dir", str(tmp_path / "ghibli")]) == 0
    assert "the ghibli layout has no repeat counts" in caplog.text and "3_style/ x3" in caplog.text
    ghibli = preflight.check(list_dataset("auto", tmp_path / "ghibli"))
    assert ghibli.folders() == [] and len(ghibli.usable) == 3  # trained as ghibli: once each
    assert convert_dataset.main(["--dataset_dir", str(tmp_path / "ghibli"), "--to", "kohya",
                                 "--output_dir", str(tmp_path / "back")]) == 0
    back = preflight.check(list_dataset("auto", tmp_path / "back"))
    assert [(c.folder, c.images, c.repeats) for c in back.folders()] == [("1_other", 1, 1), ("3_style", 2, 3)]


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def repeated_dataset(tmp_path_factory) -> Path:
    """3_style/ with 3 images and 1_other/ with 2, captions in kohya's .caption files."""
    return write_kohya(tmp_path_factory.mktemp("kohya") / "train", {"3_style": 3, "1_other": 2}, ".caption")


@pytest.fixture(scope="module")
def straight_run(tiny_model_dir, repeated_dataset, tmp_path_factory) -> tuple[Path, str]:
    """Two epochs at batch 1: 3x3 + 2x1 = 11 optimizer steps each, a resumable state at step 5."""
    return train(tiny_model_dir, repeated_dataset, tmp_path_factory.mktemp("straight"), "--dataset_type", "auto",
                 "--caption_extension", ".caption", "--num_train_epochs", "2", "--checkpointing_steps", "5",
                 "--cache_latents_to_disk")


def test_repeats_set_the_steps_the_csvs_and_the_schedule(straight_run):
    run_dir, output = straight_run
    config = read_json(run_dir / "experiment_config.json")
    assert config["steps_per_epoch"] == 11 and config["max_train_steps"] == 22
    assert config["num_train_images"] == 5 and config["images_seen_per_epoch"] == 11
    assert config["dataset_folders"] == [
        {"folder": "1_other", "images": 2, "repeats": 1, "images_per_epoch": 2},
        {"folder": "3_style", "images": 3, "repeats": 3, "images_per_epoch": 9}]
    assert config["dataset_type"] == "kohya" and config["caption_extension"] == ".caption"
    steps = rows(run_dir, "training_steps.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, 23))
    assert [int(r["epoch"]) for r in steps] == [0] * 11 + [1] * 11
    # Linear decay over 22 steps: the learning rate logged after step s is 1e-2 * (1 - s / 22).
    assert [float(r["learning_rate"]) for r in steps] == pytest.approx([1e-2 * (1 - s / 22) for s in range(1, 23)])
    epochs = rows(run_dir, "training_log.csv")
    assert [(int(r["epoch"]), int(r["step"])) for r in epochs] == [(0, 11), (1, 22)]
    for epoch_row in epochs:
        losses = [float(r["loss"]) for r in steps if r["epoch"] == epoch_row["epoch"]]
        assert float(epoch_row["loss"]) == pytest.approx(sum(losses) / len(losses))
    # The latent cache holds each image once (files named by a 32-digit key), however often it is repeated.
    cached = (run_dir.parent / ".latent_cache").glob("*.safetensors")
    latents = [p for p in cached if re.fullmatch(r"[0-9a-f]{32}", p.stem)]
    assert len(latents) == 5
    assert output.count("Dataset check: folder 3_style/: 3 image(s) x 3 repeat(s) = 9 seen per epoch") == 1
    assert "5 training images (0 held out), 11 seen per epoch, 22 optimizer steps" in output


@pytest.mark.slow
def test_resume_mid_epoch_with_repeats_matches_the_straight_run(straight_run, tiny_model_dir, repeated_dataset,
                                                                tmp_path):
    straight, _ = straight_run
    copy = tmp_path / "resumed" / straight.name
    shutil.copytree(straight, copy)
    shutil.rmtree(copy / "final_model")
    for later in ("checkpoint-10", "checkpoint-15", "checkpoint-20"):
        shutil.rmtree(copy / "checkpoints" / later)
    run_in_process("train_sdxl_lora.py", "--pretrained_model_name_or_path", str(tiny_model_dir),
                   "--dataset_dir", str(repeated_dataset), "--output_dir", str(tmp_path / "resumed"), *TINY,
                   "--dataset_type", "auto", "--caption_extension", ".caption", "--num_train_epochs", "2",
                   "--checkpointing_steps", "5", "--resume_from_checkpoint",
                   str(copy / "checkpoints" / "checkpoint-5"))
    for name in ("training_steps.csv", "training_log.csv"):
        resumed_rows, straight_rows = rows(copy, name), rows(straight, name)
        assert [r["step"] for r in resumed_rows] == [r["step"] for r in straight_rows], name
        assert [float(r["loss"]) for r in resumed_rows] == pytest.approx(
            [float(r["loss"]) for r in straight_rows], rel=1e-5), name
    assert_same_lora(straight / "final_model" / LORA_WEIGHT_NAME, copy / "final_model" / LORA_WEIGHT_NAME)


@pytest.mark.slow
def test_two_processes_report_the_dataset_once(tiny_model_dir, repeated_dataset, tmp_path):
    result = run_script(
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "train_sdxl_lora.py", "--pretrained_model_name_or_path", str(tiny_model_dir),
        "--dataset_dir", str(repeated_dataset), "--output_dir", str(tmp_path / "ddp"), *TINY,
        "--dataset_type", "kohya", "--caption_extension", ".caption", "--max_train_steps", "2",
        env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}, timeout=900)
    output = result.stdout + result.stderr
    assert output.count("Dataset check: 5 of 5 entries usable") == 1, output[-4000:]
    assert output.count("Dataset check: folder 3_style/: 3 image(s) x 3 repeat(s)") == 1
    assert output.count("Dataset check: images seen per epoch: 11 (5 distinct)") == 1
    assert output.count("5 training images (0 held out), 11 seen per epoch") == 1
    config = read_json(only_run_dir(tmp_path / "ddp") / "experiment_config.json")
    assert config["num_processes"] == 2 and config["images_seen_per_epoch"] == 11
    assert config["steps_per_epoch"] == 6  # 11 batches of one, shared by two processes


def test_bucket_sampler_length_is_the_number_of_batches_it_yields():
    buckets = [(64, 64)] * 5 + [(64, 128)] * 3 + [(128, 64)]
    for drop_last in (False, True):
        for batch_size in (1, 2, 3, 4):
            sampler = BucketBatchSampler(buckets, batch_size, seed=3, drop_last=drop_last,
                                         repeats=[2, 1, 1, 3, 1, 1, 2, 1, 4])
            for epoch in range(3):
                sampler.use_epoch(epoch)
                assert len(sampler) == len(list(sampler)), (drop_last, batch_size, epoch)
