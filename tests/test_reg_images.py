"""Regularisation images (--reg_data_dir, --prior_loss_weight): kohya's balancing rule, the steps and images
of an epoch, the dataset report, resume mid-epoch, and the prior loss weight in the loss."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.helpers import csv_rows
from utils.data.regularisation import balanced_reg_repeats
from utils.lora.files import LORA_WEIGHT_NAME
from utils.training.flags import parse_training_args

TRAIN_IMAGES, REG_IMAGES = 3, 5
TINY = ["--resolution", "32", "--train_batch_size", "1", "--num_train_epochs", "2", "--learning_rate", "1e-2",
        "--lr_scheduler", "linear", "--lr_warmup_steps", "0", "--report_to", "none", "--mixed_precision", "no",
        "--save_steps", "100", "--eval_loss_epochs", "0", "--checkpointing_steps", "3", "--min_image_size", "0"]


# kohya sd-scripts' rule (DreamBoothDataset.__init__ in library/train_util.py): with T the training images
# counted with their repeats, the regularisation images are taken in order, each with its own repeat count,
# until their count reaches T (the rest are not used); if all of them fall short, further rounds add one
# repeat to each in turn, again stopping as soon as T is reached.
@pytest.mark.parametrize("train, reg, expected", [
    (3, [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]),  # more than needed: only the first three, once each
    (7, [1, 1], [4, 3]),  # too few: repeated round by round
    (3, [2, 2], [2, 2]),  # the first round takes whole repeat counts, so it may pass T
    (10, [3, 1], [6, 4]),
    (4, [5, 1], [5, 0]),
    (0, [1, 1], [0, 0]),
])
def test_kohya_balancing_rule(train, reg, expected):
    assert balanced_reg_repeats(train, reg) == expected


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> tuple[Path, Path]:
    """3 training images in the ghibli layout, 5 regularisation images in a kohya folder (other layouts)."""
    root = tmp_path_factory.mktemp("reg")
    train = root / "train"
    for index in range(TRAIN_IMAGES):
        write_image(train / "images" / f"style_{index}.png", index)
    (train / "captions.json").write_text(json.dumps({f"style_{i}.png": f"sks style picture {i}"
                                                     for i in range(TRAIN_IMAGES)}))
    for index in range(REG_IMAGES):
        image = root / "reg" / "1_picture" / f"reg_{index}.png"
        write_image(image, 100 + index)
        image.with_suffix(".txt").write_text(f"a picture {index}")
    return train, root / "reg"


def flags(model: Path, train: Path, reg: Path, output: Path, *extra: str) -> Namespace:
    return parse_training_args(["--pretrained_model_name_or_path", str(model), "--dataset_dir", str(train),
                                "--reg_data_dir", str(reg), "--output_dir", str(output), *TINY, *extra])


@pytest.fixture(scope="module")
def straight_run(tiny_model_dir, datasets, tmp_path_factory):
    """Two epochs at batch 1, trained in this process; the images of every step read from the loop's log."""
    from utils.training.recipe import training_examples
    from utils.data.regularisation import load_reg_examples
    from utils.training.checks import check_args
    from utils.training.epochs import finish
    from utils.training.stop import StopRequest
    from utils.training.recipe import set_up, train_loop
    from utils.training.run import open_run

    args = flags(tiny_model_dir, *datasets, tmp_path_factory.mktemp("straight"))
    check_args(args)
    examples, dataset_type = training_examples(args, report_here=False)
    reg = load_reg_examples(args, report_here=False)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    loggers = [logging.getLogger("utils.training.recipe")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.addHandler(handler)
        log.setLevel(logging.DEBUG)
    try:
        run = set_up(open_run(args, dataset_type), examples, reg_examples=reg)
        with StopRequest() as stop:
            train_loop(run, stop)
        finish(run)
        run.accelerator.end_training()
    finally:
        for log, level in zip(loggers, levels):
            log.removeHandler(handler)
            log.setLevel(level)
    return run, [r.getMessage() for r in records]


def images_per_step(run, messages: list[str]) -> list[list[str]]:
    names = [item.example.image_path.name for item in run.batch_maker.items]
    steps = [re.fullmatch(r"process 0 step \d+ images \[(.*)\] loss .*", m) for m in messages]
    return [[names[int(i)] for i in step.group(1).split(", ")] for step in steps if step]


@pytest.mark.slow
def test_steps_and_images_per_epoch_follow_kohyas_rule(straight_run):
    run, messages = straight_run
    # 3 training images, 5 regularisation images: the first 3 regularisation images once each -> 6 per epoch.
    per_epoch = TRAIN_IMAGES + sum(balanced_reg_repeats(TRAIN_IMAGES, [1] * REG_IMAGES))
    assert per_epoch == 6
    seen = images_per_step(run, messages)
    assert len(seen) == 2 * per_epoch
    expected = sorted([f"style_{i}.png" for i in range(3)] + [f"reg_{i}.png" for i in range(3)])
    for epoch in range(2):
        assert sorted(name for step in seen[epoch * 6:(epoch + 1) * 6] for name in step) == expected
    config = json.loads((run.settings.run_dir / "experiment_config.json").read_text())
    assert (config["steps_per_epoch"], config["max_train_steps"]) == (6, 12)
    assert (config["num_train_images"], config["images_seen_per_epoch"]) == (3, 6)
    assert (config["num_reg_images"], config["num_reg_images_used"], config["reg_images_per_epoch"]) == (5, 3, 3)
    assert config["reg_data_dir"] == str(run.settings.args.reg_data_dir) and config["prior_loss_weight"] == 1.0
    assert config["dataset_folders"] == [{"folder": ".", "images": 3, "repeats": 1, "images_per_epoch": 3}]
    steps = csv_rows(run.settings.run_dir / "logs" / "training_steps.csv")
    # The linear schedule runs over all 12 steps, the regularisation steps included.
    assert [float(r["learning_rate"]) for r in steps] == pytest.approx([1e-2 * (1 - s / 12) for s in range(1, 13)])
    assert any("3 training images (0 held out), 6 seen per epoch (3 of them regularisation images: 3 of 5 used, "
               "prior loss weight 1), 12 optimizer steps" in m for m in messages)


@pytest.mark.slow
def test_resume_mid_epoch_equals_the_straight_run(straight_run, tiny_model_dir, datasets, tmp_path):
    from utils.training.recipe import train

    straight = straight_run[0].settings.run_dir
    copy = tmp_path / "resumed" / straight.name
    shutil.copytree(straight, copy)
    shutil.rmtree(copy / "final_model")
    for later in ("checkpoint-6", "checkpoint-9", "checkpoint-12"):
        shutil.rmtree(copy / "checkpoints" / later)
    train(flags(tiny_model_dir, *datasets, tmp_path / "resumed", "--resume_from_checkpoint",
                str(copy / "checkpoints" / "checkpoint-3")))  # step 3 of epoch 0's 6
    first, second = (load_file(str(run / "final_model" / LORA_WEIGHT_NAME)) for run in (straight, copy))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert [r["loss"] for r in csv_rows(copy / "logs" / "training_steps.csv")] == \
        [r["loss"] for r in csv_rows(straight / "logs" / "training_steps.csv")]


@pytest.mark.slow
def test_the_prior_loss_weight_reaches_the_loss(straight_run):
    """Loss weights multiply each image's loss, and the batch mean divides by the batch size (kohya's way):
    with weight 0 a batch of a training and a regularisation image has half the gradient of the training
    image alone; the gradient is linear in the weight."""
    from utils.training.loss import batch_loss, predict
    from utils.training.model_inputs import Batch

    run = straight_run[0]
    items = run.batch_maker.items
    train_index = next(k for k, i in enumerate(items) if not i.example.is_reg)
    reg_index = next(k for k, i in enumerate(items) if i.example.is_reg)
    scheduler = run.components.noise_scheduler
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 4, 4, 4, generator=generator)
    timesteps = torch.tensor([300, 600])

    def gradient(weight: float, count: int = 2) -> torch.Tensor:
        """The gradient of the batch (training image, regularisation image), or of its first image alone."""
        args = Namespace(**{**vars(run.settings.args), "prior_loss_weight": weight})
        torch.manual_seed(1)  # the same latent draws from the cached distributions every time
        batch = dataclasses.replace(run.batch_maker, args=args)({"index": torch.tensor([train_index, reg_index])})
        batch = Batch(*(None if value is None else value[:count] for value in dataclasses.astuple(batch)))
        prediction, target = predict(run.components.unet, scheduler, batch, noise[:count], timesteps[:count])
        loss = batch_loss(prediction, target, batch, scheduler, timesteps[:count])
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, run.adapter.params)])

    alone = gradient(1.0, count=1)
    mixed = {weight: gradient(weight) for weight in (0.0, 0.5, 1.0)}
    torch.testing.assert_close(2 * mixed[0.0], alone, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(mixed[0.5], (mixed[0.0] + mixed[1.0]) / 2, rtol=1e-4, atol=1e-7)
    assert (mixed[1.0] - mixed[0.0]).abs().max() > 1e-3 * alone.abs().max()
