"""--masked_loss: masks from masks/ files or alpha channels, prepared with their image, cached at latent size,
named in the preflight report when unusable; the loss of a step depends only on the masked part."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils import check_dataset
from utils.data import preflight
from utils.data.listing import list_dataset
from utils.data.records import Example
from utils.training.batches import Item, PixelDataset, assign_buckets, latent_mask, prepare_item, prepare_mask
from utils.training.caching import latent_cache_key
from utils.training.flags import parse_training_args

SIZE = 32  # image side, trained at 32 px (no resize, so a mask's edge stays sharp): latents of 4 x 4
SMALL = ["--min_image_size", "0"]


def left_half(width: int, height: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, : width // 2] = 255
    return mask


def write_dataset(folder: Path, images: dict[str, Image.Image], masks: dict[str, Image.Image]) -> Path:
    """A ghibli-layout dataset: images/, captions.json, and masks/ beside images/."""
    (folder / "images").mkdir(parents=True)
    for name, image in images.items():
        image.save(folder / "images" / name)
    if masks:
        (folder / "masks").mkdir()
        for name, mask in masks.items():
            mask.save(folder / "masks" / name)
    captions = {name: f"a painted landscape number {index}, ghibli style" for index, name in enumerate(images)}
    (folder / "captions.json").write_text(json.dumps(captions))
    return folder


def noise_image(seed: int, width: int = SIZE, height: int = SIZE, alpha: np.ndarray | None = None) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    if alpha is None:
        return Image.fromarray(pixels)
    return Image.fromarray(np.dstack([pixels, alpha]), mode="RGBA")


@pytest.fixture(scope="module")
def masked_dataset(tmp_path_factory) -> Path:
    """file.png: its mask in masks/file.png; alpha.png: the left half opaque in its alpha channel. Both
    masks cover the left half."""
    return write_dataset(tmp_path_factory.mktemp("masked") / "data",
                         {"file.png": noise_image(1), "alpha.png": noise_image(2, alpha=left_half(SIZE, SIZE))},
                         {"file.png": Image.fromarray(left_half(SIZE, SIZE))})


# ----------------------------------------------------------------------------- preflight


def test_missing_empty_and_misshapen_masks_are_named_in_the_preflight_report(tmp_path, capsys):
    dataset = write_dataset(tmp_path / "data", {
        "good.png": noise_image(1), "finer.png": noise_image(6), "missing.png": noise_image(2), "empty.png": noise_image(3),
        "wide.png": noise_image(4), "clear.png": noise_image(5, alpha=np.zeros((SIZE, SIZE), dtype=np.uint8)),
    }, {"good.png": Image.fromarray(left_half(SIZE, SIZE)), "finer.png": Image.fromarray(left_half(4 * SIZE, 4 * SIZE)),
        "empty.png": Image.new("L", (SIZE, SIZE), 0),
        "wide.jpg": Image.new("L", (SIZE, SIZE // 2), 255)})
    listing = list_dataset("ghibli", dataset)
    assert not preflight.check(listing, 0, progress=False).problems  # without --masked_loss masks are not read
    report = preflight.check(listing, 0, progress=False, masks=True)
    problems = {p.name: p.reason for p in report.problems}
    assert set(problems) == {"images/missing.png", "images/empty.png", "images/wide.png", "images/clear.png"}
    assert problems["images/missing.png"].startswith("no mask: the image has no alpha channel and there is no "
                                                     "masks/missing.* file")
    assert problems["images/empty.png"] == "mask masks/empty.png is empty (all zero): nothing of the image would train"
    assert problems["images/wide.png"] == "mask masks/wide.jpg is 32x16, the image 32x32: another aspect ratio"
    assert problems["images/clear.png"].startswith("alpha channel is empty (all zero)")
    assert sorted(e.mask_path.name for e in report.examples) == ["finer.png", "good.png"]  # any resolution
    assert check_dataset.main(["--dataset_dir", str(dataset), "--masked_loss", *SMALL]) == 1
    printed = capsys.readouterr().out
    assert "images/missing.png: no mask" in printed and "images/empty.png: mask masks/empty.png is empty" in printed
    assert check_dataset.main(["--dataset_dir", str(dataset), *SMALL]) == 0


def test_a_mask_is_cropped_with_its_image(tmp_path):
    """A portrait image randomly cropped to a square: the mask file holds the image's red channel, so the
    prepared mask must equal the prepared image's red channel wherever the crop fell."""
    image = noise_image(7, 64, 128)
    red = Image.fromarray(np.asarray(image)[:, :, 0])
    dataset = write_dataset(tmp_path / "data", {"tall.png": image}, {"tall.png": red})
    (example,) = preflight.check(list_dataset("ghibli", dataset), progress=False, masks=True).examples
    tops = set()
    for seed in range(6):
        (item,) = assign_buckets([example], 64, False, seed)
        prepared = prepare_item(item, center_crop=False)
        tops.add(prepared.crop_top_left[0])
        torch.testing.assert_close(prepare_mask(item, center_crop=False), (prepared.pixels[0] + 1) / 2)
    assert len(tops) > 1  # the crops really moved
    unmasked = Item(Example(example.image_path, "x"), (64, 32), 0)
    assert torch.equal(prepare_mask(unmasked, True), torch.ones(32, 64))  # e.g. a regularisation image


def test_the_latent_cache_key_changes_with_the_mask(masked_dataset, tmp_path):
    examples = preflight.check(list_dataset("ghibli", masked_dataset), 0, progress=False, masks=True).examples
    file_item = next(i for i in assign_buckets(examples, 32, True, 0) if i.example.image_path.name == "file.png")
    plain = latent_cache_key(file_item, "model", True)
    masked = latent_cache_key(file_item, "model", True, masks=True)
    assert plain != masked
    Image.fromarray(255 - left_half(SIZE // 2, SIZE // 2)).save(tmp_path / "other.png")
    other = Item(Example(file_item.example.image_path, "x", mask_path=tmp_path / "other.png"), file_item.bucket,
                 file_item.crop_seed)
    assert latent_cache_key(other, "model", True, masks=True) not in (plain, masked)


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def masked_run(tiny_model_dir, masked_dataset, tmp_path_factory):
    """2 steps at 32 px with --masked_loss, min-SNR and v-prediction, trained in this process."""
    from utils.training.recipe import training_examples
    from utils.training.checks import check_args
    from utils.training.epochs import finish
    from utils.training.stop import StopRequest
    from utils.training.recipe import set_up, train_loop
    from utils.training.run import open_run

    args = parse_training_args([
        "--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_dir", str(masked_dataset),
        "--output_dir", str(tmp_path_factory.mktemp("masked_run")), "--resolution", "32", "--max_train_steps", "2",
        "--report_to", "none", "--mixed_precision", "no", "--lr_warmup_steps", "0", "--eval_loss_epochs", "0",
        "--learning_rate", "1e-2", *SMALL, "--masked_loss", "--snr_gamma", "5", "--prediction_type", "v_prediction"])
    check_args(args)
    examples, dataset_type = training_examples(args, report_here=False)
    run = set_up(open_run(args, dataset_type), examples)
    with StopRequest() as stop:
        train_loop(run, stop)
    finish(run)
    return run


LEFT = torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 4)  # the left half at latent size (4 x 4)


@pytest.mark.slow
def test_alpha_and_file_masks_reach_the_batches_at_latent_size(masked_run):
    items = masked_run.batch_maker.items
    assert {i.example.image_path.name: i.example.mask_path.name for i in items} == {"file.png": "file.png",
                                                                                   "alpha.png": "alpha.png"}
    cache = masked_run.batch_maker.latent_cache
    uncached = PixelDataset(items, center_crop=True, masks=True)
    for index in range(len(items)):
        assert torch.equal(cache.masks[index][0], LEFT) and torch.equal(cache.masks[index][1], LEFT.flip(-1))
        assert torch.equal(latent_mask(uncached[index]["mask"], (4, 4)), LEFT)  # the same without the cache
        batch = masked_run.batch_maker({"index": torch.tensor([index])})
        assert torch.equal(batch.mask, LEFT[None, None])
    steps = (masked_run.settings.run_dir / "logs" / "training_steps.csv").read_text().splitlines()[1:]
    assert len(steps) == 2 and all(np.isfinite(float(row.split(",")[2])) for row in steps)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["file.png", "alpha.png"])
def test_a_target_change_outside_the_mask_leaves_the_gradient_unchanged(masked_run, name):
    from utils.training.loss import batch_loss, predict

    run = masked_run
    index = next(k for k, item in enumerate(run.batch_maker.items) if item.example.image_path.name == name)
    batch = run.batch_maker({"index": torch.tensor([index])})
    scheduler = run.components.noise_scheduler
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(batch.latents.shape, generator=generator)
    timesteps = torch.tensor([400])
    prediction, target = predict(run.components.unet, scheduler, batch, noise, timesteps)

    def gradient(change: torch.Tensor) -> torch.Tensor:
        loss = batch_loss(prediction, target + change, batch, scheduler, timesteps, run.settings.args.snr_gamma)
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, run.adapter.params, retain_graph=True)])

    base = gradient(torch.zeros_like(target))
    right, left = torch.zeros_like(target), torch.zeros_like(target)
    right[..., 2:] = torch.randn(right[..., 2:].shape, generator=generator)
    left[..., :2] = torch.randn(left[..., :2].shape, generator=generator)
    assert base.abs().sum() > 0
    assert torch.equal(gradient(right), base)
    assert (gradient(left) - base).abs().max() > 1e-3 * base.abs().max()


def test_a_full_mask_gives_the_unmasked_loss():
    from utils.training.loss import batch_loss
    from utils.training.model_inputs import Batch

    generator = torch.Generator().manual_seed(1)
    prediction, target = (torch.randn(2, 4, 4, 4, generator=generator) for _ in range(2))
    plain = Batch(*(torch.zeros(2) for _ in range(4)))
    masked = Batch(*(torch.zeros(2) for _ in range(4)), mask=torch.ones(2, 1, 4, 4))
    torch.testing.assert_close(batch_loss(prediction, target, masked, None, torch.tensor([1, 2])),
                               batch_loss(prediction, target, plain, None, torch.tensor([1, 2])))
